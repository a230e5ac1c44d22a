<section class="actions">
% if row.state in ('pending', 'retrying'):
  % include('action.tpl', action='revoke', label='Revoke', question='Revoke this waiting task? It will not run.')
% end
% if stoppable:
  % include('action.tpl', action='stop', label='Stop', question='Stop this running task at its next safe point?')
% end
% if row.state in ('failed', 'dead', 'revoked'):
  % include('action.tpl', action='retry', label='Retry', question='Run this task again under the same id?')
% end
% if row.state in ('succeeded', 'failed', 'dead', 'revoked'):
  % include('action.tpl', action='purge', label='Purge', question='Delete this task from the ledger for good?')
% end
</section>
<table class="detail">
  <tr><th>name</th><td>{{row.name}}</td></tr>
  <tr><th>state</th><td><span class="state {{row.state}}" id="task-state">{{row.state}}</span>
    % if row.stop_requested_at and row.state == 'running':
    (stop requested {{ago(row.stop_requested_at)}})
    % end
  </td></tr>
  <tr><th>progress</th><td>
  % include('progress.tpl', row=row)
  </td></tr>
  % if tenant:
  <tr><th>tenant</th><td>{{tenant.name}} (#{{tenant.id}})</td></tr>
  % end
  <tr><th>user</th><td>{{row.user_id or ''}}</td></tr>
  <tr><th>account</th><td>{{'%s (#%s)' % (account.email, account.id) if account else ''}}</td></tr>
  <tr><th>priority</th><td>{{row.priority}}</td></tr>
  <tr><th>attempts</th><td>{{row.attempts}} ({{row.retries_left}} retries left)</td></tr>
  <tr><th>queued</th><td>{{when(row.enqueued_at)}}</td></tr>
  <tr><th>started</th><td>{{when(row.started_at)}}</td></tr>
  <tr><th>finished</th><td>{{when(row.finished_at)}}</td></tr>
  <tr><th>next retry</th><td>{{when(row.next_retry_at)}}</td></tr>
  <tr><th>worker</th><td>{{row.worker or ''}}</td></tr>
  <tr><th>request id</th><td><code>{{row.request_id or ''}}</code></td></tr>
</table>
<h2>Arguments</h2>
<pre>{{as_json(args)}}</pre>
<h2>Attempts and actions</h2>
<table class="tasks" id="history">
<tr><th>what</th><th>at</th><th>ended</th><th>worker or who</th><th>error</th></tr>
% for line in history:
<tr><td>{{line.get('kind')}}</td><td>{{line.get('at') or ''}}</td><td>{{line.get('ended') or ''}}</td>
  <td>{{line.get('worker') or line.get('by') or ''}}</td><td class="error">{{line.get('error') or ''}}</td></tr>
% end
% if row.started_at:
<tr class="current"><td>attempt {{row.attempts}} (latest)</td><td>{{when(row.started_at)}}</td><td>{{when(row.finished_at)}}</td>
  <td>{{row.worker or ''}}</td><td class="error">{{row.error or ''}}</td></tr>
% end
</table>
% if row.result is not None:
<h2>Result</h2>
<pre>{{as_json(row.result)}}</pre>
% end
% if row.error:
<h2>Error</h2>
<pre class="error">{{row.error}}</pre>
% end
% if row.traceback:
<h2>Traceback</h2>
<pre class="traceback">{{row.traceback}}</pre>
% end
