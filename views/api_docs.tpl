<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{doc['info']['title']}} reference</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; color: #1d232a; background: #fafbfc; }
header, main { max-width: 70rem; margin: 0 auto; padding: 0 1.2rem; }
header { padding-top: 1.2rem; }
nav { columns: 3 18rem; font-size: 13px; margin: 1rem 0; }
nav a { display: block; text-decoration: none; color: #1d4f91; overflow-wrap: anywhere; }
section.op { background: #fff; border: 1px solid #dde2e8; border-radius: 6px; margin: 1rem 0; padding: .6rem 1rem; }
h2 { margin-top: 2rem; border-bottom: 1px solid #dde2e8; text-transform: capitalize; }
h3 { margin: .2rem 0; font-size: 16px; font-family: ui-monospace, monospace; }
.method { display: inline-block; min-width: 4.2rem; padding: 0 .4rem; margin-right: .4rem; border-radius: 4px;
          color: #fff; font-size: 13px; text-align: center; }
.get { background: #2f6fb2; } .post { background: #2e8540; } .patch { background: #a66a00; } .delete { background: #b0332a; }
table { border-collapse: collapse; width: 100%; font-size: 13px; margin: .4rem 0; }
th, td { text-align: left; vertical-align: top; border-top: 1px solid #eef0f3; padding: .25rem .4rem; }
th { font-weight: 600; color: #4a5561; }
code, td.name { font-family: ui-monospace, monospace; }
.muted { color: #66707a; font-size: 13px; }
</style>
</head>
<body>
<header>
<h1>{{doc['info']['title']}} reference</h1>
<p>{{doc['info']['description']}}</p>
<p class="muted">Generated from <a href="openapi.json">openapi.json</a> (OpenAPI {{doc['openapi']}}), the same models
that validate each request.</p>
<nav>
% for path, methods in doc['paths'].items():
%   for method, op in methods.items():
  <a href="#{{op['operationId']}}">{{method.upper()}} {{path}}</a>
%   end
% end
</nav>
</header>
<main>
% tags = {}
% for path, methods in doc['paths'].items():
%   for method, op in methods.items():
%     tags.setdefault(op['tags'][0], []).append((path, method, op))
%   end
% end
% for tag, ops in tags.items():
<h2>{{tag}}</h2>
%   for path, method, op in ops:
<section class="op" id="{{op['operationId']}}">
  <h3><span class="method {{method}}">{{method.upper()}}</span>{{path}}</h3>
  <p>{{op['summary']}}</p>
  % for para in op.get('description', '').split('\n\n'):
  <p class="muted">{{para}}</p>
  % end
  % if op['parameters']:
  <table><tr><th>parameter</th><th>in</th><th>type</th><th>about</th></tr>
  %   for p in op['parameters']:
    <tr><td class="name">{{p['name']}}{{'' if p.get('required') else '?'}}</td><td>{{p['in']}}</td>
        <td>{{!type_html(p['schema'])}}</td><td>{{p.get('description', '')}}</td></tr>
  %   end
  </table>
  % end
  % if 'requestBody' in op:
  <p><strong>Body</strong>:
  %   for media, content in op['requestBody']['content'].items():
    <code>{{media}}</code> {{!type_html(content['schema'])}}
  %   end
  % end
  <table><tr><th>status</th><th>body</th><th>when</th></tr>
  % for status, answer in op['responses'].items():
    <tr><td>{{status}}</td>
        <td>{{!', '.join(f'{media}: {type_html(c["schema"])}' for media, c in answer.get('content', {}).items()) or '-'}}</td>
        <td>{{answer['description']}}</td></tr>
  % end
  </table>
</section>
%   end
% end
<h2>Schemas</h2>
% for name, schema in doc['components']['schemas'].items():
<section class="op" id="schema-{{name}}">
  <h3>{{name}}</h3>
  % if schema.get('description'):
  <p class="muted">{{schema['description']}}</p>
  % end
  <table><tr><th>field</th><th>type</th><th>about</th></tr>
  % for field, prop in schema.get('properties', {}).items():
    <tr><td class="name">{{field}}{{'' if field in schema.get('required', ()) else '?'}}</td>
        <td>{{!type_html(prop)}}</td><td>{{prop.get('description', '')}}
        % if prop.get('default') is not None:
          (default {{str(prop['default']).lower() if isinstance(prop['default'], bool) else prop['default']}})
        % end
        </td></tr>
  % end
  </table>
  % if schema.get('additionalProperties') is False:
  <p class="muted">Unknown fields are refused (422).</p>
  % end
</section>
% end
</main>
</body>
</html>
