"""Hostile input and the wrong kind of key (issue 13): each finding of the review, as a regression test."""
import datetime
import http.client
import json
import os
import stat
import subprocess
import sys
import uuid

import pytest

import models
import tasks
from tests.conftest import ROOT, STATE, WebServer, assert_api_error, python_env
from tests.test_api import ACCOUNT

MESSAGE = (b'From: Ann <ann@example.org>\r\nTo: bob@example.com\r\nSubject: secret plans\r\n'
           b'Message-ID: <sec-1@example.org>\r\nMIME-Version: 1.0\r\n'
           b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
           b'Content-Type: text/plain\r\n\r\nthe body text\r\n--b1\r\n'
           b'Content-Type: text/html\r\nContent-Disposition: attachment; filename="x.html"\r\n\r\n'
           b'<script>alert(1)</script>\r\n--b1--\r\n')


@pytest.fixture
def alice(client, make_key, unique):
    api = client.as_key(make_key(unique, 'alice'))
    api.ids = tuple(getattr(models.ApiKey.lookup(api.key), f) for f in ('tenant_id', 'user_id'))
    return api


@pytest.fixture
def account(alice):
    resp = alice.post('/api/v1/accounts', ACCOUNT)
    assert resp.status == 201, resp.text
    return resp.json


@pytest.fixture
def stored_message(alice, account):
    """A message with an HTML attachment, stored as a sync would store it (no mail server needed)."""
    tenant_id, _ = alice.ids
    with models.tenant_scope(tenant_id):
        folder = models.EmailFolder.create(client=account['id'], name='INBOX', raw_name='INBOX', role='inbox')
        item = dict(tasks.message_fields(MESSAGE), uid=1, **models.flag_fields(()))
        models.store_messages(folder, [item], 'uid')
        message = models.EmailMessage.get(models.EmailMessage.folder == folder.id)
        attachment = models.Attachment.get(models.Attachment.message == message.id)
    return message.id, attachment.id


# ---------------------------------------------------------------- operator keys operate, they do not read mail

def test_operator_key_cannot_change_accounts_or_read_mail(client, make_key, alice, account, stored_message):
    operator = client.as_key(make_key(operator=True))
    message_id, attachment_id = stored_message
    path = f'/api/v1/accounts/{account["id"]}'
    for resp in (operator.patch(path, {'sync_interval': 600}),
                 operator.post(f'{path}/sync', {}),
                 operator.get('/api/v1/messages'),
                 operator.get(f'/api/v1/messages?account_id={account["id"]}'),
                 operator.get(f'/api/v1/messages/{message_id}'),
                 operator.get(f'/api/v1/messages/{message_id}/raw'),
                 operator.get(f'/api/v1/messages/{message_id}/attachments/{attachment_id}'),
                 operator.delete(path)):
        assert_api_error(resp, 403, 'forbidden')
    # Operating still works: account metadata (never a secret), tasks and health.
    listed = operator.get(f'{path}').json
    assert listed['email'] == 'alice@example.com' and 'S3cret' not in json.dumps(listed)
    assert operator.get('/api/v1/tasks').status == 200
    assert alice.get(path).json['sync_interval'] == ACCOUNT['sync_interval']   # nothing changed


def test_attachments_and_raw_messages_are_sandboxed_downloads(alice, stored_message):
    message_id, attachment_id = stored_message
    for path in (f'/api/v1/messages/{message_id}/raw', f'/api/v1/messages/{message_id}/attachments/{attachment_id}'):
        resp = alice.get(path)
        assert resp.status == 200, resp.text
        assert resp.headers['Content-Security-Policy'] == 'sandbox'
        assert resp.headers['Content-Disposition'].startswith('attachment;')
        assert resp.headers['X-Content-Type-Options'] == 'nosniff'
    assert b'<script>' in alice.get(f'/api/v1/messages/{message_id}/attachments/{attachment_id}').body


# ---------------------------------------------------------------- the password follows the server

@pytest.mark.parametrize('server, change', [
    ('incoming', {'host': 'evil.example.net'}),
    ('incoming', {'port': 143}),
    ('incoming', {'security': 'none'}),
    ('incoming', {'username': 'bob'}),
    ('incoming', {'protocol': 'pop3'}),
    ('smtp', {'host': 'evil.example.net'}),
    ('smtp', {'port': 25}),
    ('smtp', {'security': 'none'}),
    ('smtp', {'username': 'bob'}),
])
def test_changing_where_the_password_goes_needs_the_password(alice, account, server, change):
    path = f'/api/v1/accounts/{account["id"]}'
    resp = alice.patch(path, {server: change})
    assert_api_error(resp, 422, 'validation_failed')
    assert f'{server}.password' in resp.json['fields']
    assert alice.get(path).json[server] == account[server]      # nothing was applied
    resp = alice.patch(path, {server: dict(change, password='the-new-one')})
    assert resp.status == 200, resp.text
    assert all(resp.json[server][k] == v for k, v in change.items())


def test_unchanged_server_fields_need_no_password(alice, account):
    path = f'/api/v1/accounts/{account["id"]}'
    same = {k: account['incoming'][k] for k in ('host', 'port', 'security', 'username')}
    resp = alice.patch(path, {'incoming': same, 'sync_interval': 900})
    assert resp.status == 200 and resp.json['sync_interval'] == 900, resp.text


# ---------------------------------------------------------------- control characters

@pytest.mark.parametrize('field, value', [
    ('incoming.username', 'bob\r\nDELE 1'),
    ('incoming.password', 'pw\nA1 LOGOUT'),
    ('incoming.username', 'bob\x00'),
    ('incoming.password', 'tab\tpw'),
    ('incoming.password', 'del\x7f'),
    ('incoming.host', 'imap.example.com\r\n'),
    ('smtp.username', 'bob\x1b[31m'),
    ('smtp.password', 'pw\rRSET'),
    ('email', 'al\x00ice@example.com'),
])
def test_control_characters_are_refused_in_settings(alice, field, value):
    server, _, name = field.partition('.')
    body = json.loads(json.dumps(ACCOUNT))
    if name:
        body[server][name] = value
    else:
        body[server] = value
    resp = alice.post('/api/v1/accounts', body)
    assert_api_error(resp, 422, 'validation_failed')
    assert field in resp.json['fields']
    assert alice.get('/api/v1/accounts').json['items'] == []


def test_control_characters_are_refused_in_a_patch(alice, account):
    resp = alice.patch(f'/api/v1/accounts/{account["id"]}', {'incoming': {'password': 'x\r\nDELE 1'}})
    assert_api_error(resp, 422, 'validation_failed')
    assert 'incoming.password' in resp.json['fields']


# ---------------------------------------------------------------- limits (a web server of their own, low limits)

@pytest.fixture(scope='module')
def strict_web():
    server = WebServer(STATE['workdir'], name='web-strict', EMAILSVC_ACCOUNTS_MAX_PER_USER='2',
                       EMAILSVC_MAIL_UPLOAD_QUOTA_MB='1')
    yield server
    server.stop()


@pytest.fixture
def strict(strict_web, make_key, unique):
    return strict_web.client.as_key(make_key(unique, 'sam'))


def test_accounts_per_user_are_limited(strict, strict_web, make_key, unique):
    for n in range(2):
        assert strict.post('/api/v1/accounts', dict(ACCOUNT, email=f'a{n}@example.com')).status == 201
    assert_api_error(strict.post('/api/v1/accounts', ACCOUNT), 409, 'account_limit')
    # Another user of the same tenant has a limit of their own.
    other = strict_web.client.as_key(make_key(unique, 'tom'))
    assert other.post('/api/v1/accounts', ACCOUNT).status == 201
    one = strict.get('/api/v1/accounts').json['items'][0]['id']
    assert strict.delete(f'/api/v1/accounts/{one}').status == 204
    assert strict.post('/api/v1/accounts', ACCOUNT).status == 201


def upload(api, data, content_type='application/pdf', filename='f.pdf'):
    return api.request('POST', f'/api/v1/attachments?filename={filename}', raw=data,
                       headers={'Content-Type': content_type})


def test_uploads_have_a_per_user_quota(strict):
    half = os.urandom(600 * 1024)
    assert upload(strict, half).status == 201
    assert_api_error(upload(strict, os.urandom(600 * 1024)), 413, 'upload_quota_exceeded')
    assert upload(strict, os.urandom(300 * 1024)).status == 201


@pytest.mark.parametrize('content_type', [
    'text/h@ml', 'nonsense', 'text/', '/plain', 'text/plain; charset', 'multipart/mixed',
    'message/rfc822', 'text/pl ain', 'text/plain; name="a\\"b', 'image/svg+xml; x=\x01',
])
def test_upload_content_type_must_be_a_media_type(alice, content_type):
    form = (b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n'
            b'Content-Type: ' + content_type.encode('latin-1') + b'\r\n\r\nhello\r\n--XyZ--\r\n')
    resp = alice.request('POST', '/api/v1/attachments', raw=form,
                         headers={'Content-Type': 'multipart/form-data; boundary=XyZ'})
    if resp.status == 400:    # the multipart parser itself refused the part (a line break in a header)
        assert_api_error(resp, 400, 'invalid_multipart')
    else:
        assert_api_error(resp, 422, 'validation_failed')
        assert 'content_type' in resp.json['fields']


@pytest.mark.parametrize('given, stored', [
    ('application/pdf', 'application/pdf'), ('Text/HTML; charset="utf-8"', 'text/html'),
    ('image/svg+xml', 'image/svg+xml'), ('', 'application/octet-stream'),
])
def test_good_content_types_are_stored_bare(alice, given, stored):
    form = (b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n' +
            (b'Content-Type: ' + given.encode() + b'\r\n' if given else b'') + b'\r\nhello\r\n--XyZ--\r\n')
    resp = alice.request('POST', '/api/v1/attachments', raw=form,
                         headers={'Content-Type': 'multipart/form-data; boundary=XyZ'})
    assert resp.status == 201 and resp.json['content_type'] == stored, resp.text


def test_unused_uploads_expire_with_their_blobs(alice, account):
    tenant_id, user_id = alice.ids
    ids = {name: upload(alice, data).json['id'] for name, data in (
        ('unused', b'unused bytes ' + os.urandom(8)), ('queued', b'queued bytes ' + os.urandom(8)),
        ('fresh', b'fresh bytes'), ('old_twin', b'fresh bytes'))}
    with models.tenant_scope(tenant_id):
        old = models.utcnow() - datetime.timedelta(hours=25)
        models.Upload.update(created_at=old).where(models.Upload.id.in_(
            [ids['unused'], ids['queued'], ids['old_twin']])).execute()
        blobs = {name: models.Upload.get_by_id(i).blob for name, i in ids.items()}
        # A send accepted but not yet delivered names its uploads only in its task arguments.
        task_id = uuid.uuid4().hex
        models.TaskRecord.create(id=task_id, tenant_id=tenant_id, user_id=user_id, name=tasks.send_email.name,
                                 state='retrying', args={'attachment_ids': [ids['queued']]})
        models.Outbox.create(client=account['id'], user_id=user_id, task_id=task_id, message_id='<q@x>',
                             state='queued')
    assert tasks.expire_uploads(models.utcnow()) >= 2
    with models.tenant_scope(tenant_id):
        left = {u.id for u in models.Upload.select().where(models.Upload.user_id == user_id)}
        assert left == {ids['queued'], ids['fresh']}
        have = {b.id for b in models.Blob.select(models.Blob.id).where(models.Blob.id.in_(list(blobs.values())))}
    assert blobs['unused'] not in have
    assert {blobs['queued'], blobs['fresh']} <= have      # the fresh twin keeps the shared bytes
    # Once that send has gone out, its upload expires too.
    with models.all_tenants():
        models.TaskRecord.update(state='succeeded').where(models.TaskRecord.id == task_id).execute()
        models.Outbox.update(state='sent').where(models.Outbox.task_id == task_id).execute()
    tasks.expire_uploads(models.utcnow())
    with models.tenant_scope(tenant_id):
        assert {u.id for u in models.Upload.select().where(models.Upload.user_id == user_id)} == {ids['fresh']}


def test_hourly_cleanup_reports_expired_uploads():
    with models.all_tenants():
        assert 'uploads_removed' in tasks.cleanup_stale_results.func.__wrapped__()


# ---------------------------------------------------------------- var/ is private

def test_a_fresh_var_is_private(tmp_path):
    var = tmp_path / 'var'
    env = {k: v for k, v in python_env().items() if k not in (
        'EMAILSVC_SERVER_SECRET', 'EMAILSVC_SECURITY_CREDENTIAL_KEYS')}
    env.update(EMAILSVC_VAR=str(var), EMAILSVC_DATABASE_URL=f'sqlite:///{var}/emailsvc.db',
               EMAILSVC_QUEUE_URL=f'sqlite:///{var}/queue.db')
    done = subprocess.run([sys.executable, 'emailsvc.py', 'migrate'], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, preexec_fn=lambda: os.umask(0o022))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(var.stat().st_mode) == 0o700
    names = {p.name for p in var.iterdir()}
    assert {'emailsvc.db', 'queue.db', 'secret.key', 'fernet.key'} <= names, names
    for path in var.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, (path.name, oct(path.stat().st_mode))


# ---------------------------------------------------------------- bad input is a 4xx with the JSON shape

def raw_request(web, method, path, headers=(), body=b''):
    """Send exactly these bytes as headers: urllib would encode or refuse them."""
    conn = http.client.HTTPConnection('127.0.0.1', web.port, timeout=15)
    conn.putrequest(method, path, skip_accept_encoding=True)
    for name, value in headers:
        conn.putheader(name, value)
    if body:
        conn.putheader('Content-Length', str(len(body)))
    conn.endheaders(body or None)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.getheader('Content-Type') or '', data


BIG = str(2 ** 64)
NESTED = b'[' * 100_000 + b']' * 100_000
NESTED_OBJECT = b'{"email": ' + b'{"a": ' * 50_000 + b'1' + b'}' * 50_000 + b'}'


def bad_requests(account_id):
    """(label, method, path, body or raw bytes, extra headers, key?, allowed statuses)."""
    create = json.loads(json.dumps(ACCOUNT))
    cases = []
    for server in ('incoming', 'smtp'):
        for value in (None, 5, True, False, 'x', []):
            body = dict(create, **{server: value})
            ok = (201,) if (server, value) == ('smtp', None) else (422,)   # "smtp": null is an account without SMTP
            cases.append((f'{server}={value!r}', 'POST', '/api/v1/accounts', body, {}, True, ok))
        cases.append((f'{server} missing', 'POST', '/api/v1/accounts',
                      {k: v for k, v in create.items() if k != server}, {}, True, (201, 422)))
        cases.append((f'patch {server}=5', 'PATCH', f'/api/v1/accounts/{account_id}', {server: 5}, {}, True, (422,)))
    cases += [
        ('nested array', 'POST', '/api/v1/accounts', NESTED, {}, True, (400,)),
        ('nested object', 'POST', '/api/v1/accounts', NESTED_OBJECT, {}, True, (400,)),
        ('nested, no key', 'POST', '/api/v1/accounts', NESTED, {}, False, (401,)),
        ('huge account id', 'GET', f'/api/v1/accounts/{BIG}', None, {}, True, (404,)),
        ('huge account id patch', 'PATCH', f'/api/v1/accounts/{BIG}', {'sync_interval': 600}, {}, True, (404,)),
        ('huge account id sync', 'POST', f'/api/v1/accounts/{BIG}/sync', {}, {}, True, (404,)),
        ('huge folders id', 'GET', f'/api/v1/accounts/{BIG}/folders', None, {}, True, (404,)),
        ('huge message id', 'GET', f'/api/v1/messages/{BIG}', None, {}, True, (404,)),
        ('huge attachment id', 'GET', f'/api/v1/messages/1/attachments/{BIG}', None, {}, True, (404,)),
        ('huge id, no key', 'GET', f'/api/v1/messages/{BIG}', None, {}, False, (401,)),
        ('2**63 id', 'GET', f'/api/v1/accounts/{2 ** 63}', None, {}, True, (404,)),
        ('huge account filter', 'GET', f'/api/v1/messages?account_id={BIG}', None, {}, True, (422,)),
        ('huge folder filter', 'GET', f'/api/v1/messages?folder_id={BIG}', None, {}, True, (422,)),
        ('huge cursor', 'GET', f'/api/v1/messages?cursor={BIG}', None, {}, True, (422,)),
        ('huge limit', 'GET', f'/api/v1/tasks?limit={BIG}', None, {}, True, (422,)),
        ('huge sync folder', 'POST', f'/api/v1/accounts/{account_id}/sync', {'folder_id': 2 ** 64}, {}, True, (422,)),
        ('huge delete ids', 'POST', '/api/v1/messages/delete', {'email_ids': [2 ** 64]}, {}, True, (422,)),
        ('huge attachment ids', 'POST', f'/api/v1/accounts/{account_id}/send',
         {'to': ['a@example.net'], 'attachment_ids': [2 ** 64]}, {}, True, (422,)),
        ('non-UTF-8 Authorization', 'GET', '/api/v1/accounts', None,
         {'Authorization': b'Bearer \xff\xfe\x80'}, False, (401,)),
        ('non-UTF-8 X-Request-ID', 'GET', '/api/v1/accounts', None, {'X-Request-ID': b'\xff\xfe'}, True, (200,)),
        ('non-UTF-8 X-Request-ID, no key', 'GET', '/api/v1/tasks', None, {'X-Request-ID': b'\xc3\x28'}, False, (401,)),
        ('non-UTF-8 Idempotency-Key', 'POST', f'/api/v1/accounts/{account_id}/send', {'to': ['a@example.net']},
         {'Idempotency-Key': b'\xff\xfe'}, True, (422,)),
        ('non-UTF-8 filename header', 'POST', '/api/v1/attachments', b'data',
         {'X-Filename': b'\xff.pdf', 'Content-Type': b'application/pdf'}, True, (201,)),
        ('non-UTF-8 content type', 'POST', '/api/v1/attachments?filename=a.pdf', b'data',
         {'Content-Type': b'application/\xff'}, True, (422,)),
    ]
    return cases


def test_bad_input_is_a_4xx_with_the_json_shape(web, alice, account):
    # The send cases need an account with SMTP that is the caller's; sync stays off (the hosts do not exist).
    failures = []
    for label, method, path, body, headers, with_key, statuses in bad_requests(account['id']):
        sent = [(name, value) for name, value in headers.items()]
        if with_key and 'Authorization' not in headers:
            sent.append(('Authorization', f'Bearer {alice.key}'))
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            sent.append(('Content-Type', 'application/json'))
        status, ctype, data = raw_request(web, method, path, sent, body or b'')
        try:
            shaped = ctype.startswith('application/json') and (status < 300 or {'error', 'message'} <= set(json.loads(data)))
        except ValueError:
            shaped = False
        if status not in statuses or not shaped:
            failures.append(f'{label}: {status} {ctype} {data[:200]!r}')
    assert not failures, '\n'.join(failures)
