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
import collections
import contextlib
import datetime
import functools
import inspect
import json
import logging
import os
import pathlib
import random
import re
import signal
import socket
import ssl
import sys
import threading
import time
import traceback

import redis
from huey import Huey, crontab
from huey import signals as S
from huey.exceptions import TaskTimeout
from huey.storage import PriorityRedisStorage

import models
from mailkit import logs, mime, smtp, spam
from mailkit import settings as settings_mod
from mailkit.credentials import Vault
from mailkit.errors import AuthenticationFailed, FailNow, MailError, PermanentMailError, TemporaryMailError
from mailkit.imap import FolderGone, ImapSession
from mailkit.pop3 import Pop3Session
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


class DeferredLedger:
    """Ledger writes of this worker's signals, kept in order while the database is away.

    A task that ends during a database outage would otherwise stay `running`
    under a live worker, which recovery rightly leaves alone. Its writes wait
    here and the heartbeat thread replays them once the database answers. If
    the worker dies first, its records are a dead worker's, and recovery
    re-queues them.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.waiting = collections.deque()

    def write(self, task_id, **fields):
        with self.lock:
            if not self.waiting:   # behind earlier writes, a write would overtake them
                try:
                    models.ledger_update(task_id, **fields)
                    return
                except (models.pw.OperationalError, models.pw.InterfaceError) as exc:
                    logger.warning('ledger write for task %s deferred until the database answers: %s',
                                   task_id, str(exc).strip())
            self.waiting.append((task_id, fields))

    def replay(self):
        """Make the waiting writes, oldest first; stop at the first failure (the next beat tries again)."""
        with self.lock:
            while self.waiting:
                task_id, fields = self.waiting[0]
                models.ledger_update(task_id, **fields)
                self.waiting.popleft()
                logger.info('deferred ledger write for task %s made', task_id)


ledger = DeferredLedger()


@huey.signal(S.SIGNAL_EXECUTING)
def ledger_running(signal_name, task):
    # Every log line from here to the end of the run carries the task's ids.
    logs.task_id.set(task.id)
    logs.request_id.set(getattr(task, 'request_id', None))
    ledger.write(task.id, state='running', started_at=models.utcnow(), worker=worker_name(),
                 attempts=models.INCREMENT, retries_left=task.retries,
                 next_retry_at=None, finished_at=None)


@huey.post_execute()
def forget_task_ids(task, value, exc):
    logs.task_id.set(None)
    logs.request_id.set(None)


@huey.signal(S.SIGNAL_COMPLETE)
def ledger_succeeded(signal_name, task):
    result = getattr(task, 'ledger_result', None)
    ledger.write(task.id, state='succeeded', finished_at=models.utcnow(),
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
    ledger.write(task.id, state='failed' if gave_up else 'dead', finished_at=models.utcnow(),
                 error=error, traceback=tb, retries_left=0)


@huey.signal(S.SIGNAL_RETRYING)
def ledger_retrying(signal_name, task):
    delay = jittered_delay(nominal_delay(task))
    task.retry_delay = delay  # Huey schedules the retry with this
    error, tb = getattr(task, 'ledger_error', (None, None))
    ledger.write(task.id, state='retrying', error=error, traceback=tb, retries_left=task.retries - 1,
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
    ledger.write(task.id, state='revoked' if signal_name == S.SIGNAL_REVOKED else 'failed',
                 finished_at=models.utcnow(),
                 error=None if signal_name == S.SIGNAL_REVOKED else 'expired before it ran')


@huey.signal(S.SIGNAL_INTERRUPTED)
def requeue_interrupted(signal_name, task):
    """SIGTERM stopped the task midway: put it back so it runs again, same id."""
    models.ledger_update(task.id, state='pending', enqueued_at=models.utcnow(),
                         error='interrupted by consumer shutdown; re-queued')
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
                ledger.replay()
                self.beat()
                recover_orphans()
            except Exception:  # a database or broker outage must not end the thread
                logger.exception('heartbeat or recovery failed; retrying in %ss', self.interval)
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


# ---------------------------------------------------------------- recovery
#
# Huey is at-most-once: a task dequeued by a worker that dies is gone. The
# ledger and the heartbeats make it at-least-once without adding a write to
# the hot path: a task's record already says `running` and which worker
# (host:pid) runs it, and every worker already refreshes its heartbeat every
# few seconds. On each beat, each worker also looks for
#
#   - `running` records whose worker has not beaten for recovery_grace
#     seconds (SIGKILL, OOM, a lost host);
#   - `pending` or `retrying` records older than the grace that are in neither
#     the broker's queue nor its schedule (a worker died between dequeue and
#     its first signal; a scheduler died between taking a retry off the
#     schedule and queueing it; a web process died after the ledger insert);
#
# and queues them again under the same id, its attempt count kept. Several
# workers may find the same orphan: a conditional UPDATE on the record decides
# which one requeues it. Running a task twice is safe because every task is
# idempotent (sync stores by UID, send consults its outbox, delete skips what
# is gone). SIGTERM needs none of this: the interrupted task is requeued at once
# (requeue_interrupted). A sync's claim on its account lapses with its task's
# ledger state, so no lock outlives a dead worker.
#
# Recovery leaves live workers' records alone, so a live worker must never
# leave a finished task `running`: its ledger writes wait, in order, while the
# database is away and its heartbeat thread makes them when it is back
# (DeferredLedger); a broker outage between a task's end and its end signals
# is logged and passed over (LedgerHuey.delete).

def recover_orphans(now=None):
    """Requeue the tasks of dead workers and the tasks the broker lost; returns their ids."""
    now = now or models.utcnow()
    cutoff = now - datetime.timedelta(seconds=SETTINGS['consumer.recovery_grace'])
    recovered = []
    with models.all_tenants():
        for record in models.orphaned_running(cutoff):
            if worker_alive_here(record.worker):
                continue  # a busy worker on this host whose beat is late: alive all the same
            # Only while that dead worker still holds it: another worker may have
            # re-queued it already, and a new run may be under way.
            if models.ledger_update(record.id, only_states=('running',), expect={'worker': record.worker},
                                    enqueued_at=now, state='pending', error=f'worker {record.worker} died; re-queued'):
                recovered.append(requeue(record))
        # The broker is read before the ledger: a task a worker takes in between
        # is then still 'pending' only for the instant before its first signal,
        # and it must look lost on two checks in a row before it is re-queued.
        lost = {}
        if models.stale_waiting(cutoff, count=True):
            in_broker = ids_in_broker()
            lost = {r.id: r for r in models.stale_waiting(cutoff) if r.id not in in_broker}
        for task_id in lost.keys() & SUSPECTS:
            record = lost[task_id]
            if models.ledger_update(record.id, only_states=(record.state,), expect={'enqueued_at': record.enqueued_at},
                                    enqueued_at=now, state='pending', error='lost by the broker; re-queued'):
                recovered.append(requeue(record))
        SUSPECTS.clear()
        SUSPECTS.update(lost.keys() - set(recovered))
    if recovered:
        logger.warning('re-queued %d orphaned tasks: %s', len(recovered), ', '.join(recovered))
    return recovered


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


SUSPECTS = set()  # ids that looked lost at the previous check


def ids_in_broker():
    """The ids of every task in the broker's queue and schedule."""
    payloads = list(huey.storage.enqueued_items()) + list(huey.storage.scheduled_items())
    return {match.group(1).decode() for data in payloads if (match := PAYLOAD_ID.search(bytes(data)))}


PAYLOAD_ID = re.compile(rb'"\$msg":\["([^"]+)"')  # the first field of the signed envelope's message


def requeue(record):
    """Queue a ledger record's task again: same id, same arguments, the retries it had left."""
    wrapper = TASKS.get(record.name)
    if wrapper is None:  # a task this code base no longer has: say so instead of trying forever
        models.ledger_update(record.id, state='failed', finished_at=models.utcnow(),
                             error=f'cannot re-run {record.name}: no such task in this version')
        return record.id
    task = wrapper.s(**json.loads(record.args), id=record.id, retries=record.retries_left)
    task.request_id = record.request_id
    huey.enqueue(task)
    return record.id


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
    client = account_of(email_client_id, user_id)
    started = time.monotonic()
    counts = {'messages_synced': 0, 'messages_updated': 0, 'messages_deleted': 0}
    models.EmailClient.update(sync_state='syncing').where(models.EmailClient.id == client.id).execute()
    try:
        with open_incoming(client) as session:
            if client.incoming_protocol == 'imap':
                sync_imap(session, client, counts, folder_id, force_full_sync)
            else:
                sync_pop3(session, client, counts, force_full_sync)
    except AuthenticationFailed as exc:
        end_sync(client, 'auth_error', str(exc))
        raise
    except Exception as exc:
        end_sync(client, 'error', f'{type(exc).__name__}: {exc}')
        raise
    end_sync(client, 'idle', None)
    return dict(counts, status='success', sync_duration_seconds=round(time.monotonic() - started, 3),
                timestamp=int(time.time() * 1000))


def account_of(client_id, user_id):
    """The tenant's (scoped) account of this user, or fail at once."""
    client = models.EmailClient.find(id=client_id, user_id=user_id)
    if client is None:
        raise FailNow(f'no account {client_id} for this user')
    return client


def password_of(client, kind):
    return vault.decrypt(secret_of(client, kind))


def secret_of(client, kind):
    """The stored (encrypted) password: a session cache key, decrypted only to log in."""
    row = models.Credential.find(client=client.id, kind=kind)
    if row is None:
        raise FailNow(f'account {client.id} has no {kind} password')
    return row.secret


@functools.cache
def mail_ssl_context():
    """One per process: building it reads the system's CA bundle (25 ms measured)."""
    context = ssl.create_default_context()
    for path in filter(None, (p.strip() for p in SETTINGS['mail.ca_files'].split(','))):
        context.load_verify_locations(path)
    return context


def open_incoming(client):
    """A session with the account's incoming server: IMAP ones are kept open between tasks."""
    if client.incoming_protocol == 'imap':
        secret = secret_of(client, 'incoming')
        key = (client.id, client.incoming_host, client.incoming_port, client.incoming_security,
               client.incoming_username, secret)
        return imap_sessions.session(key, lambda: ImapSession(
            client.incoming_host, client.incoming_port, client.incoming_security, client.incoming_username,
            vault.decrypt(secret), timeout=SETTINGS['mail.timeout'], ssl_context=mail_ssl_context()))
    # POP3 holds the maildrop locked while connected and deletes only at QUIT: never kept.
    return Pop3Session(client.incoming_host, client.incoming_port, client.incoming_security,
                       client.incoming_username, password_of(client, 'incoming'),
                       timeout=SETTINGS['mail.timeout'], ssl_context=mail_ssl_context())


def open_smtp(client):
    """A session with the account's SMTP server, kept open between sends of this worker."""
    secret = secret_of(client, 'smtp') if client.smtp_username else None
    key = (client.id, client.smtp_host, client.smtp_port, client.smtp_security, client.smtp_username, secret)
    return smtp_sessions.session(key, lambda: smtp.SmtpConnection(
        client.smtp_host, client.smtp_port, client.smtp_security, client.smtp_username,
        vault.decrypt(secret) if secret else None, timeout=SETTINGS['mail.timeout'],
        ssl_context=mail_ssl_context()))


class SessionCache:
    """Mail sessions a worker keeps open between tasks, so the next task does not pay connect and login.

    Keyed by everything that reaching the account depends on, the stored
    password's ciphertext included, so a changed setting opens a new session.
    A session idle for long is probed (NOOP) first; one that saw an error is
    dropped, as its state on the server is unknown.
    """

    def __init__(self, size=8, check_after=30, expire_after=600):
        self.size, self.check_after, self.expire_after = size, check_after, expire_after
        self.pid, self.entries = None, {}

    @contextlib.contextmanager
    def session(self, key, open_session):
        if self.pid != os.getpid():  # a forked worker must not share its parent's sockets
            self.pid, self.entries = os.getpid(), {}
        session = self.checkout(key) or open_session()
        try:
            yield session
        except BaseException:
            session.__exit__(*sys.exc_info())
            raise
        self.checkin(key, session)

    def checkout(self, key):
        entry = self.entries.pop(key, None)
        if entry is None:
            return None
        session, last_used = entry
        idle = time.monotonic() - last_used
        if idle > self.expire_after:
            session.close()
            return None
        if not session.usable(probe=idle > self.check_after):
            session.__exit__(TemporaryMailError, None, None)
            return None
        return session

    def checkin(self, key, session):
        self.entries[key] = (session, time.monotonic())
        while len(self.entries) > self.size:  # the least recently used goes
            oldest = min(self.entries, key=lambda k: self.entries[k][1])
            self.entries.pop(oldest)[0].close()


imap_sessions = SessionCache()
# SMTP servers drop idle clients sooner than IMAP ones (RFC 5321, 4.5.3.2.7: 5 minutes; some 30 s).
smtp_sessions = SessionCache(check_after=10, expire_after=120)


def end_sync(client, state, error):
    """Record how the sync ended (the claim lapses with the task's ledger state)."""
    fields = {'sync_state': state, 'last_error': error}
    if state == 'idle':
        fields['last_sync_at'] = models.utcnow()
    models.EmailClient.update(**fields).where(models.EmailClient.id == client.id).execute()


# ---------------------------------------------------------------- sync
#
# IMAP (RFC 3501, 7162): a folder's UIDs mean something only under its
# UIDVALIDITY; we store UIDVALIDITY, the next UID still to fetch (uidnext,
# committed with each batch, so a killed sync resumes there) and
# HIGHESTMODSEQ. Next time: a changed UIDVALIDITY drops the folder's rows and
# starts over; an unchanged UIDVALIDITY, UIDNEXT and HIGHESTMODSEQ means
# nothing happened (no further command); otherwise new UIDs are fetched, flags
# changed since our modseq are applied (CONDSTORE), and expunged UIDs come from
# QRESYNC's VANISHED or, without it, from comparing UID sets.
#
# POP3 (RFC 1939): only INBOX, keyed by UIDL; what the server no longer lists
# was deleted elsewhere.

def sync_imap(session, client, counts, folder_id, force_full_sync):
    folders = refresh_folders(session, client, counts)
    if folder_id is not None:
        folders = [f for f in folders if f.id == folder_id]
        if not folders:
            raise FailNow(f'no folder {folder_id} in account {client.id}')
    plans = []
    for folder in folders:
        try:
            state = session.select(folder.raw_name, readonly=True,
                                   qresync=qresync_of(session, folder, force_full_sync))
        except FolderGone:  # deleted on the server since LIST: the next sync drops it
            continue
        plans.append((folder, state, plan_folder(session, folder, state, counts, force_full_sync)))
    progress = Progress(sum(len(uids) for _, _, uids in plans))
    for folder, state, uids in plans:
        if uids:
            initial = folder.last_synced_at is None  # a resumed first sync is history too
            try:
                session.select(folder.raw_name, readonly=True)
            except FolderGone:  # deleted on the server a moment ago: the next sync drops it
                continue
            fetch_new(session, folder, uids, counts, progress)
            if folder.role == 'inbox' and not initial:  # new mail, not a mailbox's history
                queue_spam_checks(client, models.message_ids(folder, 'uid', uids))
        models.EmailFolder.update(uidvalidity=state.uidvalidity, highestmodseq=state.highestmodseq,
                                  uidnext=max(state.uidnext or 1, folder.uidnext or 1),
                                  last_synced_at=models.utcnow()).where(models.EmailFolder.id == folder.id).execute()


def refresh_folders(session, client, counts):
    """Match the server's folders: new ones added, vanished ones dropped with their messages."""
    remote = [f for f in session.folders() if f.selectable]
    local = {f.raw_name: f for f in models.EmailFolder.select().where(models.EmailFolder.client == client.id)}
    for gone in set(local) - {f.raw_name for f in remote}:
        counts['messages_deleted'] += models.delete_messages(
            models.EmailMessage.select().where(models.EmailMessage.folder == local[gone].id))
        local.pop(gone).delete_instance()
    for folder in remote:
        row = local.get(folder.raw_name)
        if row is None:
            local[folder.raw_name] = models.EmailFolder.create(client=client.id, name=folder.name,
                                                               raw_name=folder.raw_name, role=folder.role)
        elif (row.name, row.role) != (folder.name, folder.role):
            row.name, row.role = folder.name, folder.role
            row.save()
    return [local[f.raw_name] for f in remote]


def qresync_of(session, folder, force_full_sync):
    if force_full_sync or not (folder.uidvalidity and folder.highestmodseq) or 'QRESYNC' not in session.capabilities:
        return None
    return folder.uidvalidity, folder.highestmodseq


def plan_folder(session, folder, state, counts, force_full_sync):
    """Apply flag changes and deletions; return the UIDs still to fetch."""
    if force_full_sync or folder.uidvalidity != state.uidvalidity:
        # A UID means nothing without its UIDVALIDITY (RFC 3501, 2.3.1.1): if
        # the server changed it, every UID stored for this folder is stale.
        counts['messages_deleted'] += models.delete_messages(
            models.EmailMessage.select().where(models.EmailMessage.folder == folder.id))
        folder.uidnext = 1
        models.EmailFolder.update(uidvalidity=state.uidvalidity, uidnext=1, highestmodseq=None) \
            .where(models.EmailFolder.id == folder.id).execute()
        return session.uids_since(1) if state.exists else []
    if state.highestmodseq and state.highestmodseq == folder.highestmodseq and state.uidnext == folder.uidnext:
        return []  # CONDSTORE: nothing was added, changed or expunged since we last looked
    stored = models.folder_uids(folder)
    if state.highestmodseq and folder.highestmodseq and 'QRESYNC' in session.enabled:
        gone, changed = set(state.vanished), state.changed
    else:
        gone = stored - set(session.uids())
        changed = (session.changed_flags(folder.highestmodseq) if state.highestmodseq and folder.highestmodseq
                   else session.all_flags())
    counts['messages_deleted'] += models.delete_messages(
        models.EmailMessage.select().where(models.EmailMessage.folder == folder.id,
                                           models.EmailMessage.uid.in_(list(gone & stored))))
    counts['messages_updated'] += models.update_flags(folder, {u: f for u, f in changed.items() if u in stored})
    start = folder.uidnext or 1
    return [uid for uid in session.uids_since(start) if uid >= start] if state.exists else []


class Progress:
    def __init__(self, total):
        self.total, self.done = total, 0
        report_progress(0, total)

    def add(self, count):
        self.done += count
        report_progress(self.done, self.total)


def fetch_new(session, folder, uids, counts, progress):
    """Fetch and store in batches; each batch commits with the folder's new uidnext."""
    batch = []
    for message in session.fetch(uids, batch=SETTINGS['mail.sync_batch']):
        batch.append(message)
        if len(batch) == SETTINGS['mail.sync_batch']:
            store_imap_batch(folder, batch, counts, progress)
            batch = []
    if batch:
        store_imap_batch(folder, batch, counts, progress)


def store_imap_batch(folder, batch, counts, progress):
    items = [dict(message_fields(m.raw), uid=m.uid, **models.flag_fields(m.flags)) for m in batch]
    folder.uidnext = batch[-1].uid + 1
    counts['messages_synced'] += models.store_messages(folder, items, 'uid', uidnext=folder.uidnext)
    progress.add(len(batch))


def message_fields(raw):
    """The stored fields of one raw message; a message that cannot be parsed is kept raw with the reason."""
    try:
        parsed = mime.parse(raw)
    except mime.ParseError as exc:
        logger.warning('message of %d bytes stored unparsed: %s', len(raw), exc)
        return {'raw': raw, 'attachments': [], 'size': len(raw), 'parse_error': no_nul(str(exc))[:2000]}
    sender = parsed.from_[0] if parsed.from_ else ('', '')
    for attachment in parsed.attachments:
        attachment.filename, attachment.content_id = no_nul(attachment.filename), no_nul(attachment.content_id)
        attachment.content_type = no_nul(attachment.content_type)[:255]
    fields = {
        'raw': raw, 'attachments': parsed.attachments, 'size': len(raw),
        'subject': parsed.subject, 'from_name': sender[0], 'from_addr': sender[1][:320],
        'to_addrs': json.dumps(parsed.to), 'cc_addrs': json.dumps(parsed.cc),
        'reply_to': json.dumps(parsed.reply_to),
        'date': parsed.date.astimezone(datetime.timezone.utc).replace(tzinfo=None) if parsed.date else None,
        'message_id': (parsed.message_id or '')[:1000] or None, 'in_reply_to': parsed.in_reply_to,
        'references': json.dumps(parsed.references), 'snippet': parsed.snippet,
        'text': parsed.text, 'html': parsed.html, 'headers': json.dumps(parsed.headers),
        'parse_error': '; '.join(parsed.defects)[:2000] or None,
    }
    return {k: no_nul(v) if isinstance(v, str) else v for k, v in fields.items()}


def no_nul(text):
    # PostgreSQL text cannot hold NUL; mail sometimes does. The raw bytes keep it.
    return text.replace('\x00', '\ufffd') if text else text


def sync_pop3(session, client, counts, force_full_sync):
    folder = pop3_inbox(client)
    if force_full_sync:
        counts['messages_deleted'] += models.delete_messages(
            models.EmailMessage.select().where(models.EmailMessage.folder == folder.id))
    listed = session.uidl()
    stored = models.folder_pop3_uids(folder)
    counts['messages_deleted'] += models.delete_messages(
        models.EmailMessage.select().where(models.EmailMessage.folder == folder.id,
                                           models.EmailMessage.pop3_uid.in_(list(stored - set(listed)))))
    new = [uid for uid in listed if uid not in stored]
    progress = Progress(len(new))
    for chunk in models.chunks(new, 100):
        items = [dict(message_fields(session.fetch(listed[uid])), pop3_uid=uid) for uid in chunk]
        counts['messages_synced'] += models.store_messages(folder, items, 'pop3_uid')
        progress.add(len(chunk))
    if stored and new:  # new mail, not a mailbox's history
        queue_spam_checks(client, models.message_ids(folder, 'pop3_uid', new))


def pop3_inbox(client):
    folder = models.EmailFolder.get_or_none(models.EmailFolder.client == client.id,
                                            models.EmailFolder.raw_name == 'INBOX')
    return folder or models.EmailFolder.create(client=client.id, name='INBOX', raw_name='INBOX', role='inbox')


def queue_sync(client, user_id, folder_id=None, force_full_sync=False):
    """Queue a sync unless one is queued or running; returns (task id, state, queued now)."""
    task = sync_emails.s(client.id, client.tenant_id, user_id, folder_id=folder_id,
                         force_full_sync=force_full_sync)
    claimed, holder = models.claim_sync(client.id, task.id, lambda: record_enqueued(task))
    if not claimed:
        return (*holder, False)
    try:
        huey.enqueue(task)
    except Exception:
        models.release_sync(client.id, task.id)
        raise
    return task.id, 'pending', True


@service_task(priority=8, retries=3)
def send_email(email_client_id, tenant_id, user_id, to, cc=None, bcc=None, subject='',
               body_text='', body_html=None, attachment_ids=None):
    """Send one message over the account's SMTP server; the outbox row makes it happen at most once."""
    client = account_of(email_client_id, user_id)
    outbox = outbox_of(client, user_id, to, cc, bcc)
    if outbox.state == 'sent':
        return sent_result(outbox)  # a re-run of a finished send: nothing goes out again
    if outbox.state in ('sending', 'unknown'):
        models.Outbox.update(state='unknown').where(models.Outbox.id == outbox.id).execute()
        raise FailNow(f'delivery of {outbox.message_id} is unknown: an earlier attempt stopped during the SMTP '
                      'transaction; not sent again, to avoid a duplicate')
    raw = smtp.compose(sender=('', client.email), to=to, cc=cc or [], bcc=bcc or [], subject=subject,
                       body_text=body_text, body_html=body_html, attachments=uploads_of(attachment_ids or []),
                       message_id=outbox.message_id, date=outbox.created_at.replace(tzinfo=datetime.timezone.utc))
    try:
        with open_smtp(client) as session:
            result = session.send(client.email, json.loads(outbox.recipients), raw,
                                  before_commit=lambda: mark_outbox(outbox, 'sending'))
    except smtp.DeliveryUnknown as exc:
        mark_outbox(outbox, 'unknown', error=str(exc))
        raise FailNow(f'{exc}; not sent again, to avoid a duplicate') from exc
    except TemporaryMailError as exc:
        mark_outbox(outbox, 'queued', error=str(exc))  # the transaction never completed: a retry is safe
        raise
    except Exception as exc:
        mark_outbox(outbox, 'failed', error=f'{type(exc).__name__}: {exc}')
        raise
    mark_outbox(outbox, 'sent', sent_at=models.utcnow(), refused=json.dumps(result.refused))
    copy_to_sent(client, raw)
    return sent_result(outbox)


def outbox_of(client, user_id, to, cc, bcc):
    """The send's outbox row: made by the API with the task; made here for a task queued directly."""
    task_id = logs.task_id.get()
    outbox = models.Outbox.find(task_id=task_id)
    if outbox is None:
        outbox = models.Outbox.create(client=client.id, user_id=user_id, task_id=task_id,
                                      message_id=smtp.make_message_id(domain_of(client)),
                                      recipients=json.dumps(smtp.envelope_recipients(to, cc or [], bcc or [])))
    return outbox


def domain_of(client):
    return client.email.rpartition('@')[2] or 'localhost'


def mark_outbox(outbox, state, **fields):
    models.Outbox.change(outbox.id, state=state, **fields)
    outbox.state = state
    for name, value in fields.items():
        setattr(outbox, name, value)


def sent_result(outbox):
    refused = json.loads(outbox.refused)
    recipients = [r for r in json.loads(outbox.recipients) if r not in refused]
    return {'status': 'success', 'message_id': outbox.message_id, 'sent_timestamp': int(outbox.sent_at.replace(
        tzinfo=datetime.timezone.utc).timestamp() * 1000), 'recipients_sent': recipients,
        'recipients_refused': refused}


def uploads_of(ids):
    if not ids:
        return []
    uploads = list(models.Upload.select().where(models.Upload.id.in_(ids)))
    if len(uploads) != len(set(ids)):
        raise FailNow(f'attachments {sorted(set(ids) - {u.id for u in uploads})} no longer exist')
    return [(u.filename, u.content_type, models.Blob.content(u.blob)) for u in uploads]


def copy_to_sent(client, raw):
    """Keep the sent message in the Sent folder, here and (when asked) on the IMAP server.

    A failure here never fails the send: the message is out, and sending it
    again to get a copy would be the duplicate we promise never to make.
    """
    uid = None
    sent = models.EmailFolder.find(client=client.id, role='sent')
    try:
        if client.incoming_protocol == 'imap' and client.copy_sent:
            with open_incoming(client) as session:
                if sent is None:
                    sent = refresh_sent_folder(session, client)
                if sent is not None:
                    uid = session.append(sent.raw_name, raw, flags=('\\Seen',))
    except MailError as exc:
        logger.warning('sent copy of account %s not appended: %s', client.id, exc)
    if sent is None:
        sent = models.EmailFolder.get_or_none(models.EmailFolder.client == client.id,
                                              models.EmailFolder.role == 'sent') or models.EmailFolder.create(
            client=client.id, name='Sent', raw_name='Sent', role='sent')
    item = dict(message_fields(raw), uid=uid, **models.flag_fields(('\\Seen',)))
    models.store_messages(sent, [item], 'uid')


def refresh_sent_folder(session, client):
    refresh_folders(session, client, {'messages_deleted': 0})
    return models.EmailFolder.get_or_none(models.EmailFolder.client == client.id, models.EmailFolder.role == 'sent')


def find_send(user_id, key):
    """The task id of this user's earlier send with the same Idempotency-Key, if any."""
    row = models.Outbox.get_or_none(models.Outbox.user_id == user_id, models.Outbox.idempotency_key == key)
    return row.task_id if row else None


def queue_send(client, user_id, clean, key):
    """Record the outbox row with the task, then queue it; returns (task id, state)."""
    task = send_email.s(client.id, client.tenant_id, user_id, clean['to'], cc=clean['cc'], bcc=clean['bcc'],
                        subject=clean.get('subject') or '', body_text=clean.get('body_text') or '',
                        body_html=clean.get('body_html'), attachment_ids=clean['attachment_ids'])
    recipients = smtp.envelope_recipients(clean['to'], clean['cc'], clean['bcc'])
    try:
        with models.database.atomic():
            record_enqueued(task)
            models.Outbox.create(client=client.id, user_id=user_id, task_id=task.id, idempotency_key=key,
                                 message_id=smtp.make_message_id(domain_of(client)),
                                 recipients=json.dumps(recipients))
    except models.pw.IntegrityError:
        return find_send(user_id, key), 'pending'  # the same key won a moment earlier
    try:
        huey.enqueue(task)
    except Exception:
        models.Outbox.delete().where(models.Outbox.task_id == task.id).execute()
        models.ledger_delete(task.id)
        raise
    return task.id, 'pending'


@service_task(priority=5, retries=5)
def delete_emails(email_ids, tenant_id, user_id, permanent=False):
    """Move messages to Trash (soft), or expunge them for good (permanent), on the server and here.

    Ids already deleted (or gone) are skipped, so running the same delete
    twice deletes nothing more and `deleted_count` counts each message once.
    """
    Message = models.EmailMessage
    query = Message.select().where(Message.id.in_(list(email_ids)),
                                   Message.client.in_(models.EmailClient.select(models.EmailClient.id)
                                                      .where(models.EmailClient.user_id == user_id)))
    if not permanent:
        query = query.where(Message.is_deleted == False)  # noqa: E712
    by_client = {}
    for message in query:
        by_client.setdefault(message.client_id, []).append(message)
    deleted = 0
    for client_id, batch in by_client.items():
        client = models.EmailClient.get_by_id(client_id)
        with open_incoming(client) as session:
            if client.incoming_protocol == 'imap':
                delete_on_imap(session, client, batch, permanent)
            elif permanent:
                session.delete(pop3_numbers(session, batch))
        deleted += models.forget_messages(batch, permanent)
    return {'status': 'success', 'deleted_count': deleted}


def delete_on_imap(session, client, messages, permanent):
    """One MOVE (or STORE + EXPUNGE) per folder, a UID set per command (RFC 6851, 4315)."""
    trash = models.EmailFolder.get_or_none(models.EmailFolder.client == client.id,
                                           models.EmailFolder.role == 'trash')
    by_folder = {}
    for message in messages:
        if message.uid is not None:
            by_folder.setdefault(message.folder_id, []).append(message.uid)
    for folder_id, uids in by_folder.items():
        folder = models.EmailFolder.get_by_id(folder_id)
        try:
            session.select(folder.raw_name, readonly=False)
        except FolderGone:
            continue  # the folder and its messages are gone on the server already
        if permanent or trash is None or folder.id == trash.id:
            session.expunge_uids(uids)
        else:
            session.move(uids, trash.raw_name)


def pop3_numbers(session, messages):
    listed = session.uidl()
    return [listed[m.pop3_uid] for m in messages if m.pop3_uid in listed]


@service_task(priority=3, retries=3)
def check_spam(email_id, tenant_id, user_id):
    """Score one message with the base model and the tenant's learning; store and return the verdict."""
    message = message_of(email_id, user_id)
    parsed = mime.parse(models.Blob.content(message.blob)[:SPAM_READ_LIMIT])
    verdict = spam_model().score(parsed, delta=tenant_learning(), threshold=spam_threshold())
    models.EmailMessage.update(is_spam=verdict.is_spam, spam_score=verdict.spam_score,
                               spam_indicators=json.dumps(verdict.indicators)) \
        .where(models.EmailMessage.id == message.id).execute()
    client = models.EmailClient.get_by_id(message.client_id)
    if verdict.is_spam and client.move_spam and client.incoming_protocol == 'imap':
        move_to_role(client, message, 'junk')
    return {'status': 'success', 'is_spam': verdict.is_spam, 'spam_score': round(verdict.spam_score, 4),
            'indicators': verdict.indicators}


# A 25 MB message scores on its first 2 MB: what decides spam is in the
# headers and the first parts, and scoring time and memory stay bounded.
SPAM_READ_LIMIT = 2 * 1024 * 1024


@functools.cache
def spam_model():
    path = pathlib.Path(SETTINGS['spam.model_path'])
    return spam.Model.load(path if path.is_absolute() else settings_mod.ROOT / path)


def spam_threshold():
    setting = SETTINGS['spam.threshold']  # checked at start-up: 'model' or a number
    return spam_model().strict_threshold if setting == 'model' else float(setting)


def tenant_learning():
    row = models.SpamLearning.get_or_none()
    return spam.Delta.from_dict(json.loads(row.data)) if row else None


def message_of(email_id, user_id):
    message = models.EmailMessage.get_or_none(
        models.EmailMessage.id == email_id,
        models.EmailMessage.client.in_(models.EmailClient.select(models.EmailClient.id)
                                       .where(models.EmailClient.user_id == user_id)))
    if message is None:
        raise FailNow(f'no message {email_id} for this user')
    return message


def learn_report(message, verdict):
    """Add a user's spam or ham report to the tenant's learning (never another tenant's)."""
    parsed = mime.parse(models.Blob.content(message.blob)[:SPAM_READ_LIMIT])
    with models.locked_learning() as row:
        delta = spam.Delta.from_dict(json.loads(row.data))
        delta.learn(parsed, verdict, spam_model())
        models.SpamLearning.update(data=json.dumps(delta.to_dict()), updated_at=models.utcnow()) \
            .where(models.SpamLearning.id == row.id).execute()
    models.EmailMessage.update(is_spam=verdict == 'spam').where(models.EmailMessage.id == message.id).execute()


@service_task(priority=3, retries=3)
def file_report(email_id, tenant_id, user_id, verdict):
    """Move a reported message to Junk (spam) or back to the inbox (ham) on the IMAP server."""
    message = message_of(email_id, user_id)
    client = models.EmailClient.get_by_id(message.client_id)
    moved = False
    if client.incoming_protocol == 'imap':
        moved = move_to_role(client, message, 'junk' if verdict == 'spam' else 'inbox')
    return {'status': 'success', 'moved': moved}


def move_to_role(client, message, role):
    """Move one message to the account's folder with `role`; False if it is there already or has none."""
    target = models.EmailFolder.get_or_none(models.EmailFolder.client == client.id, models.EmailFolder.role == role)
    folder = models.EmailFolder.get_by_id(message.folder_id)
    if target is None or folder.id == target.id or message.uid is None:
        return False
    with open_incoming(client) as session:
        session.select(folder.raw_name, readonly=False)
        session.move([message.uid], target.raw_name)
    # The next sync finds it in its new folder; until then it is hidden here.
    models.EmailMessage.update(is_deleted=True).where(models.EmailMessage.id == message.id).execute()
    return True


def queue_spam_checks(client, message_ids):
    """Score new inbox mail in the background (priority 3), a bounded number per sync."""
    if SETTINGS['spam.auto_check'] != 'on':
        return
    for message_id in message_ids[:AUTO_CHECK_LIMIT]:
        check_spam(message_id, client.tenant_id, client.user_id)


AUTO_CHECK_LIMIT = 500


@service_task(priority=10, retries=0, periodic=crontab(minute='*/5'))
def periodic_sync(now=None):
    """Queue sync_emails for every account with sync on whose interval has passed."""
    now = now or models.utcnow()
    queued = []
    for client in models.due_for_sync(now):
        task_id, _, queued_now = queue_sync(client, client.user_id)
        if queued_now:
            queued.append(task_id)
    return {'status': 'ok', 'task_ids': queued}


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
