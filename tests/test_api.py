"""The HTTP API over a real waitress server: auth, accounts, tasks, errors."""
import json

import pytest

import models
import tasks
from taskq import ledger
from tests import probe_tasks
from tests.conftest import assert_api_error, every_page, wait_for_state

ACCOUNT = {
    'email': 'alice@example.com',
    'incoming': {'protocol': 'imap', 'host': 'imap.example.com', 'port': 993, 'security': 'tls',
                 'username': 'alice', 'password': 'incoming-S3cret!'},
    'smtp': {'host': 'smtp.example.com', 'port': 587, 'security': 'starttls',
             'username': 'alice', 'password': 'smtp-S3cret!'},
    'sync_enabled': False, 'sync_interval': 300,   # these hosts do not exist: no first sync
}


@pytest.fixture
def alice(client, make_key, unique):
    return client.as_key(make_key(unique, 'alice'))


@pytest.fixture
def account(alice):
    resp = alice.post('/api/v1/accounts', ACCOUNT)
    assert resp.status == 201, resp.text
    return resp.json


# ---------------------------------------------------------------- auth

def test_no_key_is_401(client):
    assert_api_error(client.get('/api/v1/accounts'), 401, 'unauthorized')


def test_unknown_key_is_401(client):
    assert_api_error(client.as_key('esk_not-a-real-key').get('/api/v1/accounts'), 401, 'unauthorized')


def test_wrong_scheme_is_401(client, make_key, unique):
    key = make_key(unique)
    resp = client.get('/api/v1/accounts', headers={'Authorization': f'Basic {key}'})
    assert_api_error(resp, 401, 'unauthorized')


def test_revoked_key_is_401(client, make_key, unique):
    key = make_key(unique)
    assert client.as_key(key).get('/api/v1/accounts').status == 200
    models.ApiKey.update(revoked_at=models.utcnow()).where(models.ApiKey.key_hash == models.hash_key(key)).execute()
    assert_api_error(client.as_key(key).get('/api/v1/accounts'), 401, 'unauthorized')


def test_other_tenants_account_is_404(client, account, make_key, unique):
    mallory = client.as_key(make_key(unique + 'x', 'mallory'))
    for resp in (mallory.get(f'/api/v1/accounts/{account["id"]}'),
                 mallory.patch(f'/api/v1/accounts/{account["id"]}', {'sync_interval': 600}),
                 mallory.delete(f'/api/v1/accounts/{account["id"]}')):
        assert_api_error(resp, 404, 'not_found')
    assert mallory.get('/api/v1/accounts').json['items'] == []


def test_other_users_account_in_same_tenant_is_404(client, account, make_key):
    with models.all_tenants():
        tenant_id = models.EmailClient.get_by_id(account['id']).tenant_id
    tenant = models.Tenant.get_by_id(tenant_id)
    bob = client.as_key(make_key(tenant.name, 'bob'))
    assert_api_error(bob.get(f'/api/v1/accounts/{account["id"]}'), 404, 'not_found')


def test_operator_sees_every_tenant_but_cannot_create_or_change_accounts(client, account, make_key):
    operator = client.as_key(make_key(operator=True))
    assert operator.get(f'/api/v1/accounts/{account["id"]}').json['email'] == 'alice@example.com'
    assert_api_error(operator.post('/api/v1/accounts', ACCOUNT), 403, 'forbidden')
    assert_api_error(operator.patch(f'/api/v1/accounts/{account["id"]}', {'sync_interval': 600}), 403, 'forbidden')


# ---------------------------------------------------------------- accounts

def test_create_returns_account_without_passwords(account):
    assert account['incoming'] == {'protocol': 'imap', 'host': 'imap.example.com', 'port': 993,
                                   'security': 'tls', 'username': 'alice', 'has_password': True}
    assert account['smtp']['has_password'] is True
    assert 'S3cret' not in json.dumps(account)


def test_passwords_are_encrypted_at_rest(account):
    with models.all_tenants():
        rows = list(models.Credential.select().where(models.Credential.client == account['id']))
    assert {row.kind for row in rows} == {'incoming', 'smtp'}
    assert all('S3cret' not in row.secret for row in rows)
    assert tasks.vault().decrypt(next(r for r in rows if r.kind == 'incoming').secret) == 'incoming-S3cret!'


def test_list_get_update_delete(alice, account):
    assert [a['id'] for a in alice.get('/api/v1/accounts').json['items']] == [account['id']]
    assert alice.get(f'/api/v1/accounts/{account["id"]}').json == account
    resp = alice.patch(f'/api/v1/accounts/{account["id"]}',
                       {'sync_interval': 900, 'incoming': {'port': 143, 'security': 'starttls',
                                                           'password': 'incoming-S3cret!'}})
    assert resp.status == 200, resp.text
    assert (resp.json['sync_interval'], resp.json['incoming']['port'], resp.json['incoming']['security'],
            resp.json['incoming']['host']) == (900, 143, 'starttls', 'imap.example.com')
    assert alice.delete(f'/api/v1/accounts/{account["id"]}').status == 204
    assert_api_error(alice.get(f'/api/v1/accounts/{account["id"]}'), 404, 'not_found')
    with models.all_tenants():
        assert models.Credential.select().where(models.Credential.client == account['id']).count() == 0


def test_patch_password_replaces_the_stored_one(alice, account):
    resp = alice.patch(f'/api/v1/accounts/{account["id"]}', {'incoming': {'password': 'new-S3cret'}})
    assert resp.status == 200, resp.text
    with models.all_tenants():
        row = models.Credential.get(models.Credential.client == account['id'], models.Credential.kind == 'incoming')
    assert tasks.vault().decrypt(row.secret) == 'new-S3cret'


def test_removing_smtp_drops_its_password(alice, account):
    resp = alice.patch(f'/api/v1/accounts/{account["id"]}', {'smtp': None})
    assert resp.status == 200 and resp.json['smtp'] is None
    with models.all_tenants():
        kinds = {r.kind for r in models.Credential.select().where(models.Credential.client == account['id'])}
    assert kinds == {'incoming'}


@pytest.mark.parametrize('change, field', [
    ({'email': 'not-an-address'}, 'email'),
    ({'incoming': dict(ACCOUNT['incoming'], protocol='exchange')}, 'incoming.protocol'),
    ({'incoming': dict(ACCOUNT['incoming'], port=70000)}, 'incoming.port'),
    ({'incoming': dict(ACCOUNT['incoming'], port='993')}, 'incoming.port'),
    ({'incoming': dict(ACCOUNT['incoming'], security='ssl')}, 'incoming.security'),
    ({'incoming': dict(ACCOUNT['incoming'], password='')}, 'incoming.password'),
    ({'incoming': dict(ACCOUNT['incoming'], host='bad host name')}, 'incoming.host'),
    ({'smtp': dict(ACCOUNT['smtp'], port=0)}, 'smtp.port'),
    ({'sync_interval': 5}, 'sync_interval'),
    ({'sync_enabled': 'yes'}, 'sync_enabled'),
    ({'colour': 'blue'}, 'colour'),
])
def test_invalid_account_gets_field_level_errors(alice, change, field):
    resp = alice.post('/api/v1/accounts', dict(ACCOUNT, **change))
    assert_api_error(resp, 422, 'validation_failed')
    assert field in resp.json['fields'], resp.json


def test_missing_incoming_lists_every_missing_field(alice):
    resp = alice.post('/api/v1/accounts', {'email': 'a@example.com', 'incoming': {}})
    assert_api_error(resp, 422, 'validation_failed')
    assert {'incoming.protocol', 'incoming.host', 'incoming.port', 'incoming.security',
            'incoming.username', 'incoming.password'} <= set(resp.json['fields'])


def test_invalid_json_is_400(alice):
    resp = alice.request('POST', '/api/v1/accounts', raw=b'{"email": ', headers={'Content-Type': 'application/json'})
    assert_api_error(resp, 400, 'invalid_json')


def test_json_that_is_not_an_object_is_422(alice):
    assert_api_error(alice.post('/api/v1/accounts', ['a']), 422, 'invalid_body')


def test_oversized_body_is_413(alice):
    resp = alice.post('/api/v1/accounts', dict(ACCOUNT, email='a' * 11_000_000))
    assert_api_error(resp, 413, 'too_large')


def test_unknown_route_and_wrong_method_are_json(client):
    assert_api_error(client.get('/api/v1/nowhere'), 404, 'http_404')
    assert_api_error(client.request('PUT', '/api/v1/accounts'), 405, 'http_405')


def test_request_id_is_echoed(alice):
    resp = alice.get('/api/v1/accounts', headers={'X-Request-ID': 'trace-me-42'})
    assert resp.headers['X-Request-ID'] == 'trace-me-42'


# ---------------------------------------------------------------- tasks

def tenant_and_user(key):
    row = models.ApiKey.lookup(key)
    return row.tenant_id, row.user_id


@pytest.fixture
def alice_ids(alice):
    return tenant_and_user(alice.key)


def test_task_get_and_list_filters(alice, alice_ids, consumer):
    tenant_id, user_id = alice_ids
    done = tasks.noop(tenant_id=tenant_id, user_id=user_id)
    failed = probe_tasks.refuses(tenant_id=tenant_id, user_id=user_id)
    wait_for_state(done.id, 'succeeded')
    wait_for_state(failed.id, 'failed')
    body = alice.get(f'/api/v1/tasks/{done.id}').json
    assert (body['task_id'], body['name'], body['state'], body['attempts'], body['result']) == \
        (done.id, 'noop', 'succeeded', 1, {'status': 'ok'})
    assert [t['task_id'] for t in alice.get('/api/v1/tasks?state=failed').json['items']] == [failed.id]
    assert [t['task_id'] for t in alice.get('/api/v1/tasks?name=noop').json['items']] == [done.id]
    assert alice.get('/api/v1/tasks?since=2999-01-01T00:00:00Z').json['items'] == []
    assert len(alice.get('/api/v1/tasks?since=2000-01-01T00:00:00Z').json['items']) == 2


def test_task_list_pages_with_a_cursor(alice, alice_ids):
    tenant_id, user_id = alice_ids
    ids = {probe_tasks.sleeps.s(0, tenant_id=tenant_id, user_id=user_id, delay=3600).id for _ in range(5)}
    for task_id in ids:
        ledger.insert(task_id, state=ledger.PENDING, name='sleeps', tenant_id=tenant_id, user_id=user_id)
    seen = every_page(alice, '/api/v1/tasks?limit=2', 'task_id', pages=5)
    assert sorted(seen) == sorted(ids) and len(seen) == 5


def test_bad_task_filters_are_422(alice):
    assert_api_error(alice.get('/api/v1/tasks?state=lost'), 422, 'invalid_filter')
    assert_api_error(alice.get('/api/v1/tasks?since=yesterday'), 422, 'invalid_filter')
    assert_api_error(alice.get('/api/v1/tasks?limit=0'), 422, 'invalid_filter')


def test_other_tenants_task_is_404(client, alice_ids, make_key, unique, consumer):
    tenant_id, user_id = alice_ids
    task = tasks.noop(tenant_id=tenant_id, user_id=user_id)
    mallory = client.as_key(make_key(unique + 'm', 'mallory'))
    assert_api_error(mallory.get(f'/api/v1/tasks/{task.id}'), 404, 'not_found')
    assert_api_error(mallory.delete(f'/api/v1/tasks/{task.id}'), 404, 'not_found')
    assert_api_error(mallory.post(f'/api/v1/tasks/{task.id}/retry'), 404, 'not_found')
    assert mallory.get('/api/v1/tasks').json['items'] == []


def test_revoke_pending_task(alice, alice_ids, consumer):
    tenant_id, user_id = alice_ids
    task = probe_tasks.sleeps.s(0, tenant_id=tenant_id, user_id=user_id, delay=1)
    tasks.huey.enqueue(task)
    resp = alice.delete(f'/api/v1/tasks/{task.id}')
    assert resp.status == 200 and resp.json['state'] == 'revoked', resp.text
    assert alice.delete(f'/api/v1/tasks/{task.id}').status == 204  # a finished task is purged
    assert_api_error(alice.get(f'/api/v1/tasks/{task.id}'), 404, 'not_found')


def test_running_task_cannot_be_revoked(alice, alice_ids, consumer):
    tenant_id, user_id = alice_ids
    task = probe_tasks.sleeps(1, tenant_id=tenant_id, user_id=user_id)
    wait_for_state(task.id, 'running')
    assert_api_error(alice.delete(f'/api/v1/tasks/{task.id}'), 409, 'not_revocable')


def test_dead_tasks_are_listed(alice, alice_ids, consumer):
    tenant_id, user_id = alice_ids
    task = probe_tasks.always_fails(tenant_id=tenant_id, user_id=user_id)
    wait_for_state(task.id, 'dead', timeout=20)
    assert [t['task_id'] for t in alice.get('/api/v1/tasks?state=dead').json['items']] == [task.id]


def test_retry_a_failed_task_runs_it_again_on_the_same_record(alice, alice_ids, consumer):
    tenant_id, user_id = alice_ids
    task = tasks.check_spam(1, tenant_id=tenant_id, user_id=user_id)  # not this user's: fails at once
    wait_for_state(task.id, 'failed')
    resp = alice.post(f'/api/v1/tasks/{task.id}/retry', headers={'X-Request-ID': f'retry-{task.id[:8]}'})
    assert resp.status == 202 and resp.json == {'task_id': task.id, 'status': 'pending'}, resp.text
    row = wait_for_state(task.id, 'failed')
    assert row.attempts == 2 and 'no message 1' in row.error
    # The request id travels with the task into the worker's log lines and the ledger.
    assert row.request_id == f'retry-{task.id[:8]}'
    worker_lines = [json.loads(line) for line in consumer.log.read_text().splitlines()
                    if line.startswith('{') and f'retry-{task.id[:8]}' in line]
    assert any(line.get('task_id') == task.id and line['level'] == 'ERROR' for line in worker_lines)


def test_retry_of_a_successful_task_is_409(alice, alice_ids, consumer):
    tenant_id, user_id = alice_ids
    task = tasks.noop(tenant_id=tenant_id, user_id=user_id)
    wait_for_state(task.id, 'succeeded')
    assert_api_error(alice.post(f'/api/v1/tasks/{task.id}/retry'), 409, 'not_retryable')
