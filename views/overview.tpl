% rebase('layout.tpl', title=title, viewer=viewer)
<h1>Overview</h1>
<div id="live" data-live="/dashboard/fragment/overview">
% include('overview_live.tpl')
</div>
