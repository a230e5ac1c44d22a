<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}} · emailsvc</title>
<link rel="icon" href="/dashboard/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/dashboard/static/dashboard.css">
<script src="/dashboard/static/dashboard.js" defer></script>
</head>
<body>
<header>
  <strong>emailsvc</strong>
  % if viewer:
  <nav>
    <a href="/dashboard">Overview</a>
    % if viewer.operator:
    <a href="/dashboard/consumers">Consumers</a>
    % end
    <a href="/dashboard/tasks">Tasks</a>
  </nav>
  <span class="who">{{'operator' if viewer.operator else 'user'}}</span>
  <form method="post" action="/dashboard/logout" class="inline">
    <input type="hidden" name="csrf" value="{{viewer.csrf}}">
    <button type="submit" id="sign-out">Sign out</button>
  </form>
  % end
</header>
<main>
{{!base}}
</main>
</body>
</html>
