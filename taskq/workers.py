"""Workers' leases and the recovery of tasks whose worker is gone.

Huey is at-most-once: a task dequeued by a worker that dies is gone. The
ledger and the workers' leases make it at-least-once, and this module makes
sure that "at least once" never becomes "twice at once".

The lease
---------
Each worker process names itself `host:pid:consumer id` (taskq.service: the
random consumer id keeps names apart when hostnames and pids repeat, as they
do in containers) and registers a row in `consumer_heartbeat` before it takes
a task. Every `heartbeat_seconds` it renews the row: an UPDATE that stamps
`last_seen` with the database's clock (models.clock_sql), never a host's.
The row is the worker's lease:

  L1. A run starts only by its claim (ledger.claim): one statement that moves
      the record from pending or retrying to running under the worker's name,
      and only while the worker's row exists.
  L2. A renewal is an UPDATE of an existing row. A worker whose renewal
      changes no row has been fenced: it kills its own process at once (the
      consumer starts a fresh worker, with a fresh name). A run also checks
      its lease at every safe point (ledger.raise_if_stop_requested) once the
      lease is older than half the grace, with the same consequence.
  L3. Every write of a run after its claim is a compare-and-set on
      (running, its worker) (ledger), and a send's delivery is a
      compare-and-set on the outbox row's (state, attempt) (tasks.py).
      A success's final write may travel with the worker's next claim
      (ledger.DeferredLedger): the same compare-and-set, made later by the
      same worker, so it is refused as any late write is.

Recovery (a consumer's first worker, after each successful renewal)
-------------------------------------------------------------------
A taker T requeues the running records of worker W only after one of:

  R1. W's row is gone: it was fenced (by a taker that died before it
      re-queued), or W deleted it when it stopped. Either way W renews no
      more (L2) and claims no more (L1).
  R2. T fences W itself: it deletes W's row with a compare-and-set on the
      exact `last_seen` stamp it observed, and only if
        a. by the database's clock that stamp is older than recovery_grace;
        b. T has seen that same stamp for recovery_grace on its own
           monotonic clock, every observation made while T's own renewals
           kept succeeding without a gap over half the grace (a failed or
           slow renewal forgets every observation), and T renewed within the
           last half grace.
Then T moves each of W's records running -> pending with a compare-and-set
on (running, worker W), and queues it again under the same id.

Invariant: a task never has two runs that can both make an effect. Proof:
a second run needs a second claim (L1), which needs the record pending,
which (for a running record) only R1/R2's requeue makes, and only after W's
row was deleted. Deleting the row is final for W: its renewal changes no row
and it dies (L2), its claims fail (L1), and each of its writes is refused
once the record is re-queued (L3); if W's final write lands first, the
requeue's compare-and-set fails and there is no second run. Between the
fence and W's death, W's run can still compute (a process resumed by SIGCONT
runs until its next beat or safe point), but every effect it could make goes
through a compare-and-set that the new run's claim or the outbox's attempt
refuses. R1 also needs L1's order in the reads: recovery reads which
workers hold running records BEFORE it reads the rows, so a worker that
registered and claimed in between is never taken for one without a row.

Why R2 cannot take a live worker's task (liveness, and no needless kill):
a live worker changes its stamp every heartbeat_seconds, far less than the
grace, so no taker sees one stamp for a whole grace. A host's clock skew
changes nothing: stamps and the age test (a) use the database's one clock
(in the embedded mode, the host's, which (b) makes harmless), and (b)
measures only intervals on T's own monotonic clock. After a database outage
every taker's observations start again when its own renewals succeed again
(b), so each waits a full grace after the outage, long enough for every live
worker to renew; a taker that was stopped or cut off itself judges no one
until it has renewed again and watched a whole grace. A worker that is only
slow (SIGSTOP longer than the grace) is indistinguishable from a dead one: it
is fenced, and when it resumes it dies at its next beat or safe point (L2).

Who takes: one worker per consumer, the one in its first slot (taskq.service.
LaneWorker); every worker renews its own lease. The proof above holds for any
set of takers, so fewer change nothing in it; liveness needs a taker alive,
and every consumer has one. A taker that dies is replaced in its slot, and the
replacement judges no one before it has watched a whole grace itself (b), so
the orphans of a dead taker wait about a grace longer. One taker per worker
made a consumer of 12 workers scan for orphans 12 times per heartbeat.

Pending or retrying records older than the grace that are in neither the
broker's queue nor its schedule (a worker died between dequeue and claim; a
claim refused during an outage; a scheduler died between taking a retry off
the schedule and queueing it) are queued again after two checks in a row;
their later claim (L1) keeps a duplicate copy from running.

SIGTERM needs none of this: the interrupted task is requeued at once (the
ledger's interrupted signal). A sync's claim on its account lapses with its
task's ledger state, so no lock outlives a dead worker.
"""
import datetime
import logging
import os
import re
import signal
import threading
import time

import models
from mailkit import logs
from taskq import ledger
from taskq.service import HOST

logger = logging.getLogger('emailsvc.tasks')
H = models.ConsumerHeartbeat


class Fenced(Exception):
    """This worker's lease row is gone: another worker took it for dead and re-queued its tasks."""


class Lease:
    """This worker's row in consumer_heartbeat: registered once, renewed with the database's clock.

    It also keeps what its recovery needs to know about itself: when the last
    renewal began (monotonic) and whether the renewals have run unbroken.
    """

    def __init__(self, huey):
        self.huey = huey
        self.max_gap = huey.settings['consumer.recovery_grace'] / 2
        self.lock = threading.Lock()
        self.registered = self.ended = False
        self.renewed_at = None    # monotonic start of the last successful renewal
        self.unbroken = False     # False after a failed or slow renewal, until the next one succeeds in time
        # What the dashboard shows of this worker: kept in memory by the task
        # signals and written with the renewal, so the hot path writes nothing more.
        self.current_task, self.tasks_done = None, 0

    def renew(self):
        """Register or renew; raises Fenced if the row is gone, the database's error if it cannot answer."""
        with self.lock:
            if self.ended:
                return
            started = time.monotonic()
            try:
                self._write()
            except Exception:
                self.unbroken = False
                raise
            ended = time.monotonic()
            in_time = self.renewed_at is not None and started - self.renewed_at <= self.max_gap \
                and ended - started <= self.max_gap
            self.unbroken, self.renewed_at = in_time, started

    def _write(self):
        clock = models.clock_sql()
        fields = dict(tasks_done=self.tasks_done, current_task=self.current_task, rss_kb=rss_kb())
        with models.database.connection_context():
            if not self.registered:
                # Inserted once, before any claim (L1); a lost answer to the insert finds the row on retry.
                H.insert(id=self.huey.worker_id(), host=HOST, pid=os.getpid(), consumer_pid=os.getppid(),
                         started_at=models.pw.SQL(clock), last_seen=models.pw.SQL(clock), **fields) \
                    .on_conflict_ignore().execute()
                self.registered = True
                return
            if not H.update(last_seen=models.pw.SQL(clock), **fields).where(H.id == self.huey.worker_id()).execute():
                raise Fenced(self.huey.worker_id())

    def fresh(self):
        """True while this worker's own renewals run unbroken and the last one began within half the grace."""
        return self.unbroken and time.monotonic() - self.renewed_at <= self.max_gap

    def check(self):
        """At a run's safe point: once the lease is older than half the grace, renew it now; die if fenced."""
        if self.renewed_at is not None and time.monotonic() - self.renewed_at <= self.max_gap:
            return
        try:
            self.renew()
        except Fenced:
            die_fenced(self.huey.worker_id())
        except (models.pw.OperationalError, models.pw.InterfaceError) as exc:
            # The database is away for this run as for any taker; every effect the
            # run could make waits on a compare-and-set in it (L3), so it goes on.
            logger.warning('lease not renewed at a safe point (%s); the run goes on', str(exc).strip())

    def end(self):
        with self.lock:
            self.ended = True   # a beat after this would find the row gone and take itself for fenced
            models.with_reconnect(lambda: H.delete().where(H.id == self.huey.worker_id()).execute())


def die_fenced(worker):
    logger.error('worker %s was taken for dead and its tasks re-queued; it stops now', worker)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


class Heartbeat:
    """The worker's heartbeat thread: replays deferred ledger writes, renews the lease, recovers orphans."""

    def __init__(self, huey):
        self.interval = huey.settings['consumer.heartbeat_seconds']
        self.lease = Lease(huey)
        self.recovery = Recovery(huey, self.lease)
        self.stop = threading.Event()

    def start(self):
        threading.Thread(target=self.run, name='heartbeat', daemon=True).start()

    def run(self):
        while True:
            self.beat()
            if self.stop.wait(self.interval):
                return

    def beat(self):
        try:
            ledger.deferred.replay()
            self.lease.renew()
            if self.lease.huey.recovers:
                self.recovery.run()
        except Fenced:
            die_fenced(self.lease.huey.worker_id())
        except Exception:  # a database or broker outage must not end the thread
            logger.exception('heartbeat or recovery failed; retrying in %ss', self.interval)

    def end(self):
        self.stop.set()
        self.lease.end()


class Recovery:
    """Finds the orphans of gone workers and of the broker and queues them again (R1, R2 above)."""

    # The first field of the signed envelope's message is the task id.
    PAYLOAD_ID = re.compile(rb'"\$msg":\["([^"]+)"')

    def __init__(self, huey, lease):
        self.huey, self.lease = huey, lease
        self.grace = huey.settings['consumer.recovery_grace']
        self.observed = {}    # worker -> (its last_seen stamp, monotonic time this worker first saw it)
        self.suspects = set()  # ids that looked lost at the previous check
        self.pruned_at = None

    def run(self):
        """Requeue the tasks of gone workers and the tasks the broker lost; returns their ids."""
        if not self.lease.fresh():
            self.observed = {}    # (b): observations count only inside one unbroken run of renewals
            return []
        recovered = []
        with models.all_tenants():
            for worker in self.gone_workers():
                for row in ledger.running_under(worker):
                    recovered += self.requeue(row, (ledger.RUNNING,), {'worker': worker},
                                              f'worker {worker} stopped renewing its lease; re-queued')
            recovered += self.lost_by_broker()
            self.prune_leases()
        if recovered:
            logger.warning('re-queued %d orphaned tasks: %s', len(recovered), ', '.join(recovered))
        return recovered

    def gone_workers(self):
        """Workers holding running records whose lease is gone (R1) or that this worker fences now (R2)."""
        busy = ledger.running_workers() - {self.huey.worker_id()}   # read first: see R1 above
        leases = self.read_leases()
        gone = [worker for worker in busy if worker not in leases]
        for worker in busy & leases.keys():
            stamp, seen_since, expired = leases[worker]
            if expired and time.monotonic() - seen_since >= self.grace and self.lease.fresh() \
                    and self.fence(worker, stamp):
                gone.append(worker)
        return gone

    def read_leases(self):
        """{worker: (stamp, monotonic first sight of that stamp, older than the grace by the database's clock)}."""
        sql = (f'SELECT "id", "last_seen", "last_seen" < {models.clock_sql(-self.grace)} '
               f'FROM "consumer_heartbeat"')
        rows = models.database.execute_sql(sql).fetchall()
        now = time.monotonic()
        leases = {}
        for worker, stamp, expired in rows:
            seen = self.observed.get(worker)
            leases[worker] = (stamp, seen[1] if seen and seen[0] == stamp else now, bool(expired))
        self.observed = {worker: lease[:2] for worker, lease in leases.items()}
        return leases

    def fence(self, worker, stamp):
        """Delete `worker`'s lease row if it still holds `stamp` and is past the grace; True if deleted."""
        sql = (f'DELETE FROM "consumer_heartbeat" WHERE "id" = {models.database.param} AND "last_seen" = '
               f'{models.database.param} AND "last_seen" < {models.clock_sql(-self.grace)}')
        fenced = models.database.execute_sql(sql, (worker, stamp)).rowcount == 1
        if fenced:
            logger.warning('worker %s has not renewed its lease for %ss: fenced', worker, self.grace)
        return fenced

    # Every worker start registers a new name, so the rows of workers long gone
    # (and idle when they went) are deleted, at most once a minute per worker.
    PRUNE_AFTER, PRUNE_EVERY = 3600, 60

    def prune_leases(self):
        if self.pruned_at is not None and time.monotonic() - self.pruned_at < self.PRUNE_EVERY:
            return
        self.pruned_at = time.monotonic()
        busy = ledger.Record.select(ledger.Record.worker).where(ledger.Record.state == ledger.RUNNING,
                                                                ledger.Record.worker.is_null(False))
        H.delete().where(H.last_seen < models.pw.SQL(models.clock_sql(-self.PRUNE_AFTER)), H.id.not_in(busy)).execute()

    def lost_by_broker(self):
        # The broker is read before the ledger: a task a worker takes in between
        # is then still 'pending' only for the instant before its claim, and it
        # must look lost on two checks in a row before it is re-queued.
        cutoff = models.database_now() - datetime.timedelta(seconds=self.grace)
        lost, recovered = {}, []
        if ledger.stale_waiting(cutoff, count=True):
            in_broker = self.ids_in_broker()
            lost = {r.id: r for r in ledger.stale_waiting(cutoff) if r.id not in in_broker}
        for task_id in lost.keys() & self.suspects:
            row = lost[task_id]
            recovered += self.requeue(row, (row.state,), {'enqueued_at': row.enqueued_at},
                                      'lost by the broker; re-queued')
        self.suspects = lost.keys() - set(recovered)
        return recovered

    def requeue(self, row, from_states, expect, reason):
        try:
            ledger.requeue(self.huey, row, from_states=from_states, expect=expect, reason=reason)
        except ledger.LedgerConflict:
            return []  # another worker got there first, or the run ended meanwhile
        return [row.id]

    def ids_in_broker(self):
        """The ids of every task in the broker's queue and schedule."""
        storage = self.huey.storage
        payloads = list(storage.enqueued_items()) + list(storage.scheduled_items())
        return {match.group(1).decode() for data in payloads if (match := self.PAYLOAD_ID.search(bytes(data)))}


def consumer_of(worker):
    """The consumer a worker belongs to, `host:consumer id`, from its name `host:pid:consumer id`
    (a name from before consumer ids, `host:pid`, stands for itself)."""
    host, pid, consumer = (worker.split(':', 2) + [''])[:3]
    return f'{host}:{consumer}' if consumer else worker


def rss_kb():
    """This process's resident memory in KiB (Linux), or None."""
    try:
        with open('/proc/self/statm') as statm:
            return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') // 1024
    except (OSError, ValueError, IndexError):
        return None


def install(huey):
    """Each worker process configures logging, holds its lease and recovers from its start to its stop."""
    heartbeat = Heartbeat(huey)
    lease = heartbeat.lease

    @huey.on_startup()
    def start_worker():
        logs.configure(huey.settings['log.level'])
        try:
            lease.renew()   # registered before the first claim can need it (L1)
        except Exception as exc:
            logger.warning('lease not registered yet (%s); the heartbeat keeps trying', exc)
        ledger.SAFE_POINT_CHECKS[:] = [lease.check]
        heartbeat.start()

    @huey.on_shutdown()
    def stop_worker():
        ledger.deferred.release()   # a held final write (taskq.ledger.DeferredLedger), while the lease lasts
        heartbeat.end()

    @huey.pre_execute()
    def task_begins(task):
        lease.current_task = task.id

    @huey.post_execute()
    def task_ends(task, value, exc):
        lease.current_task = None
        lease.tasks_done += 1

    return heartbeat
