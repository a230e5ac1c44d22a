% rebase('layout.tpl', title=f'Error {status}', viewer=None)
<h1>{{status}}</h1>
<p>{{message}}</p>
<p><a href="/dashboard">Back to the dashboard</a></p>
