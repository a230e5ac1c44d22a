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
    assert any(line.split()[1:4] == [f'{key[:12]}…', f'{unique}/alice', 'active'] for line in listing.splitlines())
    assert key not in listing and key not in run('admin', 'list-keys', '--json').stdout  # only the prefix again
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
    queues = json.loads(run('tasks', 'queues', '--json').stdout)
    assert set(queues['by_priority']) >= {'10', '8', '5', '3'}
    assert set(queues['by_lane']) == set(tasks.huey.lane_workers)
    assert 'LANE' in run('tasks', 'queues').stdout


# ---------------------------------------------------------------- listings, prefixes, help, ping

def test_listings_print_tables_with_headers_and_json(consumer):
    task = tasks.noop()
    wait_for_state(task.id, 'succeeded')
    for args, header in ((('admin', 'list-keys'), 'PREFIX'), (('tasks', 'workers'), 'CONSUMER'),
                         (('tasks', 'stats'), 'SUCCEEDED'), (('tasks', 'queues'), 'PRIORITY')):
        proc = run(*args)
        assert proc.returncode == 0 and header in proc.stdout.splitlines()[0], (args, proc.stdout, proc.stderr)
        as_json = run(*args, '--json')
        assert as_json.returncode == 0 and json.loads(as_json.stdout) is not None, args
    stats = json.loads(run('tasks', 'stats', '--json').stdout)
    assert any(row['name'] == 'noop' and row['succeeded'] >= 1 for row in stats['by_name'])
    workers = json.loads(run('tasks', 'workers', '--json').stdout)
    assert sum(1 for w in workers if w['alive'] and w['consumer'].endswith(f':{consumer.proc.pid}')) >= 2


def test_empty_listings_say_so(consumer):
    run('tasks', 'purge', '--all-dead')
    proc = run('tasks', 'dead')
    assert proc.returncode == 0 and proc.stdout.strip() == 'no dead tasks'
    assert json.loads(run('tasks', 'dead', '--json').stdout) == []


def test_task_ids_and_keys_by_any_unique_prefix(client, unique):
    task = tasks.noop()
    wait_for_state(task.id, 'succeeded', 'pending', 'running')
    status = run('tasks', 'status', task.id[:10])
    assert status.returncode == 0 and json.loads(status.stdout)['task_id'] == task.id
    ambiguous = run('tasks', 'status', '')
    assert ambiguous.returncode != 0 and len(ambiguous.stderr.strip().splitlines()) == 1
    run('admin', 'create-tenant', unique)
    key = run('admin', 'create-key', '--tenant', unique, '--user', 'bob').stdout.strip().splitlines()[-1]
    short = key[:9]  # 'esk_' and five more: unique among the few keys of a test session
    assert run('admin', 'revoke-key', short).returncode == 0
    assert_api_error(client.as_key(key).get('/api/v1/accounts'), 401, 'unauthorized')
    everyone = run('admin', 'revoke-key', 'esk_')
    assert everyone.returncode == 2 and 'ambiguous' in everyone.stderr
    assert len(everyone.stderr.strip().splitlines()) == 1


def test_help_lists_commands_and_exits_zero():
    for args in (('--help',), ('tasks', '--help'), ('admin', '--help'), ('tasks', 'stats', '--help')):
        proc = subprocess.run(['./run.sh', *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and 'usage' in proc.stdout, (args, proc.stderr)
    assert 'workers' in run('tasks', '--help').stdout
    wrong = subprocess.run(['./run.sh', 'no-such-command'], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1
    typo = run('tasks', 'actve')
    assert typo.returncode == 2 and len(typo.stderr.strip().splitlines()) == 1 and '--help' in typo.stderr


def test_a_busy_port_is_one_line():
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        sock.listen()
        proc = run('web', env={'EMAILSVC_SERVER_PORT': str(sock.getsockname()[1])})
    assert proc.returncode == 2 and 'cannot listen on' in proc.stderr and 'Traceback' not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if not line.startswith('{')] == \
        [line for line in proc.stderr.splitlines() if 'cannot listen' in line]
