"""The service's Huey: the ledger at enqueue, the task decorator, time limits and retry delays.

`make_huey(settings)` builds the instance for the configured broker (SQLite
file or Redis) with the signed JSON serializer; `@huey.service_task(...)`
registers a task with the service's rules (priority, retries with capped,
jittered backoff, soft and hard time limits, tenant scope) and keeps it in
`huey.service_tasks`, by name, so a record can be queued again from the
ledger. The instance carries what the rest of the machinery needs (settings,
registry, worker identity), so nothing here imports tasks.py.
"""
import contextlib
import functools
import json
import logging
import os
import pathlib
import random
import secrets
import signal
import tempfile
import threading
import time

import redis
from huey import Huey
from huey.consumer import Consumer
from huey.storage import PriorityRedisStorage

import models
from mailkit import logs
from mailkit import settings as settings_mod
from taskq import ledger
from taskq.storage import SignedJsonSerializer, WakingSqliteStorage, depth_by_priority

logger = logging.getLogger('emailsvc.tasks')

PRIORITIES = (10, 8, 5, 3)


class LedgerHuey(Huey):
    """Huey that records each new task in the ledger before the broker sees it,
    carries the caller's request id inside the signed payload, and registers
    the service's tasks by name."""

    def __init__(self, *args, settings, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.service_tasks = {}  # name -> task wrapper, for re-running a record by its name
        self.watchdog = Watchdog(enabled=settings['consumer.worker_type'] == 'process')

    def enqueue(self, task):
        """Queue `task` and return it; its id is the ledger id."""
        recorded_now = ledger.record(task)
        try:
            super().enqueue(task)
        except Exception:
            if recorded_now:  # the caller gets the error: leave no phantom pending task behind
                ledger.delete(task.id)
            raise
        return task

    def delete(self, key):
        """Huey drops a task's revoke key after the run and before the task's end
        signals: a broker outage there would skip them, and the ledger would say
        `running` for good under a live worker. A key left behind only matters
        if the task was revoked, and then it is still right."""
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

    # ------------------------------------------------------------ tasks

    def service_task(self, priority, retries, periodic=None):
        """Register a task with the service's priority, retry, time-limit and scope rules.

        The function runs inside its tenant's scope (or all_tenants() when it
        takes no tenant), with the request id of the call that queued it; an
        error in NO_RETRY fails it at once; past the soft limit Huey raises
        TaskTimeout inside it, past the hard limit the worker process is killed.
        """
        def decorate(func):
            soft, hard = self.time_limits(func.__name__)

            @functools.wraps(func)
            def run(*args, task=None, **kwargs):
                tenant_id = ledger.signature(func).bind(*args, **kwargs).arguments.get('tenant_id')
                scope = models.tenant_scope(tenant_id) if tenant_id is not None else models.all_tenants()
                with scope, self.watchdog.limit(task, hard):
                    try:
                        result = func(*args, **kwargs)
                    except ledger.NO_RETRY:
                        task.retries = 0
                        raise
                task.ledger_result = result
                return result

            options = dict(priority=priority, retries=retries, context=True, timeout=soft, name=func.__name__)
            if retries:
                options.update(retry_delay=self.settings['retry.base_delay'], retry_backoff=2)
            wrapper = self.periodic_task(periodic, **options)(run) if periodic else self.task(**options)(run)
            wrapper.task_class.func = func
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
        """Tasks waiting in the broker, by priority."""
        counts = {str(p): 0 for p in PRIORITIES}
        for priority, count in depth_by_priority(self.storage, PRIORITIES).items():
            counts[str(priority)] = counts.get(str(priority), 0) + count
        return {'depth': sum(counts.values()), 'by_priority': counts}


HOST = os.uname().nodename
# Hostnames repeat (containers, clones) and so do pids (each container's start
# at 1): with a random id drawn once per consumer, which its forked workers
# inherit, a worker's name is unique on any number of hosts. A boot id would
# not do: containers on one kernel share it, and may share hostname and pid too.
CONSUMER_ID = secrets.token_hex(6)


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
        return LedgerHuey(storage_class=WakingSqliteStorage, filename=str(path), timeout=15, **common)
    if url.startswith(('redis:', 'rediss:', 'unix:')):
        # Redis wakes blocked workers by itself (BZPOPMIN); health_check_interval
        # notices a restarted server instead of hanging on a dead socket.
        pool = redis.ConnectionPool.from_url(url, health_check_interval=10, socket_timeout=10,
                                             socket_connect_timeout=5)
        return LedgerHuey(storage_class=PriorityRedisStorage, connection_pool=pool, blocking=True,
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
    Only process workers can be killed alone; the consumer starts a fresh
    worker in its place. With thread workers the soft limit is all there is.
    """

    def __init__(self, enabled):
        self.enabled = enabled
        self.wakeup = threading.Condition()
        self.task = self.seconds = self.deadline = None
        self.pid = None

    @contextlib.contextmanager
    def limit(self, task, seconds):
        if not self.enabled:
            yield
            return
        self._ensure_thread()
        with self.wakeup:
            self.task, self.seconds, self.deadline = task, seconds, time.monotonic() + seconds
            self.wakeup.notify()
        try:
            yield
        finally:
            with self.wakeup:
                self.deadline = None

    def _ensure_thread(self):
        if self.pid != os.getpid():  # a forked worker inherits no threads
            self.pid = os.getpid()
            self.wakeup = threading.Condition()
            threading.Thread(target=self._watch, name='hard-limit', daemon=True).start()

    def _watch(self):
        with self.wakeup:
            while True:
                if self.deadline is None:
                    self.wakeup.wait()
                elif time.monotonic() < self.deadline:
                    self.wakeup.wait(self.deadline - time.monotonic())
                else:
                    self._kill()

    def _kill(self):
        try:
            note = kill_note_path(os.getppid(), os.getpid())
            note.write_text(json.dumps({'task_id': self.task.id, 'seconds': self.seconds,
                                        'worker': LedgerHuey.worker_id()}))
        finally:  # not even a full disk keeps the worker alive past its limit
            os.kill(os.getpid(), signal.SIGKILL)


def kill_note_path(consumer_pid, worker_pid):
    return pathlib.Path(tempfile.gettempdir()) / f'emailsvc-hard-limit-{consumer_pid}-{worker_pid}.json'


class LedgerConsumer(Consumer):
    """Huey's consumer that records the tasks its watchdogs killed, then replaces the workers as Huey does."""

    def check_worker_health(self):
        for note in pathlib.Path(tempfile.gettempdir()).glob(f'emailsvc-hard-limit-{os.getpid()}-*.json'):
            record_kill(note)
        return super().check_worker_health()


def record_kill(note):
    """Mark the task named in a watchdog's note failed; the note stays until the write is made."""
    try:
        killed = json.loads(note.read_text())
    except ValueError:
        return  # caught between the watchdog's open and write: the next check reads it whole
    worker = killed.get('worker')   # None in a note from before worker names had consumer ids: no match
    try:
        ledger.update(killed['task_id'], only_states=(ledger.RUNNING,), expect={'worker': worker},
                      state=ledger.FAILED, finished_at=models.utcnow(),
                      error=f'hard time limit of {killed["seconds"]}s exceeded; worker killed')
    except (models.pw.OperationalError, models.pw.InterfaceError) as exc:
        logger.warning('hard-limit record of task %s waits for the database: %s', killed['task_id'], exc)
        return
    logger.error('task %s passed its hard time limit of %ss; worker %s was killed',
                 killed['task_id'], killed['seconds'], worker)
    note.unlink()
