"""Fuzzing the live service from its own OpenAPI document (issue 13): shared by tests/test_fuzz.py
(200 cases a route) and bench/fuzz.py (2,000).

For every operation in /api/v1/openapi.json, schemathesis generates requests from the document,
valid ones (GenerationMode.POSITIVE: bodies, parameters and headers that fit the schemas) and
invalid ones (NEGATIVE: wrong types, missing fields, out-of-range numbers...), in one Hypothesis
run with a fixed budget and `derandomize` (the same cases every run, no example database). Each
case goes to a real web process with, in turn, a user key, an operator key and no key; every
other case has its path ids replaced by objects the user really owns (an account with SMTP, a
task), so generated bodies reach past the 404. Each answer is checked by schemathesis against the
document (no 5xx, status code declared, content type declared, body matches the schema, invalid
data refused) and by us (no 2xx without a key or with the wrong kind of key).

The target web server has a database and a queue of its own, which no consumer reads and no
recovery re-enqueues: fuzzed accounts name hosts that do not exist, and their syncs and sends must
not reach a consumer of the test session (nor ask a resolver about those names).
"""
import collections
import dataclasses
import json
import os
import subprocess
import sys
import time

import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ('user', 'user', 'operator', None)   # half the cases with the key that reaches furthest


def checks():
    """schemathesis's response checks that the contract promises, in its own words."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                                   response_schema_conformance, status_code_conformance)
    return [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
            negative_data_rejection]


@dataclasses.dataclass
class Tally:
    """Per route: cases sent, by key kind and generation mode; server errors; contract violations."""
    cases: int = 0
    server_errors: int = 0
    violations: int = 0
    statuses: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    keys: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list = dataclasses.field(default_factory=list)   # the first few problems, for the report

    def note(self, kind, text):
        if kind == 'server':
            self.server_errors += 1
        else:
            self.violations += 1
        if len(self.examples) < 5:
            self.examples.append(f'{kind}: {text}')


def admin(env, *args):
    """`emailsvc.py admin ...` against the fuzz target's database; returns its last line (a key)."""
    done = subprocess.run([sys.executable, 'emailsvc.py', 'admin', *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f'admin {" ".join(args)} failed: {done.stderr.strip()}')
    return done.stdout.strip().splitlines()[-1]


class Target:
    """The service under fuzz: `base` URL, `keys` by kind, and `objects` the user owns."""

    def __init__(self, base, env):
        self.base, self.env = base, env
        admin(env, 'create-tenant', 'fuzz')
        self.keys = {'user': admin(env, 'create-key', '--tenant', 'fuzz', '--user', 'fuzzer'),
                     'operator': admin(env, 'create-key', '--operator'), None: None}
        self.session = requests.Session()
        self.objects = self.make_objects()

    def call(self, method, path, key='user', **kwargs):
        headers = {'Authorization': f'Bearer {self.keys[key]}'} if self.keys[key] else {}
        return self.session.request(method, self.base + path, headers=headers, timeout=15, **kwargs)

    def make_objects(self):
        account = self.call('POST', '/api/v1/accounts', json={
            'email': 'fuzz@example.com', 'sync_enabled': False,
            'incoming': {'protocol': 'imap', 'host': 'imap.invalid', 'port': 993, 'security': 'tls',
                         'username': 'fuzz', 'password': 'pw'},
            'smtp': {'host': 'smtp.invalid', 'port': 587, 'security': 'starttls', 'username': 'fuzz',
                     'password': 'pw'}})
        assert account.status_code == 201, account.text
        task = self.call('POST', f'/api/v1/accounts/{account.json()["id"]}/sync', json={})
        assert task.status_code == 202, task.text
        message_id, attachment_id = store_message(self.env, account.json()['id'])
        return {'client_id': account.json()['id'], 'task_id': task.json()['task_id'], 'message_id': message_id,
                'attachment_id': attachment_id}


MESSAGE = (b'From: Ann <ann@example.org>\r\nTo: fuzz@example.com\r\nSubject: fuzz\r\nMessage-ID: <f@example.org>\r\n'
           b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain'
           b'\r\n\r\nbody\r\n--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; '
           b'filename="a.pdf"\r\n\r\n%PDF\r\n--b--\r\n')


def store_message(env, client_id):
    """A message with an attachment in the account's INBOX, stored as a sync stores it (in the target's
    own database, so by a process of its own): the message routes get a real id to aim at."""
    script = f'''
import models, tasks
with models.all_tenants():
    client = models.EmailClient.get_by_id({client_id})
with models.tenant_scope(client.tenant_id):
    folder = models.EmailFolder.create(client=client.id, name='INBOX', raw_name='INBOX', role='inbox')
    models.store_messages(folder, [dict(tasks.message_fields({MESSAGE!r}), uid=1, **models.flag_fields(()))], 'uid')
    message = models.EmailMessage.get(models.EmailMessage.folder == folder.id)
    print(message.id, models.Attachment.get(models.Attachment.message == message.id).id)
'''
    done = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    if done.returncode:
        raise RuntimeError(f'storing a message failed: {done.stderr.strip()[-500:]}')
    return tuple(int(n) for n in done.stdout.split()[-2:])


def target_env(workdir, mode, postgres=None, redis_url=None):
    """The environment of a web server with a database and queue of its own."""
    tag = os.urandom(4).hex()
    var = os.path.join(workdir, f'fuzz-{tag}')
    os.makedirs(var, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED='1', EMAILSVC_VAR=var,
               # No consumer serves this queue: without these, /health/detailed would be 503 "no live consumer".
               EMAILSVC_CONSUMER_STARTUP_GRACE='1000000', EMAILSVC_HEALTH_MAX_WAIT_SECONDS='0',
               # A generated wait=3600 long-polls for events.max_wait (25 s), past the client's read timeout.
               EMAILSVC_EVENTS_MAX_WAIT='0.5')
    if mode == 'scaleout':
        env['EMAILSVC_DATABASE_URL'] = postgres.create_database(f'fuzz_{tag}')
        env['EMAILSVC_QUEUE_URL'] = redis_url.rsplit('/', 1)[0] + '/7'
    else:
        env['EMAILSVC_DATABASE_URL'] = f'sqlite:///{var}/emailsvc.db'
        env['EMAILSVC_QUEUE_URL'] = f'sqlite:///{var}/queue.db'
    return env


def load_schema(target):
    import schemathesis
    document = target.session.get(target.base + '/api/v1/openapi.json', timeout=15).json()
    schema = schemathesis.openapi.from_dict(document)
    # We choose the key of each case ourselves (a user's, an operator's, none), so schemathesis must not
    # also mutate the Authorization header: a case whose only "invalid" part was a header we replace
    # would pass as invalid data accepted. Unknown query parameters are ignored by design (a cache-buster
    # must not break a request), so they are not invalid data either.
    schema.config.generation.update(with_security_parameters=False, allow_extra_parameters=False)
    return schema


def operations(schema):
    return {op.label: op for op in (result.ok() for result in schema.get_all_operations())}


def fuzz(target, operation, examples, tally=None):
    """Send `examples` generated cases for one operation; returns its Tally."""
    from schemathesis import GenerationMode
    tally = tally or Tally()
    run_checks = checks()
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    # The key and the aim are drawn too: a route without parameters still gets each key.
    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=cases, key=st.sampled_from(KEYS), aim=st.booleans())
    def one_case(case, key, aim):
        if aim and case.meta.generation.mode.is_positive:   # objects the user owns: valid bodies get past the 404
            for name, value in target.objects.items():
                if name in (case.path_parameters or {}):
                    case.path_parameters[name] = value
            if isinstance(case.body, dict) and operation.path.endswith('/send'):
                # Recipients must pass the address parser, which no JSON Schema states, and attachment ids
                # must name the user's uploads: these aimed sends get a recipient that passes and no
                # attachments, so they are accepted too (idempotency keys, sizes, the outbox).
                case.body.update(to=['fuzz@example.com'], cc=[], bcc=[], attachment_ids=[])
        tally.keys[key] += 1
        headers = {'Authorization': f'Bearer {target.keys[key]}'} if key else {}
        check(target, operation, case, key, headers, tally, run_checks)

    one_case()
    return tally


def check(target, operation, case, key, headers, tally, run_checks):
    """Send one case and judge its answer."""
    tally.cases += 1
    if key is None and case.headers:
        case.headers.pop('Authorization', None)
    try:
        response = case.call(base_url=target.base, session=target.session, headers=headers, timeout=15)
    except requests.RequestException as exc:   # the server closed on us: as bad as a 500
        tally.note('server', f'{case.method} {case.formatted_path}: {type(exc).__name__}: {exc}')
        return
    tally.statuses[response.status_code] += 1
    if response.status_code >= 500:
        tally.note('server', f'{case.method} {case.formatted_path} -> {response.status_code} {response.text[:200]}')
    else:
        try:
            case.validate_response(response, checks=run_checks, headers=headers)
        except (Exception, BaseExceptionGroup) as exc:   # schemathesis's FailureGroup is a BaseExceptionGroup
            tally.note('schema', f'{case.method} {case.formatted_path} ({key} key) -> {response.status_code}: '
                                 f'{" ".join(str(exc).split())[:600]}')
    auth = route_auth(operation)
    if 200 <= response.status_code < 300 and auth != 'none':
        if key is None and auth != 'metrics':
            tally.note('schema', f'{case.method} {case.formatted_path} answered {response.status_code} without a key')
        if key == 'operator' and auth == 'user':
            tally.note('schema', f'{case.method} {case.formatted_path} answered {response.status_code} to an '
                                 'operator key')


def route_auth(operation):
    """The key a route needs, from the document's own words ('Authorization: ...')."""
    text = operation.definition.raw.get('description', '')
    for auth, words in (('none', 'no key'), ('metrics', 'metrics.allowed_networks'),
                        ('user', 'a user key'), ('operator', 'an operator key')):
        if f'Authorization: {words}' in text or (auth == 'metrics' and words in text):
            return auth
    return 'any'


def run_all(target, examples, report=print):
    """Fuzz every operation; returns {label: Tally} and reports a line per route."""
    schema = load_schema(target)
    tallies = {}
    # Changes, then deletes, last: an aimed PATCH may drop the account's SMTP server, which sends need,
    # and an aimed DELETE removes the account or task the other routes aim at.
    order = {'PATCH': 1, 'DELETE': 2}
    for label, operation in sorted(operations(schema).items(), key=lambda item: (order.get(item[1].method.upper(), 0),
                                                                                 item[0])):
        started = time.monotonic()
        tallies[label] = fuzz(target, operation, examples)
        tally = tallies[label]
        report(f'{label:60} {tally.cases:5d} cases {time.monotonic() - started:6.1f} s  '
               f'server errors {tally.server_errors}  schema violations {tally.violations}  '
               f'statuses {json.dumps(dict(sorted(tally.statuses.items())))}')
        for example in tally.examples:
            report(f'    {example}')
    return tallies
