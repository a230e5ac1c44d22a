"""Passwords never reach the database in clear, the logs, or a task payload."""
import os

import pytest

import models
import tasks
from taskq import ledger
from tests.conftest import MODE, STATE

PASSWORD = 'Zebra-Quartz-7791-pw'


@pytest.fixture
def account_with_password(client, make_key, unique, consumer):
    alice = client.as_key(make_key(unique))
    body = {'email': 'a@example.com',
            'incoming': {'protocol': 'imap', 'host': 'h.example.com', 'port': 993, 'security': 'tls',
                         'username': 'a', 'password': PASSWORD},
            'smtp': {'host': 's.example.com', 'port': 465, 'security': 'tls', 'username': 'a',
                     'password': PASSWORD}}
    resp = alice.post('/api/v1/accounts', body)
    assert resp.status == 201
    # A rejected request carrying the password must not log it either.
    assert alice.post('/api/v1/accounts', dict(body, sync_interval=1)).status == 422
    assert PASSWORD not in alice.get(f'/api/v1/accounts/{resp.json["id"]}').text
    return resp.json, models.ApiKey.lookup(alice.key)


def database_text():
    """Everything the database holds, as text."""
    if MODE == 'embedded':
        path = models.database.obj.database
        return b''.join(open(p, 'rb').read() for p in (path, path + '-wal') if os.path.exists(p))
    cursor = models.database.execute_sql(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
    dump = []
    for (table,) in cursor.fetchall():
        dump += [repr(row) for row in models.database.execute_sql(f'SELECT * FROM "{table}"').fetchall()]
    return '\n'.join(dump).encode()


def test_password_is_not_in_the_database_in_clear(account_with_password):
    assert PASSWORD.encode() not in database_text()


def test_password_is_not_in_a_task_payload(account_with_password):
    account, key = account_with_password
    task = tasks.sync_emails.s(account['id'], key.tenant_id, key.user_id)
    payload = tasks.huey.serialize_task(task)  # the bytes the broker would hold
    assert task.id.encode() in payload and PASSWORD.encode() not in payload
    ledger.record(task)
    with models.all_tenants():
        assert PASSWORD not in str(models.TaskRecord.get_by_id(task.id).args)


def test_password_is_not_in_the_logs(account_with_password):
    logs = [STATE['workdir'] / name for name in ('web.log', 'consumer.log')]
    assert all(path.exists() for path in logs)
    for path in logs:
        assert PASSWORD not in path.read_text()
