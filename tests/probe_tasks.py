"""Tasks that misbehave on purpose, registered beside the real ones.

The test consumer runs `huey_consumer tests.probe_tasks.huey`: the service's
own Huey instance, ledger and signals, plus these probes.
"""
import gc
import os
import pathlib
import sys
import threading
import time

import models
import peewee as pw
from huey.exceptions import TaskTimeout
from mailkit import logs
from mailkit.errors import FailNow
from taskq.ledger import at_safe_point, report_progress
from tasks import huey, service_task  # noqa: F401  (huey is the consumer's import path)


def current_attempt(task_id):
    with models.all_tenants():
        return models.TaskRecord.get_by_id(task_id).attempts


MODULES_AT_START = set()


@huey.on_startup()
def note_modules_at_start():   # a name of its own: Huey keys its hooks by name
    MODULES_AT_START.update(sys.modules)


@service_task(priority=3, retries=0)
def fork_facts(pause=0.0, tenant_id=None, user_id=None):
    """What this worker process shares with its consumer's main process (taskq.service.share_before_fork),
    and whether it recovers others' orphans; after `pause` seconds, so that a second call goes to another worker."""
    time.sleep(pause)
    return {'frozen': gc.get_freeze_count(), 'imported_since_start': sorted(set(sys.modules) - MODULES_AT_START),
            'worker': os.getpid(), 'recovers': huey.recovers}


@service_task(priority=3, retries=3)
def flaky(failures, tenant_id=None, user_id=None):
    """Fail the first `failures` attempts, then succeed."""
    attempt = current_attempt(logs.task_id.get())
    if attempt <= failures:
        raise RuntimeError(f'planned failure on attempt {attempt}')
    return {'status': 'ok', 'attempt': attempt}


@service_task(priority=3, retries=2)
def always_fails(tenant_id=None, user_id=None):
    raise RuntimeError('always fails')


@service_task(priority=3, retries=3)
def refuses(tenant_id=None, user_id=None):
    raise FailNow('retrying cannot fix this')


@service_task(priority=3, retries=0)
def sleeps(seconds, tenant_id=None, user_id=None):
    time.sleep(seconds)
    return {'status': 'ok', 'slept': seconds}


@service_task(priority=3, retries=0)
def ignores_soft_limit(seconds, tenant_id=None, user_id=None):
    """Swallow the soft limit, as badly written code would: only the hard limit stops it."""
    return overrun(seconds)


def overrun(seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(deadline - time.monotonic())
        except TaskTimeout:
            continue
    return {'status': 'ok'}


@service_task(priority=3, retries=0)
def reports_progress(total, tenant_id=None, user_id=None):
    for done in range(1, total + 1):
        report_progress(done, total)
    return {'status': 'ok'}


@service_task(priority=3, retries=0)
def ignores_soft_limit_without_database(seconds, marker, tenant_id=None, user_id=None):
    """Lose this worker's database, then overrun: the watchdog must still kill it at the hard limit.
    Only the first run (the one that creates `marker`) does; a run after it returns at once."""
    try:
        pathlib.Path(marker).touch(exist_ok=False)
    except FileExistsError:
        return {'status': 'ok', 'run': 'later'}
    models.database.initialize(pw.SqliteDatabase('/nonexistent/emailsvc-probe/none.db'))
    return overrun(seconds)


@service_task(priority=3, retries=0)
def crawls(total, pause, tenant_id=None, user_id=None):
    """Report progress slowly, so a watcher can see a progress bar move (past the soft limit, up to the hard)."""
    for done in range(1, total + 1):
        overrun(pause)
        report_progress(done, total)
    return {'status': 'ok'}


@service_task(priority=3, retries=0)
def ticks(count, pause, path, tenant_id=None, user_id=None):
    """Append `task pid n` to `path` `count` times, `pause` apart, passing a safe point before each:
    an effect outside the database, so a test can see whether two runs of one task ever overlap."""
    task_id = logs.task_id.get()
    for n in range(count):
        at_safe_point()
        with open(path, 'a') as out:
            out.write(f'{task_id} {os.getpid()} {n}\n')
        # Not time.sleep: under libfaketime with FAKETIME_DONT_FAKE_MONOTONIC (the
        # skewed hosts' clock) it fails with EINVAL; an Event's wait is right.
        threading.Event().wait(pause)
    return {'status': 'ok', 'ticks': count}


@service_task(priority=10, retries=0, lane='sync')
def slow_sync(seconds, tenant_id=None, user_id=None):
    """A sync-lane task that takes `seconds`: a backlog of these is a periodic sync storm."""
    time.sleep(seconds)
    return {'status': 'ok'}


@service_task(priority=8, retries=0, lane='send')
def quick_send(tenant_id=None, user_id=None):
    """A send-lane task that does nothing."""
    return {'status': 'ok'}
