% rebase('layout.tpl', title='Sign in', viewer=None)
<h1>Sign in</h1>
% if error:
<p class="notice bad">{{error}}</p>
% end
<form method="post" action="/dashboard/login" class="login">
  <label for="key">API key</label>
  <input type="password" id="key" name="key" autocomplete="off" required autofocus>
  <button type="submit">Sign in</button>
</form>
<p class="hint">An operator key (<code>./run.sh admin create-key --operator</code>) sees every tenant; a user's key sees that user's tasks.</p>
