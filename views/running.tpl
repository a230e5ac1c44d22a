% if not rows:
<p class="empty">Nothing running.</p>
% else:
<table class="tasks">
<tr><th>task</th><th>name</th><th>worker</th><th>started</th><th>progress</th></tr>
% for row in rows:
<tr class="running" data-task="{{row.id}}">
  <td><a href="/dashboard/tasks/{{row.id}}">{{row.id[:12]}}</a></td><td>{{row.name}}</td><td>{{row.worker or ''}}</td>
  <td>{{ago(row.started_at)}}</td>
  <td>
  % include('progress.tpl', row=row)
  </td>
</tr>
% end
</table>
% end
