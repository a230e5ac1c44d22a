% rebase('layout.tpl', title=title, viewer=viewer)
<h1>Tasks</h1>
% notice = request_notice
% if notice:
<p class="notice">{{notice}}</p>
% end
<form method="get" action="/dashboard/tasks" class="lookup">
  <label>Task id <input name="id" size="36"></label> <button type="submit">Open</button>
</form>
<form method="get" action="/dashboard/tasks" class="filters">
  <label>State <select name="state"><option value="">any</option>
  % for state in states:
    <option{{!' selected' if state == filters.state else ''}}>{{state}}</option>
  % end
  </select></label>
  <label>Task <select name="name"><option value="">any</option>
  % for name in names:
    <option{{!' selected' if name == filters.name else ''}}>{{name}}</option>
  % end
  </select></label>
  % if viewer.operator:
  <label>Tenant <select name="tenant"><option value="">any</option>
  % for tenant_id, tenant_name in sorted(tenants.items(), key=lambda t: t[1]):
    <option value="{{tenant_id}}"{{!' selected' if str(tenant_id) == filters.tenant else ''}}>{{tenant_name}}</option>
  % end
  </select></label>
  % end
  <label>Account id <input name="account" size="6" value="{{filters.account}}"></label>
  <label>From <input type="datetime-local" name="since" value="{{filters.since}}"></label>
  <label>To <input type="datetime-local" name="until" value="{{filters.until}}"></label>
  <label>Error text <input name="q" value="{{filters.text}}"></label>
  <button type="submit">Filter</button>
</form>
% if viewer.operator and filters.state == 'dead':
<form method="post" action="/dashboard/dead/purge" class="inline" data-confirm="Purge every dead letter? They are deleted from the ledger for good.">
  <input type="hidden" name="csrf" value="{{viewer.csrf}}">
  <button type="submit" class="danger" id="purge-dead">Purge all dead letters</button>
</form>
% end
<div id="live" data-live="/dashboard/fragment/tasks?{{request_query}}">
% include('tasks_live.tpl')
</div>
