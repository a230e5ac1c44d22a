"""Fault tests with real processes: consumers SIGKILLed under load, servers restarted, SQLite contention."""
import random
import sqlite3
import threading
import time

import pytest

import models
import tasks
from taskq import ledger
from tests import probe_tasks, services
from tests.conftest import MODE, STATE, assert_api_error, record, wait_for, wait_for_state
from tests.test_send import MAIL, sender, smtp_server  # noqa: F401 (fixtures)
from tests.test_sync import FIRST_SYNC, Mailbox, add_account, message, sync, user  # noqa: F401 (fixture)


def final(ids):
    with models.all_tenants():
        rows = list(models.TaskRecord.select().where(models.TaskRecord.id.in_(list(ids))))
    return {r.id: r for r in rows if r.state in ledger.FINAL_STATES}


def test_mixed_load_survives_five_consumer_kills(sender, smtp_server, consumer):
    sender.mailbox.append(*(message(n) for n in range(20)))
    sync(sender, sender.account)
    with models.all_tenants():
        message_ids = [m.id for m in models.EmailMessage.select().where(
            models.EmailMessage.client == sender.account)]
    rng = random.Random(5)
    accepted, sends = [], []
    for n in range(200):
        kind = n % 5
        if kind == 0:
            resp = sender.post(f'/api/v1/accounts/{sender.account}/send', dict(MAIL, subject=f'load {n}'))
            sends.append(resp.json['task_id'])
        elif kind == 1:
            resp = sender.post(f'/api/v1/accounts/{sender.account}/sync')
        elif kind == 2 and message_ids:
            resp = sender.post('/api/v1/messages/delete', {'email_ids': [message_ids.pop()]})
        else:
            resp = None
            accepted.append(tasks.noop(*sender.ids).id)
        if resp is not None:
            assert resp.status == 202, resp.text
            accepted.append(resp.json['task_id'])
        if n % 40 == 20:  # five kills at moments the load decides
            time.sleep(rng.uniform(0, 0.2))
            consumer.kill()
            consumer.start()
    accepted = set(accepted)
    wait_for(lambda: len(final(accepted)) == len(accepted), timeout=120, interval=0.5,
             message='every accepted task to reach a final state')
    states = [r.state for r in final(accepted).values()]
    assert states.count('succeeded') + states.count('failed') + states.count('dead') == len(accepted)
    delivered = {r.result['message_id'] for r in final(sends).values() if r.state == 'succeeded'}
    received = [m['data'] for m in smtp_server.received()]
    assert len(received) == len({m.split(b'Message-ID: ', 1)[1].split(b'\r\n', 1)[0] for m in received}), \
        'a message was delivered twice'
    assert len(received) >= len(delivered)
    with models.all_tenants():
        unknown = models.Outbox.select().where(models.Outbox.task_id.in_(sends),
                                               models.Outbox.state == 'unknown').count()
    assert len(received) <= len(sends) and len(received) >= len(sends) - unknown


@pytest.mark.skipif(MODE != 'scaleout', reason='Redis and PostgreSQL run only in the scale-out mode')
def test_redis_and_postgres_restarts_lose_nothing(client, make_key, unique, consumer):
    api = client.as_key(make_key(unique))
    ids = [tasks.noop().id for _ in range(20)]
    for server in (STATE['redis'], STATE['postgres']):
        server.stop()
        if server is STATE['postgres']:
            assert_api_error(api.get('/api/v1/accounts'), 503, 'unavailable')
        else:
            assert client.get('/health/detailed').status == 503
        server.restart()
        wait_for(lambda: client.get('/health/detailed').status == 200, timeout=30,
                 message='the service to see the dependency again')
        ids += [tasks.noop().id for _ in range(20)]
    wait_for(lambda: len(final(ids)) == len(ids), timeout=120, interval=0.5,
             message='every task to finish after the restarts')


@pytest.mark.skipif(MODE != 'embedded', reason='the embedded queue is an SQLite file')
def test_a_queue_file_held_by_a_stopped_process_answers_503_and_keeps_no_record(user, unique, consumer):
    """A consumer stopped (SIGSTOP) inside a write of the embedded queue holds the file's lock until it
    resumes (the 10-minute embedded soak met it): an enqueue meanwhile fails after the queue's busy
    timeout with sqlite3's own error, which is an outage (503 unavailable, retry), not a 500; and the
    task it would have been is not on record."""
    account = add_account(user, Mailbox(STATE['dovecot'], unique))
    wait_for_state(FIRST_SYNC.pop(account), 'succeeded', timeout=60)
    with models.all_tenants():
        records = models.TaskRecord.select().where(models.TaskRecord.tenant_id == user.ids[0]).count()
    lock = sqlite3.connect(STATE['env']['EMAILSVC_QUEUE_URL'].removeprefix('sqlite:///'), isolation_level=None)
    lock.execute('BEGIN EXCLUSIVE')   # as the stopped process's open write transaction
    try:
        # the queue's busy timeout is 15 s (taskq.service.make_huey), after a second's turn (storage.WriteTurns)
        assert_api_error(user.post(f'/api/v1/accounts/{account}/sync', {}, timeout=40), 503, 'unavailable')
    finally:
        lock.rollback()
        lock.close()
    with models.all_tenants():
        assert models.TaskRecord.select().where(models.TaskRecord.tenant_id == user.ids[0]).count() == records
    assert user.post(f'/api/v1/accounts/{account}/sync', {}).status == 202   # and on again once it resumes


@pytest.fixture(scope='module')
def own_dovecot(tmp_path_factory):
    """A Dovecot for this module alone: stopping it mid-test must not disturb the session's."""
    dovecot = services.start_dovecot(tmp_path_factory.mktemp('dovecot'))
    yield dovecot
    dovecot.stop()


def test_imap_server_stopped_mid_sync_is_retried_and_stores_each_message_once(user, own_dovecot, unique, consumer):
    mailbox = Mailbox(own_dovecot, unique)
    with mailbox.session() as s:
        for n in range(1500):
            s.append('INBOX', message(n, body='x' * 8000))
    account = add_account(user, mailbox)
    task_id = FIRST_SYNC.pop(account)   # the sync creating the account started
    wait_for(lambda: (r := record(task_id)) and (r.progress_done or 0) >= 100, timeout=30, interval=0.005,
             message='the sync to commit a few batches')
    own_dovecot.stop()   # its imap processes first: the sync's connection goes with them
    try:
        retrying = wait_for_state(task_id, 'retrying', timeout=20)
        assert 'connection' in retrying.error.lower() or 'closed' in retrying.error.lower(), retrying.error
    finally:
        own_dovecot.restart()
    row = wait_for_state(task_id, 'succeeded', timeout=60)
    assert row.attempts >= 2
    with models.all_tenants():
        uids = [m.uid for m in models.EmailMessage.select().where(models.EmailMessage.client == account)]
    assert len(uids) == 1500 == len(set(uids))


@pytest.mark.skipif(MODE != 'scaleout', reason='Redis runs only in the scale-out mode')
def test_a_task_that_ends_while_redis_is_down_is_recorded_at_once(consumer):
    task = probe_tasks.sleeps(1.0)
    wait_for_state(task.id, 'running', timeout=20)
    STATE['redis'].stop()   # Huey drops the task's revoke key after the run: that fails now
    try:
        row = wait_for_state(task.id, 'succeeded', timeout=20)
    finally:
        STATE['redis'].restart()
    assert row.attempts == 1


@pytest.mark.skipif(MODE != 'scaleout', reason='PostgreSQL runs only in the scale-out mode')
def test_a_task_that_ends_while_postgres_is_down_is_recorded_once_it_is_back(consumer):
    task = probe_tasks.sleeps(1.5)
    wait_for_state(task.id, 'running', timeout=20)
    STATE['postgres'].stop()   # the task is still asleep: its end comes during the outage
    try:
        wait_for(lambda: f'ledger write for task {task.id} deferred' in consumer.log.read_text(errors='replace'),
                 timeout=30, message='the worker to find the database gone when the task ended')
    finally:
        STATE['postgres'].restart()
    models.database.close()   # our pooled connection died with the server
    row = wait_for_state(task.id, 'succeeded', timeout=30)
    assert row.attempts == 1 and row.result['slept'] == 1.5


@pytest.mark.skipif(MODE != 'embedded', reason='SQLite locking matters in the embedded mode')
def test_concurrent_web_and_consumer_writes_never_fail(client, make_key, unique, consumer):
    api = client.as_key(make_key(unique))
    errors, created = [], []

    def writer(n):
        for i in range(25):
            resp = api.post('/api/v1/accounts', {
                'email': f'w{n}-{i}@example.com', 'sync_enabled': False,   # no host: no first sync
                'incoming': {'protocol': 'imap', 'host': 'h.example.com', 'port': 993, 'security': 'tls',
                             'username': 'u', 'password': 'p'}})
            (created if resp.status == 201 else errors).append(resp.status)
    load = [tasks.noop() for _ in range(300)]
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(created) == 100
    assert len(api.get('/api/v1/accounts').json['items']) == 100
    wait_for(lambda: len(final({t.id for t in load})) == 300, timeout=60, message='the load to finish')

