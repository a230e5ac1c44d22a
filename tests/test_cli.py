"""The command line: admin keys, key rotation, task inspection."""
import json
import os
import subprocess
import sys

import models
import tasks
from mailkit.credentials import Vault, new_key
from tests.conftest import ROOT, assert_api_error, wait_for_state


def run(*args, env=None):
    proc = subprocess.run([sys.executable, 'emailsvc.py', *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, **(env or {})))
    return proc


def test_create_tenant_and_key_then_use_and_revoke_it(client, unique):
    assert 'created' in run('admin', 'create-tenant', unique).stdout
    made = run('admin', 'create-key', '--tenant', unique, '--user', 'alice')
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith('esk_') and ' ' not in key
    assert client.as_key(key).get('/api/v1/accounts').status == 200
    listing = run('admin', 'list-keys').stdout
    assert f'{key[:12]}…\t{unique}/alice\tactive' in listing
    assert key not in listing  # only the prefix is ever shown again
    assert run('admin', 'revoke-key', key[:12]).returncode == 0
    assert_api_error(client.as_key(key).get('/api/v1/accounts'), 401, 'unauthorized')


def test_operator_key(client):
    made = run('admin', 'create-key', '--operator')
    key = made.stdout.strip().splitlines()[-1]
    assert client.as_key(key).get('/api/v1/tasks').status == 200


def test_mistakes_get_one_line_and_a_non_zero_exit(unique):
    for args, expected in ((('admin', 'create-key', '--tenant', unique, '--user', 'x'), 'no tenant'),
                           (('admin', 'create-key'), 'give --tenant and --user, or --operator'),
                           (('admin', 'revoke-key', 'esk_nothing'), 'no key'),
                           (('tasks', 'status', 'no-such-task'), 'no task')):
        proc = run(*args)
        assert proc.returncode == 2 and expected in proc.stderr and 'Traceback' not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_rotate_key_re_encrypts_every_credential(unique):
    old_keys = os.environ['EMAILSVC_SECURITY_CREDENTIAL_KEYS']
    tenant = models.Tenant.create(name=unique)
    with models.tenant_scope(tenant.id):
        client = models.EmailClient.create(user_id=1, email='r@example.com', incoming_protocol='imap',
                                           incoming_host='h', incoming_port=993, incoming_security='tls',
                                           incoming_username='u')
        models.Credential.store(client, 'incoming', 'pw-rotate')
        cred = models.Credential.get(models.Credential.client == client.id)
    newest = new_key()
    proc = run('admin', 'rotate-key', env={'EMAILSVC_SECURITY_CREDENTIAL_KEYS': f'{newest},{old_keys}'})
    assert proc.returncode == 0 and 're-encrypted' in proc.stdout, proc.stderr
    with models.tenant_scope(tenant.id):
        rotated = models.Credential.get_by_id(cred.id).secret
    assert rotated != cred.secret
    assert Vault(newest).decrypt(rotated) == 'pw-rotate'  # readable with the new key alone


def test_tasks_status_and_queues(consumer):
    task = tasks.noop()
    wait_for_state(task.id, 'succeeded')
    status = json.loads(run('tasks', 'status', task.id).stdout)
    assert status['state'] == 'succeeded' and status['task_id'] == task.id
    queues = json.loads(run('tasks', 'queues').stdout)
    assert set(queues['by_priority']) >= {'10', '8', '5', '3'}
