% rebase('layout.tpl', title=title, viewer=viewer)
<h1>Task <code>{{row.id}}</code></h1>
% if notice:
<p class="notice" id="notice">{{notice}}</p>
% end
<div id="live" data-live="/dashboard/fragment/tasks/{{row.id}}">
% include('task_live.tpl')
</div>
