"""No task lost: orphans of killed workers and consumers run again; dead letters can be purged."""
import datetime
import os
import signal
import subprocess
import sys
import time

import models
import tasks
from taskq import ledger
from tests import probe_tasks
from tests.conftest import ROOT, assert_api_error, record, wait_for, wait_for_state

GRACE = 2.0


def wait_running(task_id):
    return wait_for(lambda: (r := record(task_id)) and r.state == 'running' and r, timeout=10,
                    message=f'task {task_id} to start')


def test_task_of_a_killed_worker_runs_again_within_grace(consumer):
    task = probe_tasks.sleeps(1.5)
    worker = int(wait_running(task.id).worker.split(':')[1])
    os.kill(worker, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: (r := record(task.id)).attempts == 2 and r.state in ('running', 'succeeded'),
             timeout=GRACE + 10, message='the orphan to run again')
    assert time.monotonic() - killed_at <= GRACE + 5
    row = wait_for_state(task.id, 'succeeded')
    assert row.attempts == 2 and int(row.worker.split(':')[1]) != worker


def test_whole_consumer_killed_then_restarted_loses_nothing(consumer):
    running = probe_tasks.sleeps(1.5)
    wait_running(running.id)
    consumer.kill()
    waiting = [tasks.noop() for _ in range(5)]  # accepted while no consumer runs
    consumer.start()
    for task in [running] + waiting:
        wait_for_state(task.id, 'succeeded', timeout=GRACE + 15)
    assert record(running.id).attempts == 2


def test_pending_task_the_broker_lost_is_queued_again(consumer):
    task = tasks.noop.s()
    ledger.insert(task.id, name='noop', state=ledger.PENDING, enqueued_at=models.utcnow() - datetime.timedelta(seconds=60))
    row = wait_for_state(task.id, 'succeeded', timeout=GRACE + 10)
    assert row.attempts == 1 and row.result == {'status': 'ok'}


def test_sigterm_requeues_the_interrupted_task(consumer):
    task = probe_tasks.sleeps(1.5)
    wait_running(task.id)
    consumer.stop(sig=signal.SIGTERM)
    assert record(task.id).state == 'pending'
    consumer.start()
    row = wait_for_state(task.id, 'succeeded', timeout=15)
    # A sibling worker still shutting down may take it and be interrupted too.
    assert row.attempts >= 2


def test_dead_letters_listed_retried_and_purged(client, make_key, unique, consumer):
    api = client.as_key(make_key(unique))
    key = models.ApiKey.lookup(api.key)
    dead = probe_tasks.always_fails(tenant_id=key.tenant_id, user_id=key.user_id)
    wait_for_state(dead.id, 'dead', timeout=20)
    assert [t['task_id'] for t in api.get('/api/v1/tasks?state=dead').json['items']] == [dead.id]
    listing = subprocess.run([sys.executable, 'emailsvc.py', 'tasks', 'dead'], cwd=ROOT, capture_output=True,
                             text=True, timeout=60).stdout
    assert dead.id in listing
    assert api.delete(f'/api/v1/tasks/{dead.id}').status == 204
    assert_api_error(api.get(f'/api/v1/tasks/{dead.id}'), 404, 'not_found')


def test_cli_retry_and_purge(consumer):
    task = tasks.check_spam(10**9, tenant_id=1, user_id=1)   # no such message: fails at once
    wait_for_state(task.id, 'failed')
    run = subprocess.run([sys.executable, 'emailsvc.py', 'tasks', 'retry', task.id], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    wait_for(lambda: record(task.id).attempts == 2 and record(task.id).state == 'failed', message='the re-run')
    run = subprocess.run([sys.executable, 'emailsvc.py', 'tasks', 'purge', task.id], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and 'purged 1' in run.stdout and record(task.id) is None
