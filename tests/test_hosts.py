"""Several consumers, each as if on a host of its own: clock skew, database outages, stopped hosts, chaos.

Each consumer runs in a UTS namespace of its own (`unshare --uts`, then
`hostname`), so it names itself after its own host; a skewed one runs with
Debian's libfaketime preloaded (FAKETIME=+120s: its wall clock, Python's and
SQLite's included, is two minutes off; FAKETIME_DONT_FAKE_MONOTONIC=1 keeps
its monotonic clock, and so its waits, right). The probe task `ticks` writes
`task pid n` lines to a file, an effect outside the database: two runs of one
task at once show as one pid's lines coming back after another's began.
"""
import itertools
import multiprocessing
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid

import pytest

import models
import tasks
from mailkit import logs, smtp
from taskq.workers import consumer_of
from tests import probe_tasks
from tests.conftest import (MODE, ROOT, STATE, TEST_SETTINGS, Consumer, lane_workers, python_env, record, wait_for,
                            wait_for_state)
from tests.test_send import MAIL, sender, smtp_server  # noqa: F401 (fixtures)
from tests.test_sync import user  # noqa: F401 (fixture)

GRACE = float(TEST_SETTINGS['EMAILSVC_CONSUMER_RECOVERY_GRACE'])
LIBFAKETIME = '/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1'
# The lanes of the tasks these tests run: the probes (no lane of their own: periodic), sends, syncs, deletes.
HOST_LANES = ('periodic', 'send', 'sync', 'delete')


class Host(Consumer):
    """A consumer as if on its own host: its own hostname, optionally its own (skewed) clock."""

    def __init__(self, workdir, hostname, skew=None):
        super().__init__(workdir)
        self.hostname, self.skew = hostname, skew
        self.log = workdir / f'consumer-{hostname}-{uuid.uuid4().hex[:6]}.log'

    def start(self, workers=2, lanes=HOST_LANES):
        # The probes here run past the suite's 2 s soft limit, on purpose: longer than the grace.
        extra = dict(EMAILSVC_LIMITS_DEFAULT_SOFT='30', EMAILSVC_LIMITS_DEFAULT_HARD='40')
        extra.update(lane_workers(workers, only=lanes))   # `workers` in each lane the tests use, none elsewhere
        if self.skew:
            # The library itself rather than the `faketime` wrapper, which forks and
            # waits: the consumer must be the process we started, to signal its group.
            extra.update(LD_PRELOAD=LIBFAKETIME, FAKETIME=self.skew, FAKETIME_DONT_FAKE_MONOTONIC='1')
        consumer = [sys.executable, '-m', 'huey.bin.huey_consumer', 'tests.probe_tasks.huey',
                    '-k', 'process', '-c', '1', '--no-periodic']
        # unshare without --fork execs in place, and so does the shell: the pid is the consumer's.
        command = ['unshare', '--uts', 'sh', '-c', f'hostname {self.hostname} && exec "$@"', 'sh', *consumer]
        self.proc = subprocess.Popen(command, cwd=ROOT, env=python_env(**extra), stdout=self.log.open('ab'),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: self.alive_workers() >= workers * len(lanes), timeout=20,
                 message=f'{self.hostname} to heartbeat')
        return self

    def signal_group(self, sig):
        os.killpg(self.proc.pid, sig)


@pytest.fixture
def hosts(consumer_process):
    """Start hosts with start(name, skew=None); the session's consumer is stopped meanwhile, so the
    tasks run where the test puts them (the `consumer` fixture starts it again for later tests)."""
    consumer_process.stop()
    started = []

    def start(hostname, skew=None, workers=2, lanes=HOST_LANES):
        host = Host(STATE['workdir'], hostname, skew).start(workers, lanes)
        started.append(host)
        return host
    yield start
    for host in started:
        if host.proc is not None and host.proc.poll() is None:
            host.signal_group(signal.SIGCONT)
            host.kill()


def tick_file():
    path = STATE['workdir'] / f'ticks-{uuid.uuid4().hex}.txt'
    path.touch()
    return path


def tick(path, count, pause, ids=()):
    """Queue a probe that ticks `count` times, `pause` apart, with a soft limit above its length."""
    return tasks.huey.enqueue(probe_tasks.ticks.s(count, pause, str(path), *ids, timeout=30))


def runs_by_task(path):
    """{task id: [pid of each run, in the order they ticked]}; raises if two runs' ticks interleave."""
    lines = [line.split() for line in path.read_text().splitlines()]
    runs = {}
    for task_id, group in itertools.groupby(sorted(lines, key=lambda l: l[0]), key=lambda l: l[0]):
        pids = [pid for pid, _ in itertools.groupby(pid for _, pid, _ in group)]
        # sorted() is stable: each task's lines keep the file's (time) order.
        assert len(pids) == len(set(pids)), f'task {task_id} ran twice at once: runs ticked {pids}'
        runs[task_id] = pids
    return runs


def host_of(row):
    return row.worker.split(':')[0]


def busy_host(hosts, hostname, path, count, skew=None):
    """A host started with two probes of `count` ticks running on it (the only host up when they start)."""
    host = hosts(hostname, skew=skew)
    task_ids = [tick(path, count, 0.1).id for _ in range(2)]
    wait_for(lambda: all((r := record(t)) and r.state == 'running' and host_of(r) == hostname
                         for t in task_ids), timeout=20, message=f'the tasks to run on {hostname}')
    return host, task_ids


def assert_each_ran_once(task_ids, path, why):
    for task_id in task_ids:
        row = wait_for_state(task_id, 'succeeded', timeout=40)
        assert row.attempts == 1, f'{task_id} was re-queued {why}: {row.history}'
    runs = runs_by_task(path)
    assert all(len(runs[t]) == 1 for t in task_ids)


# ---------------------------------------------------------------- identity

def test_two_hosts_with_one_hostname_are_two_workers(hosts):
    first, second = hosts('twin', workers=1, lanes=('periodic',)), hosts('twin', workers=1, lanes=('periodic',))
    with models.all_tenants():
        beats = list(models.ConsumerHeartbeat.select().where(
            models.ConsumerHeartbeat.consumer_pid.in_([first.proc.pid, second.proc.pid])))
    assert {b.host for b in beats} == {'twin'}
    names = {b.id for b in beats}
    assert len(names) == 2 and len({name.rsplit(':', 1)[1] for name in names}) == 2, names
    # Even with the pids made equal, the consumer ids keep them apart, and /health counts two.
    assert len({consumer_of(name) for name in names}) == 2


# ---------------------------------------------------------------- clock skew

@pytest.mark.parametrize('skew', ['+120s', '-120s'])
def test_a_skewed_clock_never_requeues_a_running_task(hosts, skew):
    path = tick_file()
    _, on_skewed = busy_host(hosts, 'skewed', path, 40, skew=skew)
    _, on_honest = busy_host(hosts, 'honest', path, 40)
    # Four seconds each: twice the grace, each side judging the other the whole time.
    assert_each_ran_once(on_skewed + on_honest, path, f'beside a clock {skew} off')


# ---------------------------------------------------------------- database outage

def database_outage(seconds):
    """The database away for `seconds`: PostgreSQL stopped (scale-out), or SQLite locked (embedded)."""
    if MODE == 'scaleout':
        STATE['postgres'].stop()
    else:
        path = STATE['env']['EMAILSVC_DATABASE_URL'].removeprefix('sqlite:///')
        lock = sqlite3.connect(path, isolation_level=None)
        lock.execute('BEGIN EXCLUSIVE')   # every write waits, up to its busy timeout, until the rollback
    # The outage's length is what the test is about: a plain wait is the point here.
    time.sleep(seconds)
    if MODE == 'scaleout':
        STATE['postgres'].restart()
    else:
        lock.rollback()
        lock.close()
    models.database.close()   # our pooled connection died with the server


def test_database_outage_longer_than_the_grace_requeues_nothing(hosts):
    path = tick_file()
    _, on_first = busy_host(hosts, 'first', path, 60)
    _, on_second = busy_host(hosts, 'second', path, 60)
    database_outage(GRACE * 2)
    assert_each_ran_once(on_first + on_second, path, 'after the outage')


# ---------------------------------------------------------------- a host that is only slow

def test_a_stopped_host_is_fenced_and_its_tasks_run_once_elsewhere(hosts):
    path = tick_file()
    slow, stalled = busy_host(hosts, 'slow', path, 30)
    other = hosts('other')
    slow.signal_group(signal.SIGSTOP)
    try:
        wait_for(lambda: all(record(t).attempts == 2 for t in stalled), timeout=GRACE * 4 + 10,
                 message='the stopped host\'s tasks to run again elsewhere')
    finally:
        slow.signal_group(signal.SIGCONT)
    for task_id in stalled:
        row = wait_for_state(task_id, 'succeeded', timeout=30)
        assert host_of(row) == other.hostname and row.attempts == 2
    # Resumed, the stopped workers find their leases gone and die before another tick.
    wait_for(lambda: 'taken for dead' in slow.log.read_text(errors='replace'), timeout=10,
             message='the resumed workers to notice they were fenced')
    runs = runs_by_task(path)
    assert all(len(runs[t]) == 2 for t in stalled)
    assert slow.alive_workers() >= 1   # the consumer replaced its fenced workers


# ---------------------------------------------------------------- one send, two runs at once

def race_sends(rounds, barrier, results, client_id, tenant_id, user_id):
    """In a forked process: run each round's send at the barrier, beside the other process."""
    for task_id in rounds:
        logs.task_id.set(task_id)
        barrier.wait(timeout=30)
        try:
            with models.tenant_scope(tenant_id):
                tasks.send_email.task_class.func(client_id, tenant_id, user_id, ['bob@example.net'],
                                                 subject=f'race {task_id}', body_text='once')
            results.put((task_id, 'returned'))
        except tasks.SendTaken:
            results.put((task_id, 'taken'))
        except Exception as exc:   # reported, not raised: the parent asserts
            results.put((task_id, f'{type(exc).__name__}: {exc}'))


def test_one_send_run_twice_at_once_is_delivered_once(sender, smtp_server):
    rounds = [uuid.uuid4().hex for _ in range(50)]
    tenant_id, user_id = sender.ids
    with models.tenant_scope(tenant_id):
        for task_id in rounds:
            models.Outbox.create(client=sender.account, user_id=user_id, task_id=task_id,
                                 message_id=smtp.make_message_id('example.com'), recipients=['bob@example.net'])
    fork = multiprocessing.get_context('fork')
    barrier, results = fork.Barrier(2), fork.Queue()
    workers = [fork.Process(target=race_sends, args=(rounds, barrier, results, sender.account, tenant_id, user_id))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in range(2 * len(rounds))]
    for worker in workers:
        worker.join(10)
    by_round = {t: sorted(o if o in ('returned', 'taken') else 'unknown' if 'is unknown' in o else o
                          for r, o in outcomes if r == t) for t in rounds}
    # The loser stopped before its end-of-data mark (taken), or came late and found the winner's
    # row sent (returned) or mid-transaction (unknown: it fails rather than risk a second copy).
    assert all(o in (['returned', 'taken'], ['returned', 'returned'], ['returned', 'unknown'])
               for o in by_round.values()), by_round
    with models.tenant_scope(tenant_id):
        outbox = {o.task_id: o for o in models.Outbox.select().where(models.Outbox.task_id.in_(rounds))}
    assert {o.state for o in outbox.values()} == {'sent'} and {o.attempt for o in outbox.values()} == {1}
    received = [m['data'].split(b'Message-ID: ', 1)[1].split(b'\r\n', 1)[0] for m in smtp_server.received()]
    expected = {o.message_id.encode() for o in outbox.values()}
    assert sorted(received) == sorted(expected), 'a message was delivered twice, or not at all'
    # Both runs reached the end-of-data mark together in most rounds: the compare-and-set decided them.
    assert sum(o == ['returned', 'taken'] for o in by_round.values()) >= 10, by_round


# ---------------------------------------------------------------- three hosts under chaos

def test_three_hosts_under_kills_and_stops_lose_nothing_and_deliver_once(sender, smtp_server, hosts):
    # Two hosts share a hostname (containers); one runs two minutes ahead. Embedded, the three
    # share one SQLite file, so they are one host's processes, and SQLite's clock is each one's
    # own: a consumer two minutes ahead stamps its lease two minutes ahead, and its tasks would
    # wait those two minutes to be recovered after a kill (safe, but past this test's bound).
    fleet = [hosts('twin'), hosts('twin'), hosts('ahead', skew='+120s' if MODE == 'scaleout' else None)]
    rng = random.Random(12)
    accepted, sends, blows = set(), set(), []
    path = tick_file()
    chaos_at = time.monotonic() + 1.5
    for n in range(90):
        kind = n % 3
        if kind == 0:
            resp = sender.post(f'/api/v1/accounts/{sender.account}/send', dict(MAIL, subject=f'fleet {n}'))
            sends.add(resp.json['task_id'])
        elif kind == 1 and n % 6 == 1:
            resp = sender.post(f'/api/v1/accounts/{sender.account}/sync')
        else:
            resp = None
            accepted.add(tick(path, 5, 0.05, sender.ids).id)
        if resp is not None:
            assert resp.status == 202, resp.text
            accepted.add(resp.json['task_id'])
        if time.monotonic() >= chaos_at:
            blows.append(upset(rng.choice(fleet), rng))
            chaos_at = time.monotonic() + rng.uniform(1.0, 2.0)
        time.sleep(0.1)
    for host in fleet:   # whatever chaos left stopped goes on
        host.signal_group(signal.SIGCONT)
        if host.proc is None:
            host.start()
    wait_for(lambda: finished(accepted) == len(accepted), timeout=60, interval=0.5,
             message=lambda: f'every accepted task to be final ({finished(accepted)} of {len(accepted)})')
    received = [m['data'].split(b'Message-ID: ', 1)[1].split(b'\r\n', 1)[0] for m in smtp_server.received()]
    assert len(received) == len(set(received)), 'a message was delivered twice'
    runs_by_task(path)   # no two runs of a probe at once
    with models.all_tenants():
        delivered = models.Outbox.select().where(models.Outbox.task_id.in_(list(sends)),
                                                 models.Outbox.state == 'sent').count()
    assert delivered == len(received)
    with models.all_tenants():
        rerun = models.TaskRecord.select().where(models.TaskRecord.id.in_(list(accepted)),
                                                 models.TaskRecord.attempts > 1).count()
    assert len(blows) >= 4, blows
    print(f'blows {blows}; {rerun} of {len(accepted)} tasks ran more than once (one after the other)')


def upset(host, rng):
    """One blow at `host`: SIGKILL or SIGSTOP (longer than the grace) of one worker or of the whole group."""
    blow = rng.choice(('kill worker', 'kill group', 'stop worker', 'stop group'))
    pids = host.worker_pids()
    if blow == 'kill group':
        host.kill()
        host.start()
    elif blow == 'kill worker' and pids:
        os.kill(rng.choice(pids), signal.SIGKILL)
    elif blow == 'stop group':
        host.signal_group(signal.SIGSTOP)
        time.sleep(GRACE * 1.5)   # stopped for longer than the grace: that is the blow
        host.signal_group(signal.SIGCONT)
    elif pids:
        pid = rng.choice(pids)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(GRACE * 1.5)
        os.kill(pid, signal.SIGCONT)
    return blow


def finished(ids):
    from taskq import ledger
    with models.all_tenants():
        return models.TaskRecord.select().where(models.TaskRecord.id.in_(list(ids)),
                                                models.TaskRecord.state.in_(ledger.FINAL_STATES)).count()
