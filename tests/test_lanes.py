"""Lanes: a backlog in one lane never holds another; a consumer serves all lanes or the ones it is given."""
import contextlib
import fcntl
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis
from huey.constants import EmptyData

import models
import tasks
from taskq import ledger, storage
from taskq.storage import LaneRedisStorage, WakingSqliteStorage, WriteTurns
from tests import probe_tasks
from tests.conftest import ROOT, STATE, python_env, record, wait_for, wait_for_state
from tests.test_dashboard import raw, sign_in
from tests.test_metrics import scrape, value
from tests.test_send import MAIL, sender, smtp_server  # noqa: F401 (fixtures)
from tests.test_sync import user  # noqa: F401 (fixture)


@pytest.fixture
def sync_backlog(consumer):
    """Enough slow sync-lane tasks to keep its two workers busy for ~8 s; revoked afterwards."""
    backlog = [tasks.huey.enqueue(probe_tasks.slow_sync.s(2.0)) for _ in range(8)]
    wait_for(lambda: sum(record(t.id).state == 'running' for t in backlog) == 2, message='the sync lane to be busy')
    yield backlog
    for task in backlog:
        with contextlib.suppress(ledger.LedgerConflict):
            ledger.revoke(tasks.huey, task.id)
    wait_for(lambda: all(record(t.id).state in ledger.FINAL_STATES for t in backlog), timeout=10,
             message='the sync backlog to end')


def waited(row):
    return (row.started_at - row.enqueued_at).total_seconds()


def test_a_backlog_of_slow_syncs_does_not_delay_a_send(sender, smtp_server, sync_backlog):
    resp = sender.post(f'/api/v1/accounts/{sender.account}/send', MAIL)
    assert resp.status == 202, resp.text
    sent = wait_for_state(resp.json['task_id'], 'succeeded', timeout=5)
    # One priority queue would have run the eight syncs (priority 10) before the send (8): 8 s.
    assert waited(sent) < 1.0, waited(sent)
    assert len(smtp_server.received()) == 1
    assert any(record(t.id).state == 'pending' for t in sync_backlog)   # the backlog was still there


def test_a_task_revoked_while_it_waits_behind_others_never_runs(consumer):
    # Busy workers pop the next task with its revoke marks in one round trip (Redis): the mark must count.
    ahead = [tasks.huey.enqueue(probe_tasks.slow_sync.s(0.5)) for _ in range(3)]
    revoked = tasks.huey.enqueue(probe_tasks.slow_sync.s(0))
    ledger.revoke(tasks.huey, revoked.id)
    after = tasks.huey.enqueue(probe_tasks.slow_sync.s(0))
    for task in ahead + [after]:
        wait_for_state(task.id, 'succeeded')
    row = record(revoked.id)
    assert (row.state, row.attempts, row.started_at) == ('revoked', 0, None)


def test_a_sqlite_lane_pops_a_task_with_its_revoke_marks_and_drops_the_last_runs_marks(tmp_path):
    # One transaction per busy pop (storage.WakingSqliteStorage): the task, its marks, the last run's marks gone.
    storage = WakingSqliteStorage(tasks.huey.name, lane='send', filename=str(tmp_path / 'queue.db'))
    task = tasks.noop.s()
    payload = tasks.huey.serialize_task(task)
    storage.put_data(f'r:{task.id}', b'revoked')
    storage.put_data('r:an-earlier-run', b'left by it')
    storage.stale_marks = ['r:an-earlier-run']
    storage.enqueue(payload, 3)
    assert bytes(storage.pop_now()) == payload
    assert storage.marks == [b'revoked', None]
    assert storage.peek_data('r:an-earlier-run') is EmptyData and storage.stale_marks == []
    assert storage.pop_now() is None and storage.marks is None
    storage.close()


def test_sqlite_writers_take_turns_handed_over_at_once_and_stop_waiting_after_their_patience(tmp_path):
    turns = WriteTurns(tmp_path / 'emailsvc.db', patience=0.5)
    release, entered = threading.Event(), []

    def hold():
        with turns.turn():
            entered.append(('holder', time.monotonic()))
            release.wait(10)

    def write():
        with turns.turn():
            entered.append(('writer', time.monotonic()))
    holder = threading.Thread(target=hold)
    holder.start()
    wait_for(lambda: entered, message='the holder to take its turn')
    writer = threading.Thread(target=write)
    writer.start()
    writer.join(0.2)
    assert writer.is_alive() and len(entered) == 1   # waits while the holder writes
    released = time.monotonic()
    release.set()
    writer.join(5)
    assert entered[1][0] == 'writer' and entered[1][1] - released < 0.05   # its turn comes at once
    holder.join(5)
    release.clear()
    stuck = threading.Thread(target=hold)   # a holder that does not let go (a stopped process)
    stuck.start()
    wait_for(lambda: len(entered) == 3, message='the second holder to take its turn')
    started = time.monotonic()
    write()
    assert 0.5 <= entered[-1][1] - started < 2   # it wrote anyway, after its patience
    release.set()
    stuck.join(5)


def test_a_writer_waits_its_turn_under_a_skewed_clock(tmp_path):
    # The skewed hosts of test_hosts.py run under libfaketime, where time.sleep fails (EINVAL): a ledger
    # write that waited its turn with it failed, and its task stayed `running` for good.
    from tests.test_hosts import LIBFAKETIME
    if not os.path.exists(LIBFAKETIME):
        pytest.skip(f'{LIBFAKETIME} is absent (Debian package libfaketime)')
    turns = WriteTurns(tmp_path / 'emailsvc.db')
    script = ('import sys, time; from taskq.storage import WriteTurns\n'
              'turns = WriteTurns(sys.argv[1], patience=0.3); started = time.monotonic()\n'
              'with turns.turn(): print(round(time.monotonic() - started, 2))')
    env = dict(python_env(), LD_PRELOAD=LIBFAKETIME, FAKETIME='-120s', FAKETIME_DONT_FAKE_MONOTONIC='1')
    with turns.turn():   # held here: the skewed writer must wait, then write anyway
        out = subprocess.run([sys.executable, '-c', script, str(tmp_path / 'emailsvc.db')], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 0.3 <= float(out.stdout) < 5


def test_each_workflow_has_its_lane():
    lanes = {name: wrapper.task_class.lane for name, wrapper in tasks.huey.service_tasks.items()}
    assert {k: lanes[k] for k in ('sync_emails', 'send_email', 'delete_emails', 'check_spam', 'file_report',
                                  'periodic_sync', 'cleanup_stale_results')} == {
        'sync_emails': 'sync', 'send_email': 'send', 'delete_emails': 'delete', 'check_spam': 'spam',
        'file_report': 'spam', 'periodic_sync': 'periodic', 'cleanup_stale_results': 'periodic'}
    assert tasks.sync_emails.task_class.default_priority == tasks.USER_SYNC > tasks.PERIODIC_SYNC


# ---------------------------------------------------------------- which lanes a consumer serves

@pytest.fixture
def no_session_consumer(consumer):
    """The session consumer stopped (it serves every lane); started again afterwards."""
    consumer.stop()
    started = []
    yield started
    for proc in started:   # the whole process group: a worker outliving its consumer would take later tasks
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    consumer.start()


def start(started, args, log_name):
    proc = subprocess.Popen(args, cwd=ROOT, env=python_env(), stdout=(STATE['workdir'] / log_name).open('ab'),
                            stderr=subprocess.STDOUT, start_new_session=True)
    started.append(proc)
    return proc


def beats_of(proc):
    return models.ConsumerHeartbeat.select().where(models.ConsumerHeartbeat.consumer_pid == proc.pid).count()


def test_consumer_lanes_option_serves_only_those_lanes(no_session_consumer):
    # `./run.sh consumer --lanes send,delete` is `emailsvc.py consumer --lanes send,delete`; the probe tasks
    # are imported first so that the consumer knows them.
    run = ('import sys, tests.probe_tasks, emailsvc; '
           'emailsvc.main(["consumer", "--lanes", "send,delete"])')
    proc = start(no_session_consumer, [sys.executable, '-c', run], 'consumer-lanes.log')
    settings = tasks.SETTINGS
    wait_for(lambda: beats_of(proc) >= settings['lanes.send'] + settings['lanes.delete'], timeout=20,
             message='the send and delete workers to beat')
    sync = tasks.huey.enqueue(probe_tasks.slow_sync.s(0))
    send = tasks.huey.enqueue(probe_tasks.quick_send.s())
    wait_for_state(send.id, 'succeeded')
    time.sleep(1.0)  # what is asserted is that nothing happens: give the sync lane time it does not use
    assert record(sync.id).state == 'pending'
    assert beats_of(proc) == settings['lanes.send'] + settings['lanes.delete']
    ledger.revoke(tasks.huey, sync.id)


def test_unknown_lane_is_refused_with_the_lane_names():
    out = subprocess.run([sys.executable, 'emailsvc.py', 'consumer', '--lanes', 'send,bogus'], cwd=ROOT,
                         env=python_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and 'unknown lane bogus' in out.stderr and 'sync, send' in out.stderr


def test_huey_consumer_serves_every_lane(no_session_consumer):
    proc = start(no_session_consumer, [sys.executable, '-m', 'huey.bin.huey_consumer', 'tests.probe_tasks.huey',
                                       '-k', 'process', '--no-periodic'], 'consumer-all-lanes.log')
    wait_for(lambda: beats_of(proc) >= sum(tasks.huey.lane_workers.values()), timeout=30,
             message='every lane\'s workers to beat')
    queued = [tasks.huey.enqueue(probe_tasks.slow_sync.s(0)), tasks.huey.enqueue(probe_tasks.quick_send.s()),
              tasks.noop()]
    for task in queued:
        wait_for_state(task.id, 'succeeded')
    assert {record(t.id).name for t in queued} == {'slow_sync', 'quick_send', 'noop'}


def test_queue_depth_is_shown_by_lane(no_session_consumer, client, web, make_key):
    before = tasks.huey.queue_depth()   # revoked tasks of earlier tests may wait in the broker still
    queued = [tasks.huey.enqueue(probe_tasks.slow_sync.s(0)) for _ in range(3)] + [tasks.noop()]
    after = tasks.huey.queue_depth()
    operator = make_key(operator=True)
    samples = scrape(client, operator)
    assert value(samples, 'emailsvc_lane_queue_depth', lane='sync') == after['by_lane']['sync']['depth']
    assert value(samples, 'emailsvc_lane_queue_depth', lane='periodic') == after['by_lane']['periodic']['depth']
    cookie = sign_in(web, operator)
    _, _, html = raw(web, 'GET', '/dashboard/fragment/overview', headers={'Cookie': cookie})
    assert re.search(rf'id="lane-sync">{after["by_lane"]["sync"]["depth"]}<', html), html
    grew = {lane: after['by_lane'][lane]['depth'] - before['by_lane'][lane]['depth'] for lane in after['by_lane']}
    assert grew == dict.fromkeys(tasks.huey.lane_workers, 0) | {'sync': 3, 'periodic': 1}
    assert after['by_lane']['sync']['by_priority']['10'] - before['by_lane']['sync']['by_priority'].get('10', 0) == 3
    assert after['depth'] - before['depth'] == 4
    for task in queued:
        ledger.revoke(tasks.huey, task.id)


def test_a_lane_worker_queues_a_task_into_that_tasks_lane(no_session_consumer):
    # A worker's Huey is its lane's view; a retry without delay is Huey's enqueue from there.
    before = tasks.huey.queue_depth()['by_lane']
    task = tasks.huey.lane('sync').enqueue(probe_tasks.quick_send.s())
    after = tasks.huey.queue_depth()['by_lane']
    assert (after['send']['depth'] - before['send']['depth'], after['sync']['depth'] - before['sync']['depth']) == (1, 0)
    ledger.revoke(tasks.huey, task.id)


@pytest.mark.skipif(not tasks.huey.storage.lane_class.__name__.startswith('Waking'), reason="the embedded queue's bell")
def test_each_ring_sends_one_idle_worker_and_stale_rings_are_dropped():
    """A ring is one task for one idle worker: two rings wake two workers (one taking both would leave
    the second task waiting for it), a worker finding a ring taken waits on without looking (with three
    consumers, every idle worker of a lane looked for every task), and rings whose tasks a busy worker
    took are dropped at the first look that finds the lane empty."""
    huey = tasks.huey
    lane = f'bell{os.getpid()}'   # a bell of its own, with no rings left by others
    producer, first, second = (huey.storage.lane_class(huey.name, lane=lane, **dict(huey.storage_kwargs,
                                                                                     read_timeout=0.3))
                               for _ in range(3))
    try:
        first.drain_bell(), second.drain_bell()   # open: a ring no worker listens to is not kept
        producer.ring()
        producer.ring()
        assert first.wait_for_bell() and second.wait_for_bell()
        assert not second.wait_for_bell()
        for _ in range(3):
            producer.ring()
        assert first.dequeue() is None
        assert not second.wait_for_bell()
        producer.enqueue(b'task', 5, None)
        assert second.dequeue() == b'task'
    finally:
        for storage in (producer, first, second):
            storage.close()


def linger_lane(name):
    """A lane of the test's queue; on Redis with connections of its own, named, so CLIENT LIST finds them."""
    huey, kwargs = tasks.huey, dict(tasks.huey.storage_kwargs)
    if huey.storage.lane_class is LaneRedisStorage:
        kwargs['connection_pool'] = redis.ConnectionPool.from_url(huey.settings['queue.url'], client_name=name)
    lane = huey.storage.lane_class(f'{huey.name}-{name}-{os.getpid()}', lane='test', **kwargs)
    lane.read_timeout = 1.0
    lane.flush_queue()
    return lane


def popping(lane, name):
    """Whether one of this lane's connections is blocked in its pop (Redis); None for SQLite."""
    if not isinstance(lane, LaneRedisStorage):
        return None
    return any(client['name'] == name and client['cmd'] == 'bzpopmin' and 'b' in client['flags']
               for client in lane.conn.client_list())


def test_a_worker_whose_lane_ran_dry_makes_what_it_holds_after_lingering_while_it_waits(monkeypatch):
    # What a busy worker holds for its next claim (a run's final write, taskq.ledger) is made once its
    # lane has been empty for LINGER: long before the wait for work ends, and (Redis) while the pop waits.
    lane, made = linger_lane('linger'), []
    monkeypatch.setattr(storage, 'BEFORE_WAIT', [lambda: made.append((time.monotonic(), popping(lane, 'linger')))])
    try:
        began = time.monotonic()
        assert lane.dequeue() is None
        ended = time.monotonic()
        assert len(made) == 1, made
        when, popped = made[0]
        assert when - began < 0.3 and ended - began >= 0.9, (when - began, ended - began)
        assert popped in (None, True)        # Redis: the pop was already waiting
    finally:
        lane.close()


def test_a_redis_lane_pops_again_after_its_connection_was_closed_and_its_script_flushed():
    # A worker pops over a connection of its own (storage.OwnConnection): one the server closed while it
    # sat idle (a restart, a timeout) is replaced before the next pop, and a server that forgot the pop
    # script (a restart) is given it again; neither costs the worker an error.
    if tasks.huey.storage.lane_class is not LaneRedisStorage:
        pytest.skip('the Redis lane (scale-out mode)')
    lane = linger_lane('own')
    try:
        lane.enqueue(b'first', 3)
        assert lane.dequeue() == b'first'
        port = lane.own._connection._sock.getsockname()[1]   # the pop's connection, not the pushes'
        mine = [client['id'] for client in lane.conn.client_list() if client['addr'].endswith(f':{port}')]
        assert len(mine) == 1, mine
        lane.conn.client_kill_filter(_id=mine[0])
        lane.conn.script_flush()
        for payload in (b'second', b'third'):
            lane.enqueue(payload, 3)
        assert lane.dequeue() == b'second'
        assert lane.dequeue() == b'third'
    finally:
        lane.close()


def test_a_task_that_comes_while_a_worker_lingers_is_taken_with_what_it_holds_still_held(monkeypatch):
    lane, made = linger_lane('lingered'), []
    monkeypatch.setattr(storage, 'BEFORE_WAIT', [lambda: made.append(time.monotonic())])
    monkeypatch.setattr(storage, 'LINGER', 2.0)
    pusher = threading.Timer(0.1, lambda: lane.enqueue(b'next', 3))
    try:
        pusher.start()
        assert lane.dequeue() == b'next'
        assert made == []        # the task came within LINGER: kept for its claim
    finally:
        pusher.join()
        lane.close()


# A worker of a lane of its own, with one waiting slot (storage.WaitingSlots) in DIR: it prints the pid
# and each payload it takes, and runs a payload `long` for 2.5 s. Shorter read timeout and GONE than
# the service's (1 s, 3 s), in the same relation: a waiting holder marks more often than GONE. BUSY is
# longer than the service's 20 ms: a holder descheduled for 20 ms on a loaded machine is not busy here.
SLOT_WORKER = """
import os, sys, time
import tasks
from taskq import storage
huey, name, directory = tasks.huey, sys.argv[1], sys.argv[2]
storage.GONE, storage.BUSY = 0.8, 0.3
lane = huey.storage.lane_class(name, lane='test', **huey.storage_kwargs)
lane.read_timeout = 0.2
lane.waiting = storage.WaitingSlots(directory, 'test', 1)
while True:
    data = lane.dequeue()
    if data is not None:
        print(os.getpid(), data.decode(), flush=True)
        if data == b'long':
            time.sleep(2.5)
"""


class Taken:
    """What the slot workers printed: payload -> the pid that took it, read as it comes."""

    def __init__(self, procs):
        self.by = {}
        for proc in procs:
            threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc):
        for line in proc.stdout:
            pid, payload = line.split()
            self.by[payload] = int(pid)

    def wait(self, payload, timeout=10):
        return wait_for(lambda: self.by.get(payload), timeout=timeout, message=f'{payload} to be taken')


def marked(path):
    """The state the holder of slot 0 last marked in this state file."""
    return storage.SLOT.unpack_from(path.read_bytes(), 0)[1]


def held(path):
    """Whether another process holds the flock of this slot file."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)   # closing drops a lock taken here
    return False


def test_idle_workers_beyond_the_hosts_slots_park_while_the_holder_takes_every_task(tmp_path):
    # Three consumers on one host: each task woke the worker that had waited longest, the coldest. With
    # one slot for two workers, the holder takes every task while it keeps up; the parked one looks for
    # work only when the holder is busy in one task, stopped while waiting, or dead (and takes its slot).
    name = f'{tasks.huey.name}-slots-{os.getpid()}'
    lane = tasks.huey.storage.lane_class(name, lane='test', **tasks.huey.storage_kwargs)
    lane.flush_queue()
    procs = [subprocess.Popen([sys.executable, '-c', SLOT_WORKER, name, str(tmp_path)], cwd=ROOT, env=python_env(),
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    taken = Taken(procs)
    try:
        for number in range(20):   # one at a time, each into an idle lane: both workers are waiting or parked
            lane.enqueue(f'idle{number}'.encode(), 3)
            taken.wait(f'idle{number}')
            time.sleep(0.02)
        holder, = set(taken.by.values())
        parked, = {proc.pid for proc in procs} - {holder}
        lane.enqueue(b'long', 3)
        assert taken.wait('long') == holder
        lane.enqueue(b'while-busy', 3)
        assert taken.wait('while-busy', timeout=2.2) == parked   # before the long task ends
        wait_for(lambda: marked(tmp_path / 'test.state') == storage.WAITING, message='the long task to end')
        os.kill(holder, signal.SIGSTOP)
        try:
            time.sleep(0.3)   # the stopped holder's pending pop times out (0.2 s) in Redis: none takes the next
            lane.enqueue(b'while-stopped', 3)
            assert taken.wait('while-stopped') == parked
        finally:
            os.kill(holder, signal.SIGCONT)
        os.kill(holder, signal.SIGKILL)
        next(proc for proc in procs if proc.pid == holder).wait()   # dead: its lock is gone with it
        wait_for(lambda: held(tmp_path / 'test.0'), timeout=5, message="the parked worker to take the dead holder's slot")
        lane.enqueue(b'after-kill', 3)
        assert taken.wait('after-kill') == parked
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        lane.flush_queue()
        lane.close()


# ---------------------------------------------------------------- fairness within a lane

def test_an_idle_redis_lane_waits_first_and_reads_marks_only_when_there_are_some():
    # With more idle workers than tasks (three consumers) every task is popped by the blocking pop:
    # the empty pop before it is skipped, the lane's depth and the hash's size come in the same round
    # trip, and the task's own marks are read only when the hash holds any (storage.LaneRedisStorage).
    huey = tasks.huey
    if huey.storage.lane_class is not LaneRedisStorage:
        pytest.skip('the Redis lane (scale-out mode)')
    lane = LaneRedisStorage(f'{huey.name}-idle-{os.getpid()}', lane='test', **huey.storage_kwargs)
    lane.read_timeout = 0.1
    lane.flush_queue()

    def calls(command):
        return lane.conn.info('commandstats').get(f'cmdstat_{command}', {}).get('calls', 0)
    assert lane.dequeue() is None and lane.idle
    first, second, third = tasks.noop.s(), tasks.noop.s(), tasks.noop.s()
    lane.put_data(f'r:{first.id}', b'revoked')
    lane.put_data('r:an-earlier-run', b'left by it')
    lane.stale_marks = ['r:an-earlier-run']
    for task in (first, second):
        lane.enqueue(huey.serialize_task(task), 3)
    pops = calls('zpopmin')
    assert lane.dequeue() == huey.serialize_task(first)    # taken by the blocking pop
    assert lane.marks == [b'revoked', None] and lane.peek_data('r:an-earlier-run') is EmptyData
    assert not lane.idle                                    # one more waits: the next pop is the script's
    assert calls('zpopmin') == pops
    assert lane.dequeue() == huey.serialize_task(second) and lane.marks == [None, None]
    assert lane.dequeue() is None and lane.idle
    lane.delete_data(f'r:{first.id}')
    lane.enqueue(huey.serialize_task(third), 3)
    reads = calls('hmget')
    assert lane.dequeue() == huey.serialize_task(third) and lane.marks == [None, None] and lane.idle
    assert calls('hmget') == reads                          # no marks anywhere: none read
    lane.flush_all()


def test_tenants_take_turns_within_a_priority_and_priorities_come_first():
    huey = tasks.huey
    lane = huey.storage.lane_class(f'{huey.name}-turns-{os.getpid()}', lane='test', **huey.storage_kwargs)
    lane.flush_queue()
    queued = [('a1', 5, 1), ('a2', 5, 1), ('a3', 5, 1), ('a4', 5, 1), ('b1', 5, 2), ('b2', 5, 2), ('c1', 5, None),
              ('urgent', 8, 1)]
    for name, priority, tenant in queued:
        lane.enqueue(name.encode(), priority, tenant)
    popped = [lane.pop_now().decode() for _ in queued]
    assert popped == ['urgent', 'a1', 'b1', 'c1', 'a2', 'b2', 'a3', 'a4'], popped
    assert lane.pop_now() is None
    lane.enqueue(b'a5', 5, 1)   # the band drained: tenant 1 starts even again, not behind its past
    lane.enqueue(b'b3', 5, 2)
    assert [lane.pop_now(), lane.pop_now()] == [b'a5', b'b3']


def test_one_tenants_backlog_does_not_starve_another(consumer):
    backlog = [tasks.huey.enqueue(probe_tasks.slow_sync.s(0.3, tenant_id=-1)) for _ in range(12)]
    other = tasks.huey.enqueue(probe_tasks.slow_sync.s(0, tenant_id=-2))
    started = wait_for_state(other.id, 'succeeded', timeout=10).started_at
    ahead = [t for t in backlog if (record(t.id).started_at or started) < started]
    # Turns: at most the two running and one more of the first tenant's go first; one FIFO would run all 12.
    assert len(ahead) <= 4, len(ahead)
    for task in backlog:
        wait_for_state(task.id, 'succeeded', timeout=10)


def test_a_user_sync_goes_before_waiting_periodic_syncs(consumer):
    periodic = [tasks.huey.enqueue(probe_tasks.slow_sync.s(0.3, tenant_id=-3, priority=tasks.PERIODIC_SYNC))
                for _ in range(8)]
    asked = tasks.huey.enqueue(probe_tasks.slow_sync.s(0, tenant_id=-3))   # the user-sync priority
    started = wait_for_state(asked.id, 'succeeded', timeout=10).started_at
    ahead = [t for t in periodic if (record(t.id).started_at or started) < started]
    assert len(ahead) <= 3, len(ahead)   # the running ones (and one caught in between)
    for task in periodic:
        wait_for_state(task.id, 'succeeded', timeout=10)
