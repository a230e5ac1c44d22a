<form method="post" action="/dashboard/tasks/{{row.id}}/{{action}}" class="inline" data-confirm="{{question}}">
  <input type="hidden" name="csrf" value="{{viewer.csrf}}">
  <button type="submit" id="{{action}}-button" class="{{'danger' if action in ('purge', 'revoke', 'stop') else ''}}">{{label}}</button>
</form>
