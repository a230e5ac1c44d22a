% rebase('layout.tpl', title=title, viewer=viewer)
<h1>Consumers and workers</h1>
<div id="live" data-live="/dashboard/fragment/consumers">
% include('consumers_live.tpl')
</div>
