"""The Huey instance, the task ledger and every task.

Run the consumer with `huey_consumer tasks.huey -w 2 -k process` (or
`./run.sh consumer`, which passes the configured options).

The ledger (`models.TaskRecord`) is written at two moments: at enqueue, by
`LedgerHuey.enqueue` in the caller's process, so a task answered with 202 is
on record before it reaches the broker; and from Huey's signals in the worker
(executing, complete, error, timeout, retrying, revoked, interrupted), one
short UPDATE each. Task payloads hold ids and options only: no secret ever
reaches the broker or the ledger's copy of the arguments.
"""
import contextlib
import datetime
import functools
import inspect
import json
import logging
import os
import random
import signal
import socket
import threading
import time
import traceback

import redis
from huey import Huey, crontab
from huey import signals as S
from huey.exceptions import TaskTimeout
from huey.storage import PriorityRedisStorage

import models
from mailkit import logs
from mailkit import settings as settings_mod
from mailkit.credentials import Vault
from mailkit.errors import FailNow, NotAvailableYet, PermanentMailError
from mailkit.queue import SignedJsonSerializer, WakingSqliteStorage, depth_by_priority

try:
    SETTINGS = settings_mod.load()
except settings_mod.ConfigError as exc:
    raise SystemExit(f'emailsvc: {exc}') from None

logger = logging.getLogger('emailsvc.tasks')
models.init_database(SETTINGS['database.url'])
vault = Vault(SETTINGS['security.credential_keys'])

# Retrying cannot fix these: the task fails at once and the ledger says why.
NO_RETRY = (FailNow, PermanentMailError)
HOST = socket.gethostname()
PRIORITIES = (10, 8, 5, 3)
TASKS = {}  # name -> task wrapper, for re-running a record by its name


# ---------------------------------------------------------------- the Huey instance

class LedgerHuey(Huey):
    """Huey that records each new task in the ledger before the broker sees it,
    and carries the caller's request id inside the signed payload."""

    def enqueue(self, task):
        """Queue `task` and return it; its id is the ledger id."""
        recorded_now = record_enqueued(task)
        try:
            super().enqueue(task)
        except Exception:
            if recorded_now:  # the caller gets the error: leave no phantom pending task behind
                models.ledger_delete(task.id)
            raise
        return task

    def serialize_task(self, task):
        message = self._registry.create_message(task)
        request_id = getattr(task, 'request_id', None) or logs.request_id.get()
        return self.serializer.serialize({'m': message, 'rid': request_id})

    def deserialize_task(self, data):
        envelope = self.serializer.deserialize(data)
        task = self._registry.create_task(envelope['m'])
        task.request_id = envelope.get('rid')
        return task


def make_huey(cfg):
    url = cfg['queue.url']
    # results=False: the ledger is the one result store (kept queue.results_ttl,
    # then cleared), which also saves the broker a write per task.
    common = dict(name=cfg['queue.name'], serializer=SignedJsonSerializer(cfg['server.secret']),
                  results=False, utc=True)
    if settings_mod.is_embedded(url):
        path = settings_mod.sqlite_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
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


huey = make_huey(SETTINGS)


# ---------------------------------------------------------------- ledger

signature = functools.lru_cache(maxsize=None)(inspect.signature)


def call_arguments(task):
    """The task's arguments by name, as the function declared them."""
    func = getattr(type(task), 'func', None)
    args, kwargs = task.args, {k: v for k, v in task.kwargs.items() if k != 'task'}
    if func is None:
        return dict(kwargs, args=list(args)) if args else kwargs
    return dict(signature(func).bind_partial(*args, **kwargs).arguments)


def redact(arguments):
    """Arguments safe to store and show: anything secret-looking is masked."""
    return {k: '[redacted]' if any(w in k.lower() for w in logs.SECRET_WORDS) else v
            for k, v in arguments.items()}


def record_enqueued(task):
    """Insert the task's ledger row; True if it is new (not a retry or a re-run)."""
    arguments = call_arguments(task)
    return models.ledger_insert(
        task.id, name=task.name, tenant_id=arguments.get('tenant_id'), user_id=arguments.get('user_id'),
        priority=task.priority or 0, retries_left=task.retries,
        request_id=getattr(task, 'request_id', None) or logs.request_id.get(),
        args=json.dumps(redact(arguments), default=str))


def worker_name():
    return f'{HOST}:{os.getpid()}'


@huey.signal(S.SIGNAL_EXECUTING)
def ledger_running(signal_name, task):
    # Every log line from here to the end of the run carries the task's ids.
    logs.task_id.set(task.id)
    logs.request_id.set(getattr(task, 'request_id', None))
    models.ledger_update(task.id, state='running', started_at=models.utcnow(), worker=worker_name(),
                         attempts=models.INCREMENT, retries_left=task.retries,
                         next_retry_at=None, finished_at=None)


@huey.post_execute()
def forget_task_ids(task, value, exc):
    logs.task_id.set(None)
    logs.request_id.set(None)


@huey.signal(S.SIGNAL_COMPLETE)
def ledger_succeeded(signal_name, task):
    result = getattr(task, 'ledger_result', None)
    models.ledger_update(task.id, state='succeeded', finished_at=models.utcnow(),
                         result=json.dumps(result, default=str), error=None, traceback=None)


@huey.signal(S.SIGNAL_ERROR, S.SIGNAL_TIMEOUT)
def ledger_error(signal_name, task, exc=None):
    if signal_name == S.SIGNAL_TIMEOUT:
        exc = TaskTimeout(f'soft time limit of {task.timeout}s exceeded')
    task.ledger_error = (f'{type(exc).__name__}: {exc}',
                         ''.join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    if task.retries:
        return  # SIGNAL_RETRYING follows and records the retry
    gave_up = isinstance(exc, NO_RETRY) or not type(task).default_retries
    error, tb = task.ledger_error
    models.ledger_update(task.id, state='failed' if gave_up else 'dead', finished_at=models.utcnow(),
                         error=error, traceback=tb, retries_left=0)


@huey.signal(S.SIGNAL_RETRYING)
def ledger_retrying(signal_name, task):
    delay = jittered_delay(nominal_delay(task))
    task.retry_delay = delay  # Huey schedules the retry with this
    error, tb = getattr(task, 'ledger_error', (None, None))
    models.ledger_update(task.id, state='retrying', error=error, traceback=tb, retries_left=task.retries - 1,
                         next_retry_at=models.utcnow() + datetime.timedelta(seconds=delay))


def nominal_delay(task):
    """base * 2^(n-1) for the n-th retry, from the retries left rather than from
    Huey's running product, which would compound the jitter of every attempt."""
    retry_number = type(task).default_retries - task.retries + 1
    return SETTINGS['retry.base_delay'] * task.retry_backoff ** (retry_number - 1)


def jittered_delay(delay, rand=random.random):
    """Huey doubles the delay without bound or jitter: cap it, and spread it."""
    capped = min(delay, SETTINGS['retry.max_delay'])
    return capped * (1 - SETTINGS['retry.jitter'] * rand())


@huey.signal(S.SIGNAL_REVOKED, S.SIGNAL_EXPIRED)
def ledger_revoked(signal_name, task):
    models.ledger_update(task.id, state='revoked' if signal_name == S.SIGNAL_REVOKED else 'failed',
                         finished_at=models.utcnow(),
                         error=None if signal_name == S.SIGNAL_REVOKED else 'expired before it ran')


@huey.signal(S.SIGNAL_INTERRUPTED)
def requeue_interrupted(signal_name, task):
    """SIGTERM stopped the task midway: put it back so it runs again, same id."""
    models.ledger_update(task.id, state='pending', error='interrupted by consumer shutdown; re-queued')
    huey.enqueue(task)


def report_progress(done, total):
    """Show the running task's progress on its ledger record."""
    models.ledger_update(logs.task_id.get(), progress_done=done, progress_total=total)


# ---------------------------------------------------------------- task wrapper

def time_limits(name):
    prefix = f'limits.{name}' if f'limits.{name}_soft' in SETTINGS else 'limits.default'
    return SETTINGS[f'{prefix}_soft'], SETTINGS[f'{prefix}_hard']


def service_task(priority, retries, periodic=None):
    """Register a task with the service's priority, retry, time-limit and scope rules.

    The function runs inside its tenant's scope (or all_tenants() when it
    takes no tenant), with the request id of the call that queued it; an error
    in NO_RETRY fails it at once; past the soft limit Huey raises TaskTimeout
    inside it, past the hard limit the worker process is killed.
    """
    def decorate(func):
        soft, hard = time_limits(func.__name__)

        @functools.wraps(func)
        def run(*args, task=None, **kwargs):
            tenant_id = signature(func).bind(*args, **kwargs).arguments.get('tenant_id')
            scope = models.tenant_scope(tenant_id) if tenant_id is not None else models.all_tenants()
            with scope, watchdog.limit(task, hard):
                try:
                    result = func(*args, **kwargs)
                except NO_RETRY:
                    task.retries = 0
                    raise
            task.ledger_result = result
            return result

        options = dict(priority=priority, retries=retries, context=True, timeout=soft, name=func.__name__)
        if retries:
            options.update(retry_delay=SETTINGS['retry.base_delay'], retry_backoff=2)
        wrapper = huey.periodic_task(periodic, **options)(run) if periodic else huey.task(**options)(run)
        wrapper.task_class.func = func
        TASKS[func.__name__] = wrapper
        return wrapper
    return decorate


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
        logger.error('task %s passed its hard time limit of %ss; killing worker %s',
                     self.task.id, self.seconds, os.getpid())
        models.ledger_update(self.task.id, state='failed', finished_at=models.utcnow(),
                             error=f'hard time limit of {self.seconds}s exceeded; worker killed')
        os.kill(os.getpid(), signal.SIGKILL)


watchdog = Watchdog(enabled=SETTINGS['consumer.worker_type'] == 'process')


# ---------------------------------------------------------------- heartbeats

class Heartbeat:
    """A worker's proof of life: its row's last_seen moves every few seconds."""

    def __init__(self, interval):
        self.interval = interval
        self.stop = threading.Event()

    def start(self):
        threading.Thread(target=self.run, name='heartbeat', daemon=True).start()

    def run(self):
        while True:
            try:
                self.beat()
            except Exception:  # a database outage must not end the thread
                logger.exception('heartbeat write failed; retrying in %ss', self.interval)
            if self.stop.wait(self.interval):
                return

    def beat(self):
        now = models.utcnow()
        with models.database.connection_context():
            models.ConsumerHeartbeat.insert(
                id=worker_name(), host=HOST, pid=os.getpid(), consumer_pid=os.getppid(),
                started_at=now, last_seen=now,
            ).on_conflict(conflict_target=[models.ConsumerHeartbeat.id],
                          update={models.ConsumerHeartbeat.last_seen: now}).execute()

    def end(self):
        self.stop.set()
        models.with_reconnect(lambda: models.ConsumerHeartbeat.delete()
                              .where(models.ConsumerHeartbeat.id == worker_name()).execute())


heartbeat = Heartbeat(SETTINGS['consumer.heartbeat_seconds'])


@huey.on_startup()
def start_worker():
    logs.configure(SETTINGS['log.level'])
    heartbeat.start()


@huey.on_shutdown()
def stop_worker():
    heartbeat.end()


# ---------------------------------------------------------------- tasks

@service_task(priority=10, retries=5)
def sync_emails(email_client_id, tenant_id, user_id, folder_id=None, force_full_sync=False):
    """Sync an account's mail from its IMAP or POP3 server into the database."""
    raise NotAvailableYet('sync_emails is not available yet (issue #3)')


@service_task(priority=8, retries=3)
def send_email(email_client_id, tenant_id, user_id, to, cc=None, bcc=None, subject='',
               body_text='', body_html=None, attachment_ids=None):
    """Send one message over the account's SMTP server."""
    raise NotAvailableYet('send_email is not available yet (issue #4)')


@service_task(priority=5, retries=5)
def delete_emails(email_ids, tenant_id, user_id, permanent=False):
    """Move messages to Trash, or expunge them for good."""
    raise NotAvailableYet('delete_emails is not available yet (issue #4)')


@service_task(priority=3, retries=3)
def check_spam(email_id, tenant_id, user_id):
    """Score one message for spam and phishing."""
    raise NotAvailableYet('check_spam is not available yet (issue #6)')


@service_task(priority=10, retries=0)
def periodic_sync():
    """Queue sync_emails for every account that is due (periodic once sync exists)."""
    raise NotAvailableYet('periodic_sync is not available yet (issue #3)')


@service_task(priority=10, retries=0, periodic=crontab(minute='0'))
def cleanup_stale_results(now=None):
    """Clear ledger results older than queue.results_ttl; drop records past queue.history_days."""
    now = now or models.utcnow()
    record = models.TaskRecord
    results_before = now - datetime.timedelta(seconds=SETTINGS['queue.results_ttl'])
    history_before = now - datetime.timedelta(days=SETTINGS['queue.history_days'])
    results_removed = (record.update(result=None)
                       .where(record.finished_at < results_before, record.result.is_null(False)).execute())
    history_removed = (record.delete()
                       .where(record.state.in_(models.FINAL_STATES), record.finished_at < history_before).execute())
    return {'status': 'ok', 'results_removed': results_removed, 'history_removed': history_removed}


@service_task(priority=3, retries=0)
def noop(tenant_id=None, user_id=None):
    """Do nothing: proves the queue, a worker and the ledger work end to end."""
    return {'status': 'ok'}


def queue_depth():
    """Tasks waiting in the broker, by priority."""
    counts = {str(p): 0 for p in PRIORITIES}
    for priority, count in depth_by_priority(huey.storage, PRIORITIES).items():
        counts[str(priority)] = counts.get(str(priority), 0) + count
    return {'depth': sum(counts.values()), 'by_priority': counts}
