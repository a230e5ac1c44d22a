"""Accounts that heal and rest: a first sync at once, backoff while failing, no retries of a rejected login."""
import datetime
import time
import types

import models
import tasks
from tests.conftest import STATE, wait_for_state
from tests.test_send import smtp_server  # noqa: F401 (fixture)
from tests.test_stop import Service
from tests.test_sync import PASSWORD, first_sync_settled, message, messages, user  # noqa: F401 (fixture)
from tests.test_sync import Mailbox, count_queries, mailbox, wsgi_get  # noqa: F401 (fixture)


def create(api, mailbox, password=PASSWORD):
    resp = api.post('/api/v1/accounts', {
        'email': f'{mailbox.user}@example.com',
        'incoming': {'protocol': 'imap', 'host': '127.0.0.1', 'port': mailbox.dovecot.imap_port,
                     'security': 'none', 'username': mailbox.user, 'password': password}})
    assert resp.status == 201, resp.text
    return resp.json


def periodic(now):
    with models.all_tenants():
        return tasks.periodic_sync.task_class.func(now=now)['task_ids']


def test_creating_an_account_starts_its_first_sync(user, mailbox, consumer):
    mailbox.append(message(1), message(2))
    account = create(user, mailbox)
    assert account['sync_task_id']
    assert wait_for_state(account['sync_task_id'], 'succeeded').result['messages_synced'] == 2
    assert len(messages(user, account_id=account['id'])) == 2
    now = user.get(f'/api/v1/accounts/{account["id"]}').json
    assert now['sync_state'] == 'idle' and now['consecutive_failures'] == 0
    due = datetime.datetime.fromisoformat(now['next_sync_at'].rstrip('Z'))
    assert 299 <= (due - datetime.datetime.fromisoformat(now['last_sync_at'].rstrip('Z'))).total_seconds() <= 301


def test_a_rejected_login_rests_until_a_patch_fixes_it(user, mailbox, consumer):
    account = create(user, mailbox, password='wrong')
    wait_for_state(account['sync_task_id'], 'failed')
    broken = user.get(f'/api/v1/accounts/{account["id"]}').json
    assert broken['sync_state'] == 'auth_error' and broken['last_error'] and broken['next_sync_at'] is None
    assert account['id'] not in due_accounts(models.utcnow() + datetime.timedelta(days=30))
    mailbox.append(message(1))
    fixed = user.patch(f'/api/v1/accounts/{account["id"]}', {'incoming': {'password': PASSWORD}})
    assert fixed.status == 200, fixed.text
    assert fixed.json['sync_task_id'] != account['sync_task_id']   # the fix starts a sync at once
    assert wait_for_state(fixed.json['sync_task_id'], 'succeeded').result['messages_synced'] == 1
    healed = user.get(f'/api/v1/accounts/{account["id"]}').json
    assert (healed['sync_state'], healed['last_error'], healed['consecutive_failures']) == ('idle', None, 0)
    assert healed['next_sync_at'] is not None


def due_accounts(now):
    return {client.id for client in models.due_for_sync(now)}


def test_a_failing_account_backs_off_doubling_up_to_the_cap(user, mailbox):
    account = user.post('/api/v1/accounts', {
        'email': 'x@example.com', 'sync_enabled': False, 'sync_interval': 300,
        'incoming': {'protocol': 'imap', 'host': '127.0.0.1', 'port': 1, 'security': 'none',
                     'username': 'x', 'password': 'p'}}).json
    start = models.utcnow()
    pauses = []
    with models.all_tenants():
        for _ in range(9):
            client = models.EmailClient.get_by_id(account['id'])
            tasks.end_sync(client, 'error', 'cannot reach 127.0.0.1:1', now=start)
            pauses.append((models.EmailClient.get_by_id(account['id']).next_sync_at - start).total_seconds())
        assert pauses == [600, 1200, 2400, 4800, 9600, 19200, 21600, 21600, 21600]
        tasks.end_sync(models.EmailClient.get_by_id(account['id']), 'idle', None, now=start)
        healed = models.EmailClient.get_by_id(account['id'])
    assert (healed.failures, (healed.next_sync_at - start).total_seconds()) == (0, 300)


def test_the_account_list_runs_the_same_few_queries_for_50_accounts(user):
    tenant_id, user_id = user.ids

    def add(n):   # straight in the database, unwatched: the list only reads them
        with models.tenant_scope(tenant_id):
            return models.EmailClient.create(
                user_id=user_id, email=f'a{n}@example.org', incoming_protocol='imap', incoming_host='127.0.0.1',
                incoming_port=1, incoming_security='none', incoming_username=f'a{n}', push=False,
                next_sync_at=None).id

    ids = [add(0)]
    one = count_queries(lambda: wsgi_get('/api/v1/accounts', user.key))
    ids += [add(n) for n in range(1, 50)]
    watched = models.WatchLease.create(client=ids[7], holder='test:0:x', expires=time.time() + 600, state='idling')
    try:
        answers = []
        many = count_queries(lambda: answers.append(wsgi_get('/api/v1/accounts', user.key)))
    finally:
        watched.delete_instance()
    assert len(one) == len(many) <= 4, many   # the key, the accounts, their passwords, their watch leases
    (status, body), = answers
    assert status.startswith('200') and [a['id'] for a in body['items']] == ids
    assert {a['id']: a['push_state'] for a in body['items']} == {i: 'idling' if i == ids[7] else None for i in ids}


def test_periodic_sync_lets_tenants_take_turns():
    a1, a2, a3, b1, c1 = (types.SimpleNamespace(tenant_id=t, name=n)
                          for t, n in ((1, 'a1'), (1, 'a2'), (1, 'a3'), (2, 'b1'), (3, 'c1')))
    order = models.interleave_by_tenant([a1, a2, a3, b1, c1])
    assert [c.name for c in order] == ['a1', 'b1', 'c1', 'a2', 'a3']


def test_a_rotated_key_is_used_without_a_restart(tmp_path, smtp_server):
    """rotate-key while the service runs: the next sync and send succeed at once, no retry."""
    service = Service(tmp_path, 'rotate', ca_files=f'{STATE["dovecot"].cert_path},{smtp_server.cert_path}')
    service.env.pop('EMAILSVC_SECURITY_CREDENTIAL_KEYS', None)   # var/fernet.key, which rotate-key rewrites
    mailbox = Mailbox(STATE['dovecot'], 'rotate' + tmp_path.name[-6:].replace('_', ''))
    smtp_server.add_user(mailbox.user, PASSWORD)
    service.command('admin', 'create-tenant', 'rotate')
    key = service.command('admin', 'create-key', '--tenant', 'rotate', '--user', 'alice').strip().splitlines()[-1]
    service.start()
    try:
        api = service.api.as_key(key)
        mailbox.append(message(1))
        account = api.post('/api/v1/accounts', {
            'email': f'{mailbox.user}@example.com', 'copy_sent': False,
            'incoming': {'protocol': 'imap', 'host': '127.0.0.1', 'port': mailbox.dovecot.imap_port,
                         'security': 'none', 'username': mailbox.user, 'password': PASSWORD},
            'smtp': {'host': '127.0.0.1', 'port': smtp_server.port, 'security': 'starttls',
                     'username': mailbox.user, 'password': PASSWORD}}).json
        assert service.wait_task(api, account['sync_task_id'], 'succeeded')['attempts'] == 1
        said = service.command('admin', 'rotate-key', '--generate')
        assert 're-encrypted 2 credentials' in said and 'No restart needed' in said
        mailbox.append(message(2))
        sync = api.post(f'/api/v1/accounts/{account["id"]}/sync', {}).json
        assert service.wait_task(api, sync['task_id'], 'succeeded')['attempts'] == 1
        send = api.post(f'/api/v1/accounts/{account["id"]}/send', {'to': ['bob@example.net'], 'body_text': 'hi'}).json
        assert service.wait_task(api, send['task_id'], 'succeeded')['attempts'] == 1
        changed = api.patch(f'/api/v1/accounts/{account["id"]}', {'smtp': {'password': PASSWORD}})
        assert changed.status == 200   # stored by the web process under the new key, read by the worker
        again = api.post(f'/api/v1/accounts/{account["id"]}/send', {'to': ['bob@example.net'], 'body_text': 'hi'}).json
        assert service.wait_task(api, again['task_id'], 'succeeded')['attempts'] == 1
    finally:
        service.ctrl_c()
        service.wait_stopped()


def test_tls_spoken_to_a_plain_port_fails_at_once_with_a_hint(user, mailbox, consumer):
    resp = user.post('/api/v1/accounts', {
        'email': f'{mailbox.user}@example.com',
        'incoming': {'protocol': 'imap', 'host': '127.0.0.1', 'port': mailbox.dovecot.imap_port,
                     'security': 'tls', 'username': mailbox.user, 'password': PASSWORD}})
    row = wait_for_state(resp.json['sync_task_id'], 'failed', 'retrying', 'dead', timeout=30)
    assert (row.state, row.attempts) == ('failed', 1)   # retrying cannot help: no retry
    account = user.get(f'/api/v1/accounts/{resp.json["id"]}').json
    assert account['sync_state'] == 'error' and account['last_error_code'] == 'tls_on_plain_port'
    assert 'try security "starttls" or "none", or port 993' in account['last_error']


def test_a_rejected_login_says_so_by_its_code(user, mailbox, consumer):
    account = create(user, mailbox, password='wrong')
    wait_for_state(account['sync_task_id'], 'failed')
    assert user.get(f'/api/v1/accounts/{account["id"]}').json['last_error_code'] == 'auth_rejected'


def test_the_egress_policy_refuses_loopback_unless_allowed(tmp_path, smtp_server):
    """The test session allows 127.0.0.0/8; a service with the default policy refuses the same server."""
    service = Service(tmp_path, 'egress', ca_files=f'{STATE["dovecot"].cert_path},{smtp_server.cert_path}')
    service.env.pop('EMAILSVC_SECURITY_ALLOWED_NETWORKS')
    mailbox = Mailbox(STATE['dovecot'], 'egress' + tmp_path.name[-6:].replace('_', ''))
    service.command('admin', 'create-tenant', 'egress')
    key = service.command('admin', 'create-key', '--tenant', 'egress', '--user', 'alice').strip().splitlines()[-1]
    service.start()
    try:
        api = service.api.as_key(key)
        account = api.post('/api/v1/accounts', {
            'email': f'{mailbox.user}@example.com',
            'incoming': {'protocol': 'imap', 'host': '127.0.0.1', 'port': mailbox.dovecot.imap_port,
                         'security': 'none', 'username': mailbox.user, 'password': PASSWORD}}).json
        row = service.wait_task(api, account['sync_task_id'], 'failed')
        assert row['attempts'] == 1 and 'is not an address this service may connect to' in row['error']
        stored = api.get(f'/api/v1/accounts/{account["id"]}').json
        where = f'127.0.0.1:{mailbox.dovecot.imap_port}'
        assert stored['last_error'] == (f'destination_not_allowed: {where} is not an address this service may '
                                        'connect to: the egress policy refuses loopback, link-local, metadata and '
                                        "denied networks; use the mail server's public name")
    finally:
        service.ctrl_c()
        service.wait_stopped()
