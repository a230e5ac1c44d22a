% if not rows:
<p class="empty">No tasks match.</p>
% else:
<table class="tasks" id="task-list">
<tr><th>task</th><th>name</th><th>state</th>
% if viewer.operator:
<th>tenant</th>
% end
<th>account</th><th>queued</th><th>attempts</th><th>progress</th><th>error</th></tr>
% for row in rows:
<tr class="{{row.state}}" data-task="{{row.id}}">
  <td><a href="/dashboard/tasks/{{row.id}}">{{row.id[:12]}}</a></td><td>{{row.name}}</td>
  <td><span class="state {{row.state}}">{{row.state}}</span></td>
  % if viewer.operator:
  <td>{{tenants.get(row.tenant_id, '') if row.tenant_id else 'service'}}</td>
  % end
  <td>{{accounts.get(row.args.get('email_client_id'), '')}}</td>
  <td title="{{when(row.enqueued_at)}}">{{ago(row.enqueued_at)}}</td><td>{{row.attempts}}</td>
  <td>
  % include('progress.tpl', row=row)
  </td>
  <td class="error">{{(row.error or '')[:120]}}</td>
</tr>
% end
</table>
% end
% if next_cursor:
<p><a href="{{filters.link(cursor=next_cursor)}}" id="next-page">Older tasks →</a></p>
% end
