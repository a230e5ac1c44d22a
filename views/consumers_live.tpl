% if not beats:
<p class="empty">No worker has ever beaten. Start one with <code>./run.sh consumer</code>.</p>
% else:
<table class="tasks">
<tr><th>host</th><th>consumer</th><th>worker pid</th><th>started</th><th>last beat</th><th>state</th><th>tasks done</th><th>memory</th><th>current task</th></tr>
% for beat in beats:
%   alive = beat.last_seen >= alive_after
<tr class="{{'alive' if alive else 'gone'}}">
  <td>{{beat.host}}</td><td>{{beat.consumer_pid}}</td><td>{{beat.pid}}</td><td>{{ago(beat.started_at)}}</td>
  <td>{{ago(beat.last_seen)}}</td><td>{{'alive' if alive else 'gone since ' + when(beat.last_seen)}}</td>
  <td>{{beat.tasks_done or 0}}</td><td>{{'%.0f MiB' % (beat.rss_kb / 1024) if beat.rss_kb else ''}}</td>
  <td>
  % task = current.get(beat.current_task)
  % if task:
    <a href="/dashboard/tasks/{{task.id}}">{{task.name}} {{task.id[:12]}}</a>
    % include('progress.tpl', row=task)
  % end
  </td>
</tr>
% end
</table>
% end
