"""The service's Huey: the ledger at enqueue, lanes, the task decorator, time limits and retry delays.

`make_huey(settings)` builds the instance for the configured broker (SQLite
file or Redis) with the signed JSON serializer; `@huey.service_task(...)`
registers a task with the service's rules (lane, priority, retries with capped,
jittered backoff, soft and hard time limits, tenant scope) and keeps it in
`huey.service_tasks`, by name, so a record can be queued again from the
ledger. The instance carries what the rest of the machinery needs (settings,
registry, worker identity), so nothing here imports tasks.py.

Lanes (config.ini's [lanes]: sync, send, delete, spam, periodic, webhooks)
are built on one Huey, not one Huey per lane. Huey keeps a task's schedule,
revoke mark and locks in its storage under the instance's name, and its
registry, signals and hooks on the instance; a Huey per lane would split them,
so revoking, re-running or recovering a task would first have to find its
lane's instance, and each would need a scheduler. Only the queue a worker pops
from must differ by lane (huey.consumer.Worker.loop calls `huey.dequeue()`,
which is `storage.dequeue()`). So: one instance, one registry and schedule;
`enqueue` puts each task into its lane's queue (storage.py); and the consumer
gives each worker a view of the instance whose storage is its lane's
(`huey.lane(name)`), the same Huey in every other respect. One consumer serves
every lane by default, each with its configured workers; `lanes=` serves some.
`huey_consumer tasks.huey` builds the same consumer: every lane, [lanes]'s
worker counts (its -w is not used), -k, -M, -n and the rest as given.
"""
import contextlib
import contextvars
import copy
import functools
import gc
import json
import logging
import os
import pathlib
import random
import secrets
import select
import signal
import tempfile
import threading
import time

import redis
from huey import Huey
from huey import signals as S
from huey.constants import EmptyData
from huey.consumer import Consumer, ForkSafeFlag, ProcessEnvironment, Worker
from huey.exceptions import ConfigurationError

import models
from mailkit import logs
from mailkit import settings as settings_mod
from taskq import ledger
from taskq.storage import AllRedisLanes, AllSqliteLanes, SignedJsonSerializer, WaitingSlots

logger = logging.getLogger('emailsvc.tasks')


PER_TASK_LINES = frozenset({'Executing %s', '%s executed in %0.3fs'})


def per_task_lines_at_debug(huey_logger):
    """Huey logs two INFO lines for every task it runs ("Executing ...", "... executed in ..."); here
    they are DEBUG lines. The ledger records every run's start and end (the dashboard, `./run.sh tasks`,
    the API), and at INFO the two lines cost a no-op task's worker ~25 % of its CPU (a drain ran
    3,024-3,524 tasks/s at INFO against 3,671-4,006 at WARNING). Huey's other lines stay at INFO.
    Its `info` is wrapped, not filtered: a logging.Filter runs after the record is made, 9 us each."""
    info = huey_logger.info

    def info_but_per_task_lines(msg, *args, **kwargs):
        if msg not in PER_TASK_LINES:
            info(msg, *args, **kwargs)
        elif huey_logger.isEnabledFor(logging.DEBUG):
            huey_logger.debug(msg, *args, stacklevel=2, **kwargs)
    huey_logger.info = info_but_per_task_lines


per_task_lines_at_debug(logging.getLogger('huey'))

PRIORITIES = (10, 9, 8, 5, 3)
DEFAULT_LANE = 'periodic'  # housekeeping: the lane of a task that names none


class LedgerHuey(Huey):
    """Huey that records each new task in the ledger before the broker sees it,
    carries the caller's request id inside the signed payload, and registers
    the service's tasks by name."""

    def __init__(self, *args, settings, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.service_tasks = {}  # name -> task wrapper, for re-running a record by its name
        self.watchdog = Watchdog(enabled=settings['consumer.worker_type'] == 'process')
        self.lane_workers = settings_mod.lanes(settings)  # lane -> worker processes
        self.storage.add_lanes(self.lane_workers, DEFAULT_LANE, **self.storage_kwargs)
        self.lane_storages = self.storage.lanes   # lane -> its storage; lane views share it (a retry enqueues)
        for lane, storage in self.lane_storages.items():   # idle workers of one host wait in turn
            if self.lane_workers[lane]:
                storage.waiting = WaitingSlots(str(settings['paths.var'] / 'waiting'), f'{self.name}.{lane}',
                                               self.lane_workers[lane])
        self._lane_views = {}
        self.recovers = True   # this process's heartbeat recovers orphans; a consumer's first worker only
        self.on_shutdown('drop_stale_revoke_marks')(self.drop_stale_marks)

    def drop_stale_marks(self):
        """A stopping worker drops the revoke marks it was keeping for its next pop."""
        for lane in self.lane_storages.values():
            if hasattr(lane, 'drop_stale_marks'):
                lane.drop_stale_marks()

    def enqueue(self, task):
        """Queue `task` into its lane and return it; its id is the ledger id.

        Huey.enqueue's steps for one task (this service queues no groups or
        chords, keeps no results and never runs immediate), with the lane and
        the tenant, whose turn orders the lane (storage.py), passed on."""
        recorded_now = ledger.record(task)
        try:
            if task.expires:
                task.resolve_expires(self.utc)
            self._emit(S.SIGNAL_ENQUEUED, task)
            self.lane_storages[type(task).lane].enqueue(self.serialize_task(task), task.priority,
                                                        ledger.call_arguments(task).get('tenant_id'))
        except Exception:
            if recorded_now:  # the caller gets the error: leave no phantom pending task behind
                ledger.delete(task.id)
            raise
        return task

    def dequeue(self):
        data = self.storage.dequeue()
        if data is None:
            return None
        task = self.deserialize_task(data)
        task.revoke_marks = getattr(self.storage, 'marks', None)  # read with the pop, where the lane can
        return task

    def is_revoked(self, task, timestamp=None, peek=True):
        """Huey's check, from the marks read with the pop when there are some (a round trip less)."""
        marks = getattr(task, 'revoke_marks', None)
        if marks is None:
            return super().is_revoked(task, timestamp, peek)
        task.revoke_marks = None   # good for the check before the run only
        for key, data in zip(self._revoke_keys(task), marks):
            revoked, restore = self._check_revoked(EmptyData if data is None else data, timestamp, peek)
            if restore:
                self.delete(key)
            if revoked:
                return True
        return False

    def delete(self, key):
        """Huey drops a task's revoke key after the run and before the task's end
        signals: a broker outage there would skip them, and the ledger would say
        `running` for good under a live worker. A key left behind only matters
        if the task was revoked, and then it is still right. A lane's worker
        drops revoke keys with its next pop instead (storage.LaneRedisStorage)."""
        if key.startswith('r:') and getattr(self.storage, 'stale_marks', None) is not None \
                and self.storage.lane is not None:
            self.storage.stale_marks.append(key)
            return True
        try:
            return super().delete(key)
        except Exception as exc:   # redis.ConnectionError, sqlite3 "locked": logged, the run goes on
            logger.warning('could not drop %s from the broker: %s', key, exc)
            return False

    def serialize_task(self, task):
        message = self._registry.create_message(task)
        request_id = getattr(task, 'request_id', None) or logs.request_id.get()
        return self.serializer.serialize({'m': message, 'rid': request_id})

    def deserialize_task(self, data):
        envelope = self.serializer.deserialize(data)
        task = self._registry.create_task(envelope['m'])
        task.request_id = envelope.get('rid')
        return task

    def create_consumer(self, **options):
        return LedgerConsumer(self, **options)

    def lane(self, name):
        """This Huey as a worker of lane `name` sees it: the same in all but the queue it pops from."""
        if name not in self._lane_views:
            view = copy.copy(self)
            view.storage = self.lane_storages[name]
            self._lane_views[name] = view
        return self._lane_views[name]

    # ------------------------------------------------------------ tasks

    def service_task(self, priority, retries, periodic=None, lane=DEFAULT_LANE):
        """Register a task with the service's lane, priority, retry, time-limit and scope rules.

        The function runs inside its tenant's scope (or all_tenants() when it
        takes no tenant), with the request id of the call that queued it; an
        error in NO_RETRY fails it at once; past the soft limit Huey raises
        TaskTimeout inside it, past the hard limit the worker process is killed.
        """
        if lane not in self.lane_workers:
            raise ConfigurationError(f'no lane {lane!r}: config.ini\'s [lanes] has {", ".join(self.lane_workers)}')

        def decorate(func):
            soft, hard = self.time_limits(func.__name__)

            @functools.wraps(func)
            def run(*args, task=None, **kwargs):
                tenant_id = ledger.tenant_of_call(func, args, kwargs)
                scope = models.tenant_scope(tenant_id) if tenant_id is not None else models.all_tenants()
                left = retries_left.set(getattr(task, 'retries', None))
                with scope, self.watchdog.limit(task, hard):
                    try:
                        result = func(*args, **kwargs)
                    except ledger.NO_RETRY:
                        task.retries = 0
                        raise
                    finally:
                        retries_left.reset(left)
                task.ledger_result = result
                return result

            options = dict(priority=priority, retries=retries, context=True, timeout=soft, name=func.__name__)
            if retries:
                options.update(retry_delay=self.settings['retry.base_delay'], retry_backoff=2)
            wrapper = self.periodic_task(periodic, **options)(run) if periodic else self.task(**options)(run)
            wrapper.task_class.func = func
            wrapper.task_class.lane = lane
            self.service_tasks[func.__name__] = wrapper
            return wrapper
        return decorate

    def time_limits(self, name):
        """(soft, hard) seconds for the task `name`: its own limits.<name>_* or the defaults."""
        prefix = f'limits.{name}' if f'limits.{name}_soft' in self.settings else 'limits.default'
        return self.settings[f'{prefix}_soft'], self.settings[f'{prefix}_hard']

    def retry_delay(self, task, rand=random.random):
        """Seconds before the task's next attempt: base * 2^(n-1) for the n-th retry, capped, with jitter.

        Counted from the retries left rather than from Huey's running product,
        which would compound the jitter of every attempt; Huey itself doubles
        the delay without bound or jitter.
        """
        retry_number = type(task).default_retries - task.retries + 1
        nominal = self.settings['retry.base_delay'] * task.retry_backoff ** (retry_number - 1)
        return jittered(nominal, self.settings['retry.max_delay'], self.settings['retry.jitter'], rand)

    # ------------------------------------------------------------ identity and depth

    @staticmethod
    def worker_id():
        """This worker process's name in heartbeats and records: host:pid:consumer id."""
        return f'{HOST}:{os.getpid()}:{CONSUMER_ID}'

    def queue_depth(self):
        """Tasks waiting in the broker, by priority and by lane (each lane by priority too)."""
        counts = {str(p): 0 for p in PRIORITIES}
        by_lane = {}
        for name, lane in self.lane_storages.items():
            depth = {str(p): count for p, count in sorted(lane.depth_by_priority(PRIORITIES).items(), reverse=True)
                     if count}
            by_lane[name] = {'depth': sum(depth.values()), 'by_priority': depth}
            for priority, count in depth.items():
                counts[priority] = counts.get(priority, 0) + count
        return {'depth': sum(counts.values()), 'by_priority': counts, 'by_lane': by_lane}


HOST = os.uname().nodename
# Hostnames repeat (containers, clones) and so do pids (each container's start
# at 1): with a random id drawn once per consumer, which its forked workers
# inherit, a worker's name is unique on any number of hosts. A boot id would
# not do: containers on one kernel share it, and may share hostname and pid too.
CONSUMER_ID = secrets.token_hex(6)


# The retries the running task has left (None outside a task). A task whose
# own rows must say how it ended (send_email's outbox) asks last_attempt():
# the ledger records the end after the task returns, in a transaction of its own.
retries_left = contextvars.ContextVar('retries_left', default=None)


def last_attempt():
    """True in a task's last attempt: if it raises now, it is not retried (the ledger marks it dead)."""
    return retries_left.get() == 0


def jittered(delay, cap, jitter, rand=random.random):
    """`delay` capped at `cap`, less a random fraction of up to `jitter` of it, so retries spread out."""
    return min(delay, cap) * (1 - jitter * rand())


def make_huey(settings):
    """The service's Huey for `queue.url`: SqliteHuey's storage with a doorbell, or PriorityRedisHuey's."""
    url = settings['queue.url']
    # results=False: the ledger is the one result store (kept queue.results_ttl,
    # then cleared), which also saves the broker a write per task.
    common = dict(name=settings['queue.name'], serializer=SignedJsonSerializer(settings['server.secret']),
                  results=False, utc=True, settings=settings)
    if settings_mod.is_embedded(url):
        path = settings_mod.sqlite_path(url)
        settings_mod.make_private_file(path)   # 0600 in a 0700 var/: payloads name accounts and messages
        return LedgerHuey(storage_class=AllSqliteLanes, filename=str(path), timeout=15, **common)
    if url.startswith(('redis:', 'rediss:', 'unix:')):
        # Redis wakes blocked workers by itself (BZPOPMIN); health_check_interval
        # notices a restarted server instead of hanging on a dead socket.
        pool = redis.ConnectionPool.from_url(url, health_check_interval=10, socket_timeout=10,
                                             socket_connect_timeout=5)
        return LedgerHuey(storage_class=AllRedisLanes, connection_pool=pool, blocking=True,
                          read_timeout=1, **common)
    raise SystemExit(f'emailsvc: {settings_mod.config_path()}: [queue] url must start with sqlite:/// or '
                     f'redis://, got {url.split(":", 1)[0]!r}; fix it there or in EMAILSVC_QUEUE_URL')


# ---------------------------------------------------------------- hard time limits
#
# A task past its hard limit is killed first and recorded after, by another
# process: a worker that had to write the ledger before killing itself would
# stay alive past its limit whenever that write failed or hung (a database
# outage is exactly when tasks hang). The watchdog leaves a note naming the
# task in a file, kills its own process, and the consumer's main process,
# which notices the dead worker within its health-check interval, records the
# failure from the note before it starts a replacement.

class Watchdog:
    """Kills this worker process when a task outlives its hard limit despite the soft one.

    One thread per worker process, started on its first task, sleeps until
    the running task's deadline (a thread per task cost 1.5 ms, measured).
    A task wakes the thread only when it sleeps with no deadline or past the
    task's: a busy worker's next deadline is nearly always later, and the
    thread that wakes at an old deadline finds the new one and sleeps on (a
    wake-up per task cost a thread switch and the GIL twice, ~40 us of a no-op
    task's worker time).
    Only process workers can be killed alone; the consumer starts a fresh
    worker in its place. With thread workers the soft limit is all there is.
    """

    def __init__(self, enabled):
        self.enabled = enabled
        self.wakeup = threading.Condition()
        self.task = self.seconds = self.deadline = None
        self.sleeps_until = None   # the deadline the thread waits for; None: it waits for a task
        self.pid = None

    @contextlib.contextmanager
    def limit(self, task, seconds):
        if not self.enabled:
            yield
            return
        self._ensure_thread()
        with self.wakeup:
            self.task, self.seconds, self.deadline = task, seconds, time.monotonic() + seconds
            if self.sleeps_until is None or self.deadline < self.sleeps_until:
                self.wakeup.notify()
        try:
            yield
        finally:
            with self.wakeup:
                self.deadline = None

    def _ensure_thread(self):
        if self.pid != os.getpid():  # a forked worker inherits no threads
            self.pid = os.getpid()
            self.wakeup, self.sleeps_until = threading.Condition(), None
            threading.Thread(target=self._watch, name='hard-limit', daemon=True).start()

    def _watch(self):
        with self.wakeup:
            while True:
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    self._kill()
                # Between tasks it sleeps one hard limit more, not for good: a short task
                # is over before the thread runs, and the next would have to wake it again.
                self.sleeps_until = self.deadline if self.deadline is not None else \
                    None if self.seconds is None else time.monotonic() + self.seconds
                self.wakeup.wait(None if self.sleeps_until is None else self.sleeps_until - time.monotonic())

    def _kill(self):
        try:
            note = kill_note_path(os.getppid(), os.getpid())
            note.write_text(json.dumps({'task_id': self.task.id, 'seconds': self.seconds,
                                        'worker': LedgerHuey.worker_id()}))
        finally:  # not even a full disk keeps the worker alive past its limit
            os.kill(os.getpid(), signal.SIGKILL)


def kill_note_path(consumer_pid, worker_pid):
    return pathlib.Path(tempfile.gettempdir()) / f'emailsvc-hard-limit-{consumer_pid}-{worker_pid}.json'


class ExitWatchingFlag(ForkSafeFlag):
    """Huey's stop flag for process workers (they share it and see Huey's); in the consumer's own
    process its wait, the consumer's loop's 0.1 s pause, also ends as soon as a watched process (a
    worker, the scheduler) exits, through a pidfd each (Linux 5.3+). The loop then checks its
    workers at once: a recycled worker's successor started up to 0.1 s after its exit."""

    def __init__(self):
        super().__init__()
        self.owner = os.getpid()
        self.pidfds = {}   # pid -> pidfd, in the consumer's process; None where pidfds fail

    def watch(self, pid):
        """Also end the wait when `pid` exits; without a pidfd the loop's next 0.1 s turn finds the exit."""
        if self.pidfds is None:
            return
        try:
            self.pidfds[pid] = os.pidfd_open(pid)
        except ProcessLookupError:
            logger.info('process %d exited before it could be watched; the next check replaces it', pid)
        except (AttributeError, OSError) as exc:   # not Linux 5.3+, or out of descriptors
            logger.warning('worker exits not watched (%s): a dead or recycled worker is replaced at the '
                           "consumer loop's next 0.1 s turn", exc)
            self._stop_watching()

    def _stop_watching(self):
        for fd in self.pidfds.values():
            os.close(fd)
        self.pidfds = None

    def wait(self, timeout=None):
        if os.getpid() != self.owner or not self.pidfds:
            return super().wait(timeout)
        poller = select.poll()
        for fd in (self._r, *self.pidfds.values()):
            poller.register(fd, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(None if timeout is None else timeout * 1000)}
        for pid, fd in list(self.pidfds.items()):
            if fd in ready:   # reported once: a pidfd stays readable after the exit
                os.close(self.pidfds.pop(pid))
        return self._r in ready


class ExitWatchingEnvironment(ProcessEnvironment):
    def get_stop_flag(self):
        return ExitWatchingFlag()


class LedgerConsumer(Consumer):
    """Huey's consumer with each worker bound to a lane; it records the tasks its watchdogs killed
    and replaces dead workers in their own lanes.

    `lanes` (names; None: every lane) picks the lanes served, each with its
    configured workers; `workers` (Huey's -w) is not used. The periodic
    schedule runs where the periodic lane is served. Every consumer's scheduler
    moves due retries from the shared schedule into their lanes. Worker health
    is checked at every turn of the consumer's loop (0.1 s), whatever Huey's
    -c says: a dead or recycled (-M) worker's lane runs a worker short until
    the check, and Huey's default of 10 s made that 10 s per recycle.
    """

    def __init__(self, huey, lanes=None, workers=None, periodic=True, health_check_interval=None, **options):
        self._early_signals = hold_stop_signals()
        served = huey.lane_workers if lanes is None else {name: huey.lane_workers[name] for name in lanes}
        self.lane_plan = [name for name, count in served.items() for _ in range(count)]
        if not self.lane_plan:
            raise ConfigurationError(f'no workers in lanes {", ".join(served)}: config.ini\'s [lanes] gives them 0')
        self._initial_slots = enumerate(self.lane_plan)
        self._kill_notes_left = True   # a note from before a restart, or whose write waits for the database
        super().__init__(huey, workers=len(self.lane_plan), periodic=periodic and 'periodic' in served,
                         health_check_interval=0, **options)
        logger.info('consumer serves lanes %s', ', '.join(f'{name} ({count})' for name, count in served.items()))

    def start(self):
        """Huey's start, with what every worker needs loaded first so that its pages are shared; then
        any stop signal that came while it forked, to the handlers it set last."""
        if self.environment.forks:
            share_before_fork(self.huey)
        super().start()
        for process in [self.scheduler] + [process for _, process in self.worker_threads]:
            self._watch(process)
        for signum in self._early_signals:
            os.kill(os.getpid(), signum)

    def get_environment(self, worker_type):
        environment = super().get_environment(worker_type)
        return ExitWatchingEnvironment(environment.graceful, environment.interrupt) if environment.forks \
            else environment

    def _watch(self, process):
        """Wake the consumer's loop when this worker or scheduler process exits (process workers only)."""
        if isinstance(self.stop_flag, ExitWatchingFlag):
            self.stop_flag.watch(process.pid)

    def _create_worker(self, lane=None, slot=None):
        if lane is None:   # Huey's __init__ creates them in lane_plan's order
            slot, lane = next(self._initial_slots)
        # One recovery per consumer, in its first slot (a replacement there takes it over): every
        # worker recovering made a consumer of 12 workers scan for orphans 12 times per heartbeat.
        return LaneWorker(self.huey, lane, recovers=slot == 0 or not self.environment.forks,
                          stop_flag=self.stop_flag, default_delay=self.default_delay, max_delay=self.max_delay,
                          backoff=self.backoff, max_tasks=self.max_tasks)

    def _ran_its_tasks(self, worker, process):
        """A process worker leaves on Huey's WorkerRecycle with a clean exit; a thread's count is ours to read."""
        return bool(self.max_tasks) and (getattr(process, 'exitcode', None) == 0 or worker.task_count >= self.max_tasks)

    def check_worker_health(self):
        """Huey's check, with each dead worker replaced in its lane (Huey's would not know which), and
        a worker that ran its max_tasks (Huey's -M) told apart from one that died. At every turn of
        the consumer's loop, which a worker's exit ends at once (ExitWatchingFlag): checked every
        1 s, recycling cost a third of a busy lane's tasks/s."""
        healthy = True
        for i, (worker, process) in enumerate(self.worker_threads):
            if not self.environment.is_alive(process):
                if self._ran_its_tasks(worker, process):
                    logger.info('worker %d (lane %s) ran its %d tasks; starting another', i + 1, worker.lane,
                                self.max_tasks)
                else:
                    logger.warning('worker %d (lane %s) died; starting another', i + 1, worker.lane)
                worker = self._create_worker(worker.lane, i)
                process = self._create_process(worker, f'Worker-{i + 1}')
                process.start()
                self._watch(process)
                self.worker_threads[i] = (worker, process)
                healthy = False
        if not healthy or self._kill_notes_left:
            # A watchdog writes its note before it kills its worker: only a death can add one.
            self._kill_notes_left = False
            for note in pathlib.Path(tempfile.gettempdir()).glob(f'emailsvc-hard-limit-{os.getpid()}-*.json'):
                self._kill_notes_left |= not record_kill(note)
        if not self.environment.is_alive(self.scheduler):
            logger.warning('scheduler died; starting another')
            self.scheduler = self._create_process(self._create_scheduler(), 'Scheduler')
            self.scheduler.start()
            self._watch(self.scheduler)
        return healthy


class LaneWorker(Worker):
    """Huey's worker for one lane; `recovers`: its process's heartbeat also recovers other workers' orphans."""

    def __init__(self, huey, lane, recovers, **options):
        super().__init__(huey=huey.lane(lane), **options)
        self.base, self.lane, self.recovers = huey, lane, recovers

    def initialize(self):
        self.base.recovers = self.recovers   # before the startup hooks start the heartbeat (taskq.workers)
        super().initialize()


def share_before_fork(huey):
    """Do once, in the consumer's main process, what each forked worker would otherwise do first for
    itself, then close the connections a worker must not inherit and freeze the collector.

    Forked workers share the main process's memory until they write to it. Whatever a worker loads or
    builds on its first round trips (redis-py's connection machinery, encodings.idna for the address,
    peewee's first queries) was built twelve times, once per worker; built here it is built once. Measured
    with the queue benchmark's consumer on Redis + PostgreSQL: 10.6 MB private memory per worker before,
    8.5 MB after. gc.freeze(): a full collection writes into the header of every object it traverses, so
    one collection in a worker copied ~17 MB of shared pages into it (measured); frozen objects are never
    traversed again. No gc.collect() before it: the holes it would free in shared pages are what a
    worker's first allocations fill, copying those pages (the gc.freeze documentation says the same).
    """
    logs.configure(huey.settings['log.level'])   # as each worker's start does (taskq.workers): then a no-op there
    try:
        with models.all_tenants():
            ledger.running_workers()
        for lane in huey.lane_storages.values():
            lane.queue_size()
    except Exception as exc:   # the broker or database is away: each worker connects when it can
        logger.warning('could not warm up before forking the workers: %s', exc)
    finally:
        models.database.close()
        models.database.close_idle()   # the pool keeps what close() hands back: no worker inherits it open
        huey.storage.close()   # SQLite handles (Huey closes it again before forking)
        pool = getattr(huey.storage, 'pool', None)
        if pool is not None:   # Redis: the main process itself does not use the broker
            pool.disconnect()
    gc.freeze()


def hold_stop_signals():
    """Keep SIGINT and SIGTERM that arrive before Huey's consumer sets its handlers, which it does only
    after forking every worker; returns the list they are kept in.

    A background job of a shell starts with SIGINT ignored (run.sh starts the consumer so), so a Ctrl-C
    forwarded in that second was lost and the consumer ran on; the default SIGTERM would kill the main
    process alone and leave the workers forked so far taking tasks."""
    early = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, frame: early.append(number))
    return early


def record_kill(note):
    """Mark the task named in a watchdog's note failed; the note stays until the write is made.
    True once it is made."""
    try:
        killed = json.loads(note.read_text())
    except ValueError:
        return False  # caught between the watchdog's open and write: the next check reads it whole
    worker = killed.get('worker')   # None in a note from before worker names had consumer ids: no match
    try:
        ledger.update(killed['task_id'], only_states=(ledger.RUNNING,), expect={'worker': worker},
                      state=ledger.FAILED, finished_at=models.utcnow(),
                      error=f'hard time limit of {killed["seconds"]}s exceeded; worker killed')
    except (models.pw.OperationalError, models.pw.InterfaceError) as exc:
        logger.warning('hard-limit record of task %s waits for the database: %s', killed['task_id'], exc)
        return False
    logger.error('task %s passed its hard time limit of %ss; worker %s was killed',
                 killed['task_id'], killed['seconds'], worker)
    note.unlink()
    return True
