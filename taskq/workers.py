"""Workers' heartbeats and the recovery of tasks whose worker died.

Huey is at-most-once: a task dequeued by a worker that dies is gone. The
ledger and the heartbeats make it at-least-once without adding a write to
the hot path: a task's record already says `running` and which worker
(host:pid) runs it, and every worker already refreshes its heartbeat every
few seconds. On each beat, each worker also looks for

  - `running` records whose worker has not beaten for recovery_grace
    seconds (SIGKILL, OOM, a lost host);
  - `pending` or `retrying` records older than the grace that are in neither
    the broker's queue nor its schedule (a worker died between dequeue and
    its first signal; a scheduler died between taking a retry off the
    schedule and queueing it; a web process died after the ledger insert);

and queues them again under the same id, its attempt count kept. Several
workers may find the same orphan: a conditional UPDATE on the record decides
which one requeues it. Running a task twice is safe because every task is
idempotent (sync stores by UID, send consults its outbox, delete skips what
is gone). SIGTERM needs none of this: the interrupted task is requeued at once
(the ledger's interrupted signal). A sync's claim on its account lapses with
its task's ledger state, so no lock outlives a dead worker.

Recovery leaves live workers' records alone, so a live worker must never
leave a finished task `running`: its ledger writes wait, in order, while the
database is away and its heartbeat thread makes them when it is back
(ledger.DeferredLedger); a broker outage between a task's end and its end
signals is logged and passed over (LedgerHuey.delete).
"""
import datetime
import logging
import os
import re
import threading

import models
from mailkit import logs
from taskq import ledger
from taskq.service import HOST

logger = logging.getLogger('emailsvc.tasks')


class Heartbeat:
    """A worker's proof of life: its row's last_seen moves every few seconds; each beat also recovers orphans."""

    def __init__(self, huey):
        self.huey = huey
        self.interval = huey.settings['consumer.heartbeat_seconds']
        self.recovery = Recovery(huey)
        self.stop = threading.Event()
        # What the dashboard shows of this worker: kept in memory by the task
        # signals and written with the beat, so the hot path writes nothing more.
        self.current_task, self.tasks_done = None, 0

    def start(self):
        threading.Thread(target=self.run, name='heartbeat', daemon=True).start()

    def run(self):
        while True:
            try:
                ledger.deferred.replay()
                self.beat()
                self.recovery.run()
            except Exception:  # a database or broker outage must not end the thread
                logger.exception('heartbeat or recovery failed; retrying in %ss', self.interval)
            if self.stop.wait(self.interval):
                return

    def beat(self):
        now = models.utcnow()
        with models.database.connection_context():
            models.ConsumerHeartbeat.insert(
                id=self.huey.worker_id(), host=HOST, pid=os.getpid(), consumer_pid=os.getppid(),
                started_at=now, last_seen=now,
                tasks_done=self.tasks_done, current_task=self.current_task, rss_kb=rss_kb(),
            ).on_conflict(conflict_target=[models.ConsumerHeartbeat.id],
                          update={models.ConsumerHeartbeat.last_seen: now,
                                  models.ConsumerHeartbeat.tasks_done: self.tasks_done,
                                  models.ConsumerHeartbeat.current_task: self.current_task,
                                  models.ConsumerHeartbeat.rss_kb: rss_kb()}).execute()

    def end(self):
        self.stop.set()
        models.with_reconnect(lambda: models.ConsumerHeartbeat.delete()
                              .where(models.ConsumerHeartbeat.id == self.huey.worker_id()).execute())


class Recovery:
    """Finds the orphans of dead workers and of the broker and queues them again."""

    # The first field of the signed envelope's message is the task id.
    PAYLOAD_ID = re.compile(rb'"\$msg":\["([^"]+)"')

    def __init__(self, huey):
        self.huey = huey
        self.suspects = set()  # ids that looked lost at the previous check

    def run(self, now=None):
        """Requeue the tasks of dead workers and the tasks the broker lost; returns their ids."""
        now = now or models.utcnow()
        cutoff = now - datetime.timedelta(seconds=self.huey.settings['consumer.recovery_grace'])
        recovered = []
        with models.all_tenants():
            for row in ledger.orphaned_running(cutoff):
                if worker_alive_here(row.worker):
                    continue  # a busy worker on this host whose beat is late: alive all the same
                # Only while that dead worker still holds it: another worker may have
                # re-queued it already, and a new run may be under way.
                recovered += self.requeue(row, (ledger.RUNNING,), {'worker': row.worker},
                                          f'worker {row.worker} died; re-queued')
            # The broker is read before the ledger: a task a worker takes in between
            # is then still 'pending' only for the instant before its first signal,
            # and it must look lost on two checks in a row before it is re-queued.
            lost = {}
            if ledger.stale_waiting(cutoff, count=True):
                in_broker = self.ids_in_broker()
                lost = {r.id: r for r in ledger.stale_waiting(cutoff) if r.id not in in_broker}
            for task_id in lost.keys() & self.suspects:
                row = lost[task_id]
                recovered += self.requeue(row, (row.state,), {'enqueued_at': row.enqueued_at},
                                          'lost by the broker; re-queued')
            self.suspects = lost.keys() - set(recovered)
        if recovered:
            logger.warning('re-queued %d orphaned tasks: %s', len(recovered), ', '.join(recovered))
        return recovered

    def requeue(self, row, from_states, expect, reason):
        try:
            ledger.requeue(self.huey, row, from_states=from_states, expect=expect, reason=reason)
        except ledger.LedgerConflict:
            return []  # another worker got there first
        return [row.id]

    def ids_in_broker(self):
        """The ids of every task in the broker's queue and schedule."""
        storage = self.huey.storage
        payloads = list(storage.enqueued_items()) + list(storage.scheduled_items())
        return {match.group(1).decode() for data in payloads if (match := self.PAYLOAD_ID.search(bytes(data)))}


def rss_kb():
    """This process's resident memory in KiB (Linux), or None."""
    try:
        with open('/proc/self/statm') as statm:
            return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') // 1024
    except (OSError, ValueError, IndexError):
        return None


def worker_alive_here(worker):
    """True if `worker` (host:pid) is a live process on this host; a late heartbeat alone proves no death."""
    host, _, pid = (worker or '').rpartition(':')
    if host != HOST or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def install(huey):
    """Each worker process configures logging, beats and recovers from its start to its stop."""
    heartbeat = Heartbeat(huey)

    @huey.on_startup()
    def start_worker():
        logs.configure(huey.settings['log.level'])
        heartbeat.start()

    @huey.on_shutdown()
    def stop_worker():
        heartbeat.end()

    @huey.pre_execute()
    def task_begins(task):
        heartbeat.current_task = task.id

    @huey.post_execute()
    def task_ends(task, value, exc):
        heartbeat.current_task = None
        heartbeat.tasks_done += 1

    return heartbeat
