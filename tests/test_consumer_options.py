"""The consumer's operations settings: workers recycled after N tasks, the graceful stop and its timeout."""
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import models
import tasks
from taskq import ledger
from taskq.service import ExitWatchingFlag
from tests import probe_tasks
from tests.conftest import ROOT, STATE, lane_workers, python_env, wait_for, wait_for_state

# The consumer ./run.sh consumer runs (emailsvc.run_consumer's options), with the probe tasks registered.
RUN = ('import tests.probe_tasks, emailsvc, tasks; from mailkit import logs; logs.configure(tasks.SETTINGS["log.level"]); '
       'tasks.huey.create_consumer(**emailsvc.consumer_options(tasks.SETTINGS)).run()')
LOG_NUMBERS = itertools.count()


@pytest.fixture
def own_consumer(consumer):
    """The session consumer stopped (it would take the tasks); start_consumer(**settings) runs ours."""
    consumer.stop()
    started = []

    def start_consumer(command=('-c', RUN), log_level='INFO', **settings):
        workers = settings.pop('workers', 2)   # in the probe tasks' lane (the default lane), none in the others
        env = python_env(**{f'EMAILSVC_CONSUMER_{k.upper()}': str(v) for k, v in settings.items()},
                         **lane_workers(workers, only=('periodic',)), EMAILSVC_LOG_LEVEL=log_level)
        log = start_consumer.log = STATE['workdir'] / f'consumer-options-{next(LOG_NUMBERS)}.log'
        proc = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env, stdout=log.open('ab'),
                                stderr=subprocess.STDOUT, start_new_session=True)
        started.append(proc)
        beats = models.ConsumerHeartbeat.select().where(models.ConsumerHeartbeat.consumer_pid == proc.pid)
        wait_for(lambda: beats.count() >= workers, timeout=20, message='our consumer to beat')
        return proc
    yield start_consumer
    for proc in started:  # the whole process group: a worker outliving its consumer would take later tasks
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    consumer.start()


def test_a_worker_is_replaced_after_max_tasks(own_consumer):
    own_consumer(workers=1, max_tasks_per_worker=3)
    queued = [tasks.noop() for _ in range(7)]
    records = [wait_for_state(task.id, 'succeeded') for task in queued]
    workers = [record.worker for record in records]
    # 3 + 3 + 1 tasks: two recycles. (At least: a task an earlier test left in the queue counts
    # towards a worker's three as well.) Without recycling one worker would run all seven.
    assert len(set(workers)) >= 3, workers
    assert all(workers.count(worker) <= 3 for worker in set(workers))
    # A recycle is routine, said at INFO; "died" (a warning) is kept for workers that did die.
    messages = log_messages(own_consumer.log)
    assert messages.count('worker 1 (lane periodic) ran its 3 tasks; starting another') >= 2, messages
    assert not [m for m in messages if 'died' in m], messages


def log_messages(path):
    return [json.loads(line)['message'] for line in path.read_text().splitlines() if line.startswith('{')]


@pytest.mark.parametrize('level, lines', [('INFO', 0), ('DEBUG', 2)])
def test_huey_logs_a_line_per_task_only_at_debug(own_consumer, level, lines):
    """Huey's "Executing ..." and "... executed in ..." lines are DEBUG lines here (the ledger has
    every run's start and end; at INFO they cost a quarter of a no-op task's CPU)."""
    own_consumer(workers=1, log_level=level)
    task = tasks.noop()
    wait_for_state(task.id, 'succeeded')
    logged = log_messages(own_consumer.log)
    assert len([m for m in logged if task.id in m and ('Executing' in m or 'executed in' in m)]) == lines, logged
    assert any(m.startswith('consumer serves lanes') for m in logged), logged   # the consumer's INFO lines stay


def test_plain_huey_consumer_replaces_a_recycled_worker_at_once(own_consumer):
    """`huey_consumer -M 2`: each recycled worker's successor takes the next task within a moment, not
    at Huey's health check every 10 s (-c's default; LedgerConsumer checks at every turn of its loop)."""
    own_consumer(command=('-m', 'huey.bin.huey_consumer', 'tests.probe_tasks.huey', '-k', 'process', '-M', '2'),
                 workers=1)
    records = sorted((wait_for_state(task.id, 'succeeded') for task in [tasks.noop() for _ in range(9)]),
                     key=lambda record: record.started_at)
    handovers = [(after.started_at - before.finished_at).total_seconds()
                 for before, after in zip(records, records[1:]) if after.worker != before.worker]
    assert len(handovers) >= 4, records   # 2 + 2 + 2 + 2 + 1
    # Each gap is a fork and a first claim; at a 10 s check all four would be under 3 s by chance 1 in 100+.
    assert max(handovers) < 3, handovers


def test_the_consumers_pause_ends_when_a_worker_exits():
    """The consumer's loop pauses on its stop flag (0.1 s a turn); a watched worker's exit ends the pause
    at once (a pidfd), once, so the loop replaces the worker then, and stopping still reads as stopping."""
    flag = ExitWatchingFlag()
    worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(0.3)'])
    flag.watch(worker.pid)
    began = time.monotonic()
    assert flag.wait(20) is False            # woken by the exit, not stopped
    assert time.monotonic() - began < 10     # not the whole pause
    worker.wait()
    assert flag.pidfds == {}                 # reported once: the next pause is a plain one
    assert flag.wait(0.05) is False
    flag.set()
    assert flag.wait(20) is True


def test_the_graceful_stop_waits_for_a_running_task_up_to_the_timeout(own_consumer):
    proc = own_consumer(workers=1, shutdown_timeout=0.5, graceful_signal='INT')
    task = tasks.huey.enqueue(probe_tasks.sleeps.s(1.9))  # under the tests' 2 s soft limit
    wait_for_state(task.id, 'running')
    stopping = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=20)
    took = time.monotonic() - stopping
    assert 0.45 < took < 1.6, took                    # waited for the timeout, not for the task
    assert wait_for_state(task.id, 'pending').error.startswith('interrupted by consumer shutdown')
    ledger.revoke(tasks.huey, task.id)  # not for the next consumer to sleep on


def test_a_short_task_finishes_within_the_graceful_stop(own_consumer):
    proc = own_consumer(workers=1, shutdown_timeout=20, graceful_signal='TERM')
    task = tasks.huey.enqueue(probe_tasks.sleeps.s(1.5))
    wait_for_state(task.id, 'running')
    proc.send_signal(signal.SIGTERM)                  # the graceful signal when graceful_signal is TERM
    assert proc.wait(timeout=20) == 0
    assert wait_for_state(task.id, 'succeeded').attempts == 1


def test_a_worker_shares_what_its_consumer_loaded_before_forking(own_consumer):
    """The consumer's main process makes the first broker and database round trips and freezes the
    collector before forking (taskq.service.share_before_fork): a worker's first task finds its parent's
    objects frozen, never to be copied by a collection, and nothing imported since the worker started
    (a first Redis connection imported encodings.idna into every worker)."""
    own_consumer(workers=1)
    facts = wait_for_state(tasks.huey.enqueue(probe_tasks.fork_facts.s()).id, 'succeeded').result
    assert facts['frozen'] > 10_000, facts
    assert facts['imported_since_start'] == [], facts


def test_one_worker_per_consumer_recovers_orphans(own_consumer):
    """Every worker renews its own lease; the consumer's first only also looks for other workers' orphans
    (taskq.workers: one scan per consumer and heartbeat, not one per worker)."""
    own_consumer(workers=2)
    both = [tasks.huey.enqueue(probe_tasks.fork_facts.s(1.0)) for _ in range(2)]
    facts = [wait_for_state(task.id, 'succeeded').result for task in both]
    assert facts[0]['worker'] != facts[1]['worker'], facts
    assert sorted(fact['recovers'] for fact in facts) == [False, True], facts
