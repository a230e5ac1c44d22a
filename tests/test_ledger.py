"""The task ledger, written from Huey's signals in a real consumer."""
import datetime
import os
import pickle
import threading
import time

import pytest

import models
import tasks
from taskq import ledger
from taskq.service import Watchdog, jittered
from tests import probe_tasks
from tests.conftest import record, wait_for, wait_for_state


def test_success_is_recorded_with_result_worker_and_times(consumer):
    task = tasks.noop(tenant_id=None)
    row = wait_for_state(task.id, 'succeeded')
    assert row.attempts == 1
    assert row.result == {'status': 'ok'}
    assert row.worker and row.worker.split(':')[1].isdigit()
    assert row.enqueued_at <= row.started_at <= row.finished_at
    assert row.error is None


def test_record_exists_before_the_broker_sees_the_task():
    task = probe_tasks.sleeps.s(0, tenant_id=7, user_id=3, delay=3600)
    tasks.huey.enqueue(task)
    row = record(task.id)
    assert (row.state, row.tenant_id, row.user_id, row.name) == ('pending', 7, 3, 'sleeps')
    assert row.args == {'seconds': 0, 'tenant_id': 7, 'user_id': 3}
    tasks.huey.revoke_by_id(task.id)


def test_retry_with_growing_delays_then_success(consumer):
    task = probe_tasks.flaky(3)
    delays = {}

    def watch():
        row = record(task.id)
        if row.state == 'retrying' and row.next_retry_at and row.started_at:
            delays[row.attempts] = (row.next_retry_at - row.started_at).total_seconds()
        return row.state == 'succeeded' and row
    row = wait_for(watch, timeout=30, interval=0.01, message='flaky task to succeed')
    assert row.attempts == 4 and row.result['attempt'] == 4
    assert sorted(delays) == [1, 2, 3], delays
    base, jitter = 0.4, 0.2
    for attempt, delay in delays.items():
        expected = base * 2 ** (attempt - 1)
        assert expected * (1 - jitter) - 0.05 <= delay <= expected + 0.05, delays
    assert delays[1] < delays[2] < delays[3]


def test_exhausted_retries_are_dead(consumer):
    task = probe_tasks.always_fails()
    row = wait_for_state(task.id, 'dead', timeout=20)
    assert row.attempts == 3  # the first run and its 2 retries
    assert 'always fails' in row.error and 'Traceback' in row.traceback
    assert row.finished_at is not None


def test_error_retrying_cannot_fix_fails_at_once(consumer):
    task = probe_tasks.refuses()
    row = wait_for_state(task.id, 'failed')
    assert row.attempts == 1
    assert row.error == 'FailNow: retrying cannot fix this'


def test_a_message_of_someone_else_fails_at_once_without_retrying(consumer):
    task = tasks.check_spam(10 ** 9, tenant_id=1, user_id=1)
    row = wait_for_state(task.id, 'failed')
    assert row.error == f'FailNow: no message {10 ** 9} for this user' and row.attempts == 1


def test_soft_time_limit_stops_the_task(consumer):
    task = probe_tasks.sleeps(30)
    row = wait_for_state(task.id, 'failed', timeout=15)
    assert 'soft time limit of 2s exceeded' in row.error
    assert (row.finished_at - row.started_at).total_seconds() < 5


def test_hard_time_limit_kills_the_worker_and_the_consumer_replaces_it(consumer):
    workers_before = set(consumer.worker_pids())
    task = probe_tasks.ignores_soft_limit(30)
    row = wait_for_state(task.id, 'failed', timeout=15)
    assert 'hard time limit of 4s exceeded' in row.error
    killed = int(row.worker.split(':')[1])
    assert killed in workers_before
    wait_for(lambda: len(set(consumer.worker_pids()) - workers_before) >= 1 and consumer.alive_workers() >= 2,
             timeout=20, message='a replacement worker')
    follow_up = tasks.noop()
    assert wait_for_state(follow_up.id, 'succeeded').attempts == 1


def test_hard_time_limit_kills_a_worker_that_cannot_reach_the_database(consumer, tmp_path):
    # Kill first, record after: a worker whose own ledger write fails must not outlive its hard limit.
    # It cannot renew its lease either, so another worker may fence it after recovery_grace (2 s, under
    # the 4 s hard limit) and run the task again (that run finds the marker and succeeds); if no worker
    # got there first, the consumer records the kill. Either way the first worker dies at its limit.
    task = probe_tasks.ignores_soft_limit_without_database(30, str(tmp_path / 'first-run'))
    killed = f'task {task.id} passed its hard time limit of 4s; worker'
    wait_for(lambda: killed in consumer.log.read_text(), timeout=15, message='the watchdog to kill the worker')
    row = wait_for_state(task.id, 'succeeded', 'failed', timeout=15)
    if row.state == 'failed':
        assert 'hard time limit of 4s exceeded' in row.error
    else:
        assert row.result == {'status': 'ok', 'run': 'later'}


def test_progress_is_on_the_record(consumer):
    task = probe_tasks.reports_progress(5)
    row = wait_for_state(task.id, 'succeeded')
    assert row.to_dict()['progress'] == {'done': 5, 'total': 5}


def test_revoked_before_it_runs_never_runs(consumer):
    task = probe_tasks.sleeps.s(0, delay=1)
    tasks.huey.enqueue(task)
    assert ledger.update(task.id, only_states=(ledger.PENDING,), state=ledger.REVOKED) == 1
    tasks.huey.revoke_by_id(task.id)
    # The scheduler hands it to a worker after its eta; Huey skips it and says so.
    skipped = f'{task.id} @'
    wait_for(lambda: any(skipped in line and 'was revoked, not executing' in line
                         for line in consumer.log.read_text().splitlines()), timeout=10,
             message='the consumer to skip the revoked task')
    row = record(task.id)
    assert row.state == 'revoked'
    assert row.started_at is None and row.attempts == 0


def test_higher_priority_task_enqueued_later_runs_first(consumer, monkeypatch):
    consumer.stop()
    # One worker in the probes' lane: with two, the second pops a low task a moment after the first pops
    # the high one and may stamp its start first (the embedded CI run saw it).
    monkeypatch.setenv('EMAILSVC_LANES_PERIODIC', '1')
    try:
        low = [probe_tasks.sleeps.s(0, priority=1) for _ in range(3)]
        high = probe_tasks.sleeps.s(0, priority=10)
        for task in low + [high]:
            tasks.huey.enqueue(task)
        consumer.start(workers=1)
        rows = [wait_for_state(t.id, 'succeeded') for t in low + [high]]
        first = min(rows, key=lambda r: r.started_at)
        assert first.id == high.id
    finally:
        consumer.stop()


def test_tampered_or_pickled_payload_is_refused_and_consumer_keeps_running(consumer):
    honest = tasks.huey.serialize_task(tasks.noop.s())
    tampered = honest.replace(b'noop', b'nope')
    forged = pickle.dumps({'m': 'anything'})
    for payload in (tampered, forged, b'esv1:deadbeef:{}'):
        with pytest.raises(ValueError, match='refused queue payload'):
            tasks.huey.deserialize_task(payload)
        tasks.huey.storage.enqueue(payload, 10)
    wait_for(lambda: tasks.huey.pending_count() == 0, message='the bad payloads to be dropped')
    after = tasks.noop()
    assert wait_for_state(after.id, 'succeeded').attempts == 1
    assert 'refused queue payload' in consumer.log.read_text()


def test_serializer_round_trips_a_message_with_eta():
    task = probe_tasks.sleeps.s(1, tenant_id=2, delay=60)
    task.request_id = 'req-123'
    copy = tasks.huey.deserialize_task(tasks.huey.serialize_task(task))
    assert (copy.id, copy.args, copy.kwargs, copy.priority) == (task.id, task.args, task.kwargs, task.priority)
    assert copy.eta == task.eta and isinstance(copy.args, tuple)
    assert copy.request_id == 'req-123'


def test_serializer_round_trips_tagged_values_nested_anywhere():
    value = {'a': (1, [datetime.datetime(2026, 1, 2, 3, 4, 5, 6), datetime.timedelta(seconds=1.5)]),
             'b': [{'c': ('x',)}], 'd': {}}
    serializer = tasks.huey.serializer
    assert serializer.deserialize(serializer.serialize(value)) == value


def prepared_ledger_statements():
    return {name for name, in models.database.execute_sql(
        "SELECT name FROM pg_prepared_statements WHERE name LIKE 'ledger_%%'")}


def test_ledger_writes_go_on_over_a_fresh_connection():
    """On PostgreSQL the hot ledger statements are prepared once per connection: one the server
    dropped is replaced, and they are prepared again on the new one."""
    task_id = f'fresh-{os.urandom(6).hex()}'
    assert ledger.insert(task_id, state='pending', name='noop', args={})
    postgres = models.database.param == '%s'
    if postgres:
        assert len(prepared_ledger_statements()) >= 1
        with pytest.raises(models.pw.OperationalError):
            models.database.execute_sql('SELECT pg_terminate_backend(pg_backend_pid())')
    else:
        models.database.close()
    assert ledger.update(task_id, only_states=('pending',), state='revoked') == 1
    assert ledger.update(task_id, only_states=('pending',), state='failed') == 0
    if postgres:
        assert len(prepared_ledger_statements()) == 1   # the new connection's: the updates', prepared on it
    with models.all_tenants():
        assert record(task_id).state == 'revoked'
        ledger.delete(task_id)


def test_a_success_is_written_with_the_workers_next_claim_and_held_no_longer(monkeypatch):
    """A busy worker's final write of a success goes with its next claim: one statement on PostgreSQL,
    one transaction on SQLite (ledger.DeferredLedger). It is made at once when the worker would wait
    (release) and before any other write of the worker."""
    worker = f'held-test:{os.getpid()}:{os.urandom(4).hex()}'
    with models.all_tenants():
        models.ConsumerHeartbeat.create(id=worker, host='held-test', pid=os.getpid(), consumer_pid=os.getpid())
    ids = [f'held-{n}-{os.urandom(4).hex()}' for n in range(4)]
    for task_id in ids:
        assert ledger.insert(task_id, state='pending', name='noop', args={})
    writes = ledger.DeferredLedger()

    def succeed(task_id):
        writes.hold(task_id, only_states=(ledger.RUNNING,), expect={'worker': worker}, state=ledger.SUCCEEDED,
                    finished_at=models.utcnow())

    def states():
        with models.all_tenants():
            return [record(task_id).state for task_id in ids]
    assert writes.claim(ids[0], worker, started_at=models.utcnow())
    succeed(ids[0])
    assert states() == ['running', 'pending', 'pending', 'pending']   # held
    statements, execute_sql = [], models.database.obj.execute_sql
    monkeypatch.setattr(models.database.obj, 'execute_sql', lambda sql, *a, **k: statements.append(sql) or
                        execute_sql(sql, *a, **k))
    assert writes.claim(ids[1], worker, started_at=models.utcnow())
    monkeypatch.undo()
    assert states() == ['succeeded', 'running', 'pending', 'pending']
    if models.database.param == '%s':
        run = [sql for sql in statements if not sql.startswith('PREPARE ')]   # prepared once per connection
        assert len(run) == 1 and run[0].startswith('EXECUTE ')                 # the pair, one statement
    else:
        assert len(statements) == 2   # the pair's two updates, in the transaction atomic() opens
    succeed(ids[1])
    writes.release()                                   # the worker is about to wait for work
    assert states()[1] == 'succeeded' and writes.held is None
    assert writes.claim(ids[2], worker, started_at=models.utcnow())
    succeed(ids[2])
    writes.write(ids[3], only_states=('pending',), state=ledger.REVOKED)   # any other write: the held one first
    assert states() == ['succeeded', 'succeeded', 'succeeded', 'revoked']
    with models.all_tenants():
        models.ConsumerHeartbeat.delete_by_id(worker)
        for task_id in ids:
            ledger.delete(task_id)


def test_hard_limit_watch_is_not_woken_by_each_task_yet_fires_for_a_shorter_limit():
    watchdog = Watchdog(enabled=True)
    fired = threading.Event()

    def kill():   # instead of SIGKILL to this process
        fired.set()
        watchdog.deadline = None
    watchdog._kill = kill
    with watchdog.limit(object(), 300):
        pass
    wait_for(lambda: watchdog.sleeps_until is not None, message='the watch to sleep toward a deadline')
    wakeups = []
    notify = watchdog.wakeup.notify
    watchdog.wakeup.notify = lambda: (wakeups.append(1), notify())
    for _ in range(50):
        with watchdog.limit(object(), 300):
            pass
    assert wakeups == []   # each later deadline is past the one it sleeps toward
    started = time.monotonic()
    with watchdog.limit(object(), 0.2):
        assert fired.wait(5)
    assert wakeups == [1] and time.monotonic() - started < 2


def test_backoff_is_capped_and_jittered():
    assert jittered(10_000, 600, 0.2, rand=lambda: 0.0) == 600
    assert jittered(10_000, 600, 0.2, rand=lambda: 1.0) == pytest.approx(600 * 0.8)
    assert jittered(5, 600, 0.2, rand=lambda: 0.5) == pytest.approx(5 * 0.9)


def test_cleanup_clears_old_results_and_prunes_old_history():
    now = models.utcnow()
    old, ancient, fresh = 'cleanup-old', 'cleanup-ancient', 'cleanup-fresh'
    for task_id, age in ((old, datetime.timedelta(hours=2)), (ancient, datetime.timedelta(days=40)),
                         (fresh, datetime.timedelta(minutes=5))):
        ledger.insert(task_id, name='noop', state=ledger.SUCCEEDED, result={'status': 'ok'},
                             finished_at=now - age)
    with models.all_tenants():
        counts = tasks.cleanup_stale_results.task_class.func(now=now)
    assert counts['results_removed'] >= 1 and counts['history_removed'] >= 1
    assert record(old).result is None
    assert record(ancient) is None
    assert record(fresh).result == {'status': 'ok'}
