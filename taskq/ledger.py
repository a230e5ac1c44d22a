"""The task ledger's one writer: every change of a `models.TaskRecord` is made here.

A record is written at two moments: at enqueue, in the caller's process
(`record`, from `LedgerHuey.enqueue`), so a task answered with 202 is on record
before it reaches the broker; and from Huey's signals in the worker (`install`):
running, succeeded, failed or dead, retrying, revoked, interrupted, one short
UPDATE each. Operators and users act on records through `revoke`, `requeue`
(re-run by a person, recovery of a dead worker's task, a task interrupted by
shutdown) and `purge`; recovery and the hourly cleanup use the rest.

A record's life:

    pending -> running -> succeeded | failed | dead        (dead: retries exhausted)
                       -> retrying -> running ...
    pending | retrying -> revoked
    failed | dead | revoked -> pending                      (requeue: a re-run, same id)
    running (its worker gone) -> pending                    (requeue: recovery, same id)

A run owns its record from its claim on: the claim moves the record from
pending or retrying to running under the worker's name, and only while that
worker's heartbeat row exists (taskq.workers: the row is the worker's lease);
every later write of the run is a compare-and-set on (running, that worker).
A second copy of a task (a broker duplicate, a stale run) finds the record
taken and does not run; a run whose worker was declared dead and whose task
was re-queued writes nothing more.

Payload arguments are stored redacted: no secret ever reaches the ledger.
"""
import collections
import datetime
import functools
import inspect
import hashlib
import json
import logging
import re
import threading
import traceback
import weakref

from huey import signals as S
from huey.exceptions import CancelExecution, TaskTimeout

import models
from mailkit import logs
from mailkit.errors import FailNow, PermanentMailError
from taskq.storage import BEFORE_WAIT, WriteTurns

logger = logging.getLogger('emailsvc.ledger')

PENDING, RUNNING, RETRYING, SUCCEEDED, FAILED, DEAD, REVOKED = TASK_STATES = (
    'pending', 'running', 'retrying', 'succeeded', 'failed', 'dead', 'revoked')
FINAL_STATES = (SUCCEEDED, FAILED, DEAD, REVOKED)
ACTIVE_STATES = (PENDING, RUNNING, RETRYING)
REVOCABLE = (PENDING, RETRYING)
RERUNNABLE = (FAILED, DEAD, REVOKED)

# Retrying cannot fix these: the task fails at once and the ledger says why.
NO_RETRY = (FailNow, PermanentMailError)


class Stopped(FailNow):
    """A person asked the running task to stop; it stopped at a safe point and ends revoked."""


class LedgerConflict(Exception):
    """The record is not in a state that allows the action; `code` is stable, the message says why."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- statements
#
# The ledger is written for every task, several times: its statements are
# built once per column set and sent as plain SQL, because building them with
# the query builder each time cost more than running them (0.3 ms of 0.5 ms
# per enqueue, measured with cProfile). A ledger write is the service's own
# bookkeeping by task id, so it needs no tenant predicate.

INCREMENT = object()  # update(attempts=INCREMENT): attempts = attempts + 1
Record = models.TaskRecord


class Append(str):
    """update(history=Append(line)): the line is added to the end of the column's text."""


@functools.lru_cache(maxsize=128)
def _insert_sql(param, columns):
    names = ', '.join(f'"{c}"' for c in columns)
    return (f'INSERT INTO "task_record" ({names}) VALUES ({", ".join([param] * len(columns))}) '
            f'ON CONFLICT ("id") DO NOTHING')


@functools.lru_cache(maxsize=128)
def _update_sql(param, columns, increments, state_count, expected, appends=()):
    sets = [f'"{c}" = "{c}" + 1' for c in increments] + [
        f'"{c}" = COALESCE("{c}", \'\') || {param}' if c in appends else f'"{c}" = {param}' for c in columns]
    where = f'"id" = {param}'
    if state_count:
        where += f' AND "state" IN ({", ".join([param] * state_count)})'
    for column in expected:
        where += f' AND "{column}" = {param}'
    return f'UPDATE "task_record" SET {", ".join(sets)} WHERE {where}'


# On PostgreSQL the hot statements (the enqueue's INSERT, the claim, a run's
# final UPDATE) run as prepared statements, once per connection: planning an
# UPDATE of task_record, with its six indexes to weigh, cost the server more
# than running it (claim: 237 -> 93 us of backend CPU, final write: 150 -> 93,
# measured with /proc/<backend>/stat over 3,000 statements). SQLite's module
# keeps its own cache of compiled statements per connection. PREPARE is not
# transactional (a rollback keeps it) and lives as long as the connection; a
# pooler in transaction mode (pgbouncer) would not keep it, and is not used.
_prepared_on = weakref.WeakKeyDictionary()   # psycopg2 connection -> names prepared on it


@functools.lru_cache(maxsize=8)
def _write_turns(path):
    return WriteTurns(path)


@functools.lru_cache(maxsize=128)
def _prepared_form(sql):
    """(name, PREPARE text, EXECUTE text with psycopg2's placeholders) of a %s-parameter statement."""
    count = sql.count('%s')
    numbered = iter(range(1, count + 1))
    body = re.sub('%s', lambda match: f'${next(numbered)}', sql)
    name = 'ledger_' + hashlib.sha1(sql.encode()).hexdigest()[:16]
    return name, f'PREPARE {name} AS {body}', f'EXECUTE {name} ({", ".join(["%s"] * count)})' if count else \
        f'EXECUTE {name}'


def execute(sql, params):
    """Run one ledger statement (prepared once per connection on PostgreSQL; on SQLite, outside
    a transaction, in its turn among the file's writers: storage.WriteTurns); returns the cursor."""
    database = models.database
    if database.param != '%s':
        if database.in_transaction():
            return database.execute_sql(sql, params)
        with _write_turns(database.database).turn():
            return database.execute_sql(sql, params)
    name, prepare, run = _prepared_form(sql)
    prepared = _prepared_on.setdefault(database.connection(), set())
    if name not in prepared:
        database.execute_sql(prepare)
        prepared.add(name)
    return database.execute_sql(run, params)


def _row_values(fields):
    """Column name -> database value (JSON columns encoded, as peewee would)."""
    columns = Record._meta.fields
    return {columns[name].column_name: value if value is INCREMENT else columns[name].db_value(value)
            for name, value in fields.items()}


def insert(task_id, **fields):
    """Write a record with any fields (tests, tools); a second insert of the same id is ignored.
    True if inserted."""
    values = {'id': task_id, **_row_values(fields)}
    for field in Record._meta.sorted_fields:  # the model's defaults, as peewee would fill them
        if field.default is not None and field.column_name not in values:
            values[field.column_name] = field.db_value(field.default() if callable(field.default) else field.default)
    return _insert_row(tuple(values), tuple(values.values()))


def _insert_row(columns, values):
    sql = _insert_sql(models.database.param, columns)
    return models.with_reconnect(lambda: execute(sql, values).rowcount) == 1


# The enqueue's record, column by column: every column without a default, and
# those with one (attempts 0, enqueued_at now) given as insert() would fill
# them. One fixed order makes one prepared statement for every task, and the
# parameters are built straight from the task, not through a dict of fields and
# a walk of the model's defaults (~15 us of an enqueue's CPU, measured).
RECORD_COLUMNS = ('id', 'state', 'name', 'priority', 'retries_left', 'tenant_id', 'user_id', 'request_id', 'args',
                  'attempts', 'enqueued_at')


def update(task_id, only_states=(), expect=None, **fields):
    """Change one record; only from `only_states` and while its columns match `expect`, when given.
    Returns rows changed."""
    sql, params = _update_statement(task_id, only_states, expect, **fields)
    return models.with_reconnect(lambda: execute(sql, params).rowcount)


def _update_statement(task_id, only_states=(), expect=None, **fields):
    """update()'s statement and parameters."""
    values = _row_values(fields)
    expected = _row_values(expect or {})
    increments = tuple(c for c, v in values.items() if v is INCREMENT)
    columns = tuple(c for c in values if c not in increments)
    appends = tuple(c for c, v in fields.items() if isinstance(v, Append))
    sql = _update_sql(models.database.param, columns, increments, len(only_states), tuple(expected), appends)
    return sql, tuple(values[c] for c in columns) + (task_id,) + tuple(only_states) + tuple(expected.values())


def execute_both(first, second):
    """Run two (sql, params) updates as one: one round trip on PostgreSQL (data-modifying CTEs,
    one statement), one transaction in one write turn on SQLite; returns their rows changed."""
    database = models.database
    if database.param == '%s':
        (sql_a, params_a), (sql_b, params_b) = first, second
        sql = (f'WITH a AS ({sql_a} RETURNING 1), b AS ({sql_b} RETURNING 1) '
               f'SELECT (SELECT count(*) FROM a), (SELECT count(*) FROM b)')
        return tuple(execute(sql, params_a + params_b).fetchone())
    with _write_turns(database.database).turn(), database.atomic():
        return tuple(database.execute_sql(*statement).rowcount for statement in (first, second))


def delete(task_id):
    """Forget a record whose task never reached the broker."""
    with models.all_tenants():
        models.with_reconnect(Record.delete().where(Record.id == task_id).execute)


# ---------------------------------------------------------------- enqueue

signature = functools.lru_cache(maxsize=None)(inspect.signature)


def call_arguments(task):
    """The task's arguments by name, as the function declared them (bound once per task object:
    the enqueue reads them twice, for the record and for the tenant's turn)."""
    bound = getattr(task, 'ledger_arguments', None)
    if bound is None:
        bound = task.ledger_arguments = _bind(task)
    return bound


@functools.lru_cache(maxsize=None)
def tenant_position(func):
    """Where `func` takes tenant_id among its positional parameters, or None."""
    names = [p.name for p in signature(func).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names.index('tenant_id') if 'tenant_id' in names else None


def tenant_of_call(func, args, kwargs):
    """The tenant_id a call of `func` passes, without binding every argument (a task's run asks)."""
    if 'tenant_id' in kwargs:
        return kwargs['tenant_id']
    position = tenant_position(func)
    if position is not None and position < len(args):
        return args[position]
    default = signature(func).parameters.get('tenant_id')
    return None if default is None or default.default is inspect.Parameter.empty else default.default


@functools.lru_cache(maxsize=None)
def parameter_names(func):
    """(positional-or-keyword names, every name) of `func`, or None when it takes *args, **kwargs or
    positional-only parameters (inspect binds those)."""
    parameters = signature(func).parameters.values()
    if any(p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in parameters):
        return None
    return tuple(p.name for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD), \
        tuple(p.name for p in parameters)


def _bind(task):
    func = getattr(type(task), 'func', None)
    args, kwargs = task.args, {k: v for k, v in task.kwargs.items() if k != 'task'}
    if func is None:
        return dict(kwargs, args=list(args)) if args else kwargs
    names = parameter_names(func)
    if names is not None and len(args) <= len(names[0]) and kwargs.keys() <= set(names[1][len(args):]):
        # What bind_partial gives (the arguments passed, in the parameters' order) at a
        # fifth of its cost; any other call goes to it, and it raises for a wrong one.
        return {**dict(zip(names[0], args)), **{name: kwargs[name] for name in names[1][len(args):] if name in kwargs}}
    return dict(signature(func).bind_partial(*args, **kwargs).arguments)


def redact(arguments):
    """Arguments safe to store and show: anything secret-looking is masked."""
    return {k: '[redacted]' if any(w in k.lower() for w in logs.SECRET_WORDS) else v
            for k, v in arguments.items()}


def record(task):
    """Insert the task's record (once per task object); True if it is new (not a retry or a re-run)."""
    if getattr(task, 'on_record', False):
        return False
    arguments = call_arguments(task)
    task.on_record = True
    request_id = getattr(task, 'request_id', None) or logs.request_id.get()
    return _insert_row(RECORD_COLUMNS, (
        task.id, PENDING, task.name, int(task.priority or 0), int(task.retries),
        Record.tenant_id.db_value(arguments.get('tenant_id')), Record.user_id.db_value(arguments.get('user_id')),
        request_id, Record.args.db_value(redact(arguments)), 0, models.utcnow()))


# ---------------------------------------------------------------- the worker's signals

class DeferredLedger:
    """Ledger writes of this worker's signals, kept in order while the database is away; and a
    successful run's final write, held until the worker's next claim.

    A task that ends during a database outage would otherwise stay `running`
    under a live worker, which recovery rightly leaves alone. Its writes wait
    here and the heartbeat thread replays them once the database answers. If
    the worker dies first, its records are a dead worker's, and recovery
    re-queues them.

    A run that succeeded writes its end with the worker's next claim, in one
    round trip (execute_both), instead of a round trip of its own: a busy
    worker pays one ledger statement per task where it paid two. The write
    is held only as long as the worker goes on without waiting: it is made
    once the worker's lane has been empty for storage.LINGER (5 ms:
    storage.BEFORE_WAIT), before any other write of this worker, at each
    heartbeat and at the worker's stop. Held or not, it is the same
    compare-and-set on (running, this worker), made from
    the same process, so what recovery may conclude is unchanged (taskq.workers):
    a worker killed while holding it leaves its record `running` under a dead
    worker, re-queued, as a worker killed just before a write always did.
    Only successes are held: a failure, retry or dead write may carry an
    event, and an application waiting on one should hear it at once.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.waiting = collections.deque()
        self.held = None   # (task_id, update() keyword arguments): made with the next claim

    def write(self, task_id, event=None, **fields):
        """`event`: keyword arguments of models.emit, emitted in the same transaction as the write."""
        with self.lock:
            self._release()
            self._write(task_id, event, fields)

    def hold(self, task_id, **fields):
        """A successful run's final write, to be made with the next claim (see the class)."""
        with self.lock:
            self._release()
            if self.waiting:   # behind writes waiting for the database: in their order
                self.waiting.append((task_id, None, fields))
            else:
                self.held = (task_id, fields)

    def release(self):
        """Make the held write now (the worker is about to wait, or to stop)."""
        with self.lock:
            self._release()

    def _release(self):
        if self.held is not None:
            (task_id, fields), self.held = self.held, None
            self._write(task_id, None, fields)

    def _write(self, task_id, event, fields):
        if not self.waiting:   # behind earlier writes, a write would overtake them
            try:
                if not update_and_emit(task_id, event, fields):
                    logger.warning('ledger write for task %s not made: the record is no longer as this '
                                   'run left it', task_id)
                return
            except (models.pw.OperationalError, models.pw.InterfaceError) as exc:
                logger.warning('ledger write for task %s deferred until the database answers: %s',
                               task_id, str(exc).strip())
        self.waiting.append((task_id, event, fields))

    def replay(self):
        """Make the held and the waiting writes, oldest first; stop at the first failure (the next
        beat tries again)."""
        with self.lock:
            self._release()
            self._replay()

    def _replay(self):
        while self.waiting:
            task_id, event, fields = self.waiting[0]
            made = update_and_emit(task_id, event, fields)
            self.waiting.popleft()
            if made:
                logger.info('deferred ledger write for task %s made', task_id)
            else:
                logger.warning('deferred ledger write for task %s dropped: the record is no longer this '
                               "run's (its worker was taken for dead and the task re-queued)", task_id)

    def claim(self, task_id, worker, **fields):
        """Make the run's claim, after the writes waiting before it and with the held one; True if
        this run owns the record. Raises the database's error when it cannot answer (a held write
        stays held)."""
        with self.lock:
            self._replay()
            values = _row_values(fields)
            claim = (_claim_sql(models.database.param, tuple(values)),
                     (*values.values(), worker, task_id, *CLAIMABLE, worker))
            if self.held is None:
                return models.with_reconnect(lambda: execute(*claim).rowcount) == 1
            held_id, held = self.held
            made, owned = models.with_reconnect(lambda: execute_both(_update_statement(held_id, **held), claim))
            self.held = None
            if not made:
                logger.warning('ledger write for task %s not made: the record is no longer as this run left it',
                               held_id)
            return owned == 1


def update_and_emit(task_id, event, fields):
    """update(), and the event in the same transaction when the update was made; True if it was."""
    if event is None:
        return update(task_id, **fields)
    with models.database.atomic():
        made = update(task_id, **fields)
        if made:
            models.emit(**event)
    return made


deferred = DeferredLedger()
CLAIMABLE = (PENDING, RETRYING)


@functools.lru_cache(maxsize=8)
def _claim_sql(param, columns):
    """pending|retrying -> running under `worker`, only while the worker's lease (heartbeat row) exists."""
    sets = ', '.join(f'"{c}" = {param}' for c in columns)
    return (f'UPDATE "task_record" SET "state" = \'{RUNNING}\', "attempts" = "attempts" + 1, {sets}, '
            f'"worker" = {param} WHERE "id" = {param} AND "state" IN ({param}, {param}) '
            f'AND EXISTS (SELECT 1 FROM "consumer_heartbeat" WHERE "id" = {param})')


def claim(huey, task):
    """Take the task's record for this run (pre-execute); CancelExecution when another run has it,
    it is no longer waiting, or the database cannot say. A cancelled copy that was the task's
    only one is found by recovery (pending, and not in the broker) and queued again."""
    worker = huey.worker_id()
    task.ledger_started_at = models.utcnow()  # for the attempt's line in the history, should it retry
    try:
        owned = deferred.claim(task.id, worker, started_at=task.ledger_started_at, retries_left=task.retries,
                               next_retry_at=None, finished_at=None)
    except (models.pw.OperationalError, models.pw.InterfaceError) as exc:
        logger.warning('task %s not run: its claim could not be made (%s); recovery queues it again',
                       task.id, str(exc).strip())
        raise CancelExecution(retry=False) from None
    if not owned:
        logger.warning('task %s not run: its record is %s, not waiting for this copy', task.id, state_of(task.id))
        raise CancelExecution(retry=False)


def install(huey):
    """Record every task's life from `huey`'s signals (in the worker processes)."""

    def finish(task_id, **fields):
        """A write of this run: only while the record is still running under this worker."""
        deferred.write(task_id, only_states=(RUNNING,), expect={'worker': huey.worker_id()}, **fields)

    @huey.signal(S.SIGNAL_EXECUTING)
    def running(signal_name, task):
        # Every log line from here to the end of the run carries the task's ids.
        logs.task_id.set(task.id)
        logs.request_id.set(getattr(task, 'request_id', None))

    @huey.pre_execute()
    def claim_record(task):
        claim(huey, task)

    if deferred.release not in BEFORE_WAIT:
        BEFORE_WAIT.append(deferred.release)

    @huey.post_execute()
    def forget_task_ids(task, value, exc):
        logs.task_id.set(None)
        logs.request_id.set(None)

    @huey.signal(S.SIGNAL_COMPLETE)
    def succeeded(signal_name, task):
        deferred.hold(task.id, only_states=(RUNNING,), expect={'worker': huey.worker_id()}, state=SUCCEEDED,
                      finished_at=models.utcnow(), result=getattr(task, 'ledger_result', None), error=None,
                      traceback=None)

    @huey.signal(S.SIGNAL_ERROR, S.SIGNAL_TIMEOUT)
    def failed(signal_name, task, exc=None):
        if signal_name == S.SIGNAL_TIMEOUT:
            exc = TaskTimeout(f'soft time limit of {task.timeout}s exceeded')
        task.ledger_error = (f'{type(exc).__name__}: {exc}',
                             ''.join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        if isinstance(exc, Stopped):
            finish(task.id, state=REVOKED, finished_at=models.utcnow(), error=str(exc), traceback=None,
                   retries_left=0)
            return
        if task.retries:
            return  # SIGNAL_RETRYING follows and records the retry
        gave_up = isinstance(exc, NO_RETRY) or not type(task).default_retries
        error, tb = task.ledger_error
        finish(task.id, state=FAILED if gave_up else DEAD, finished_at=models.utcnow(),
               error=error, traceback=tb, retries_left=0, event=None if gave_up else dead_event(task))

    @huey.signal(S.SIGNAL_RETRYING)
    def retrying(signal_name, task):
        delay = huey.retry_delay(task)
        task.retry_delay = delay  # Huey schedules the retry with this
        error, tb = getattr(task, 'ledger_error', (None, None))
        now = models.utcnow()
        attempt = history_line('attempt', at=getattr(task, 'ledger_started_at', None), ended=now,
                               worker=huey.worker_id(), error=error)
        finish(task.id, state=RETRYING, error=error, traceback=tb, retries_left=task.retries - 1,
               next_retry_at=now + datetime.timedelta(seconds=delay), history=Append(attempt))

    @huey.signal(S.SIGNAL_REVOKED, S.SIGNAL_EXPIRED)
    def revoked(signal_name, task):   # before any claim: the record waits (or a person revoked it)
        deferred.write(task.id, only_states=(*CLAIMABLE, REVOKED), state=REVOKED if signal_name == S.SIGNAL_REVOKED else FAILED,
                       finished_at=models.utcnow(),
                       error=None if signal_name == S.SIGNAL_REVOKED else 'expired before it ran')

    @huey.signal(S.SIGNAL_INTERRUPTED)
    def interrupted(signal_name, task):
        """SIGTERM stopped the task midway: put it back so it runs again, same id."""
        with models.all_tenants():
            row = Record.get_or_none(Record.id == task.id)
        if row is not None:
            requeue(huey, row, from_states=(RUNNING,), expect={'worker': huey.worker_id()},
                    reason='interrupted by consumer shutdown; re-queued')


def dead_event(task):
    """The task.dead event of a task that used up its retries: ids and the kind of error, no arguments."""
    arguments = call_arguments(task)
    return {'type_': 'task.dead', 'tenant_id': arguments.get('tenant_id'), 'user_id': arguments.get('user_id'),
            'account_id': arguments.get('email_client_id'),
            'data': {'task_id': task.id, 'name': task.name, 'error_type': type_of_error(task)}}


def type_of_error(task):
    error = getattr(task, 'ledger_error', (None, None))[0] or ''
    return error.partition(':')[0] or None


def report_progress(done, total):
    """Show the running task's progress on its record."""
    update(logs.task_id.get(), progress_done=done, progress_total=total)


# Checks a worker adds at every safe point (taskq.workers: a run whose worker
# was taken for dead ends there instead of going on beside its re-run).
SAFE_POINT_CHECKS = []


def at_safe_point():
    """Run the worker's safe-point checks (its lease): a run whose worker was taken for dead ends here."""
    for check in SAFE_POINT_CHECKS:
        check()


def raise_if_stop_requested():
    """Raise Stopped when a person has asked the running task to stop (call it at safe points only)."""
    at_safe_point()
    sql = f'SELECT "stop_requested_at" FROM "task_record" WHERE "id" = {models.database.param}'
    row = models.database.execute_sql(sql, (logs.task_id.get(),)).fetchone()
    if row and row[0] is not None:
        raise Stopped('stopped on request')


def history_line(kind, **fields):
    """One JSON line of a record's history: an earlier attempt, or a person's action (`by`)."""
    return json.dumps({'kind': kind, **{k: models.iso(v) if isinstance(v, datetime.datetime) else v
                                        for k, v in fields.items()}}) + '\n'


def history_of(row):
    """The record's history lines as dicts, oldest first."""
    return [json.loads(line) for line in (row.history or '').splitlines() if line.strip()]


# ---------------------------------------------------------------- actions

def revoke(huey, task_id, by=None):
    """Revoke a waiting task; LedgerConflict unless it is pending or retrying. `by` names who asked."""
    # Mark first, then tell Huey: a worker that dequeues it in between finds it
    # revoked in the ledger's eyes and Huey's, never run and recorded twice.
    now = models.utcnow()
    action = {'history': Append(history_line('revoke', at=now, by=by))} if by else {}
    if not update(task_id, only_states=REVOCABLE, state=REVOKED, finished_at=now, **action):
        raise LedgerConflict('not_revocable', f'task {task_id} is {state_of(task_id)}; only pending or '
                                              'retrying tasks can be revoked.')
    huey.revoke_by_id(task_id)


def stop(task_id, by, outbox_state=None):
    """Ask a running task to stop at its next safe point; LedgerConflict where it cannot.

    A sync stops between committed batches. A send whose message has reached
    the SMTP end-of-data mark (`outbox_state` sending, sent or unknown) is past
    stopping: the server may already have it. Other tasks have no safe point.
    """
    state = state_of(task_id)
    if state != RUNNING:
        raise LedgerConflict('not_running', f'task {task_id} is {state}; only running tasks can be stopped '
                                            '(revoke a waiting one).')
    with models.all_tenants():
        name = Record.get_by_id(task_id).name
    if name == 'send_email' and outbox_state in ('sending', 'sent', 'unknown'):
        raise LedgerConflict('not_stoppable', f'task {task_id} has sent its message up to the SMTP end-of-data '
                                              'mark; the server may have it, so it cannot be stopped.')
    if name not in STOPPABLE:
        raise LedgerConflict('not_stoppable', f'task {task_id} ({name}) has no point where it can stop '
                                              'safely; it ends within its time limit.')
    now = models.utcnow()
    if not update(task_id, only_states=(RUNNING,), stop_requested_at=now,
                  history=Append(history_line('stop', at=now, by=by))):
        raise LedgerConflict('not_running', f'task {task_id} is {state_of(task_id)}; only running tasks can be '
                                            'stopped.')


STOPPABLE = ('sync_emails', 'send_email')  # the tasks that call raise_if_stop_requested()


def requeue(huey, row, from_states=RERUNNABLE, expect=None, reason=None, by=None):
    """Queue a recorded task again under its id, on the same record; returns the task.

    A re-run asked for by a person (from failed, dead or revoked: the task's
    full retries, the caller's request id) or by recovery and shutdown (from
    running or waiting, `reason` says why: the retries it had left). Only while
    the record is still in `from_states` (and matches `expect`): of two callers
    that race for one record, one requeues it and the other gets LedgerConflict.
    """
    rerun = set(from_states) <= set(RERUNNABLE)
    wrapper = huey.service_tasks.get(row.name)
    if wrapper is None:
        if rerun:
            raise LedgerConflict('not_retryable', f'task {row.id} ({row.name}) cannot be re-run.')
        # A task this code base no longer has: say so instead of trying forever.
        update(row.id, state=FAILED, finished_at=models.utcnow(),
               error=f'cannot re-run {row.name}: no such task in this version')
        return None
    # The attempt that ended (or was lost) goes into the history, with who asked for the re-run.
    ended = history_line('attempt', at=row.started_at, ended=row.finished_at, worker=row.worker,
                         error=reason or row.error) if row.started_at else ''
    asked = history_line('retry', at=models.utcnow(), by=by) if by else ''
    fields = dict(state=PENDING, enqueued_at=models.utcnow(), finished_at=None, next_retry_at=None,
                  stop_requested_at=None, history=Append(ended + asked))
    if rerun:
        fields['request_id'] = logs.request_id.get()
    else:
        fields['error'] = reason
    if not update(row.id, only_states=from_states, expect=expect, **fields):
        raise LedgerConflict('not_retryable', f'task {row.id} is {state_of(row.id)}; only '
                                              f'{", ".join(from_states)} tasks can be re-run.')
    options = {} if rerun else {'retries': row.retries_left}
    if row.priority is not None:   # a recovered periodic sync stays below the syncs users asked for
        options['priority'] = row.priority
    task = wrapper.s(**row.args, id=row.id, **options)
    task.request_id = fields.get('request_id', row.request_id)
    task.on_record = True
    try:
        if row.state == REVOKED:
            huey.restore_by_id(row.id)
        return huey.enqueue(task)
    except Exception:
        update(row.id, state=row.state, enqueued_at=row.enqueued_at, finished_at=row.finished_at,
               next_retry_at=row.next_retry_at, error=row.error)
        raise


def purge(task_id=None, all_dead=False):
    """Delete finished records: one by id, or every dead letter. Returns how many."""
    query = Record.delete().where(Record.state.in_(FINAL_STATES))
    query = query.where(Record.state == DEAD) if all_dead else query.where(Record.id == task_id)
    return query.execute()


def prune(now, results_ttl, history_days):
    """Clear results older than `results_ttl` seconds; drop final records older than `history_days`."""
    results_before = now - datetime.timedelta(seconds=results_ttl)
    history_before = now - datetime.timedelta(days=history_days)
    with models.all_tenants():
        results = (Record.update(result=None)
                   .where(Record.finished_at < results_before, Record.result.is_null(False)).execute())
        history = (Record.delete()
                   .where(Record.state.in_(FINAL_STATES), Record.finished_at < history_before).execute())
    return results, history


def state_of(task_id):
    with models.all_tenants():
        row = Record.get_or_none(Record.id == task_id)
    return row.state if row else 'unknown'


# ---------------------------------------------------------------- one sync per account

def claim_sync(client_id, task):
    """Record `task` as the account's one sync, unless another is queued or running.

    Returns (True, None), or (False, (holder task id, its state)). The record
    is written inside the claim's transaction, so a second request can never
    see a claim without its task.
    """
    with models.locked(models.EmailClient, client_id) as client:
        holder = Record.get_or_none(Record.id == client.sync_task_id) if client.sync_task_id else None
        if holder is not None and holder.state in ACTIVE_STATES:
            return False, (holder.id, holder.state)
        record(task)
        models.EmailClient.update(sync_task_id=task.id).where(models.EmailClient.id == client_id).execute()
        return True, None


def release_sync(client_id, task_id):
    """Undo a claim whose task never reached the broker."""
    with models.all_tenants():
        delete(task_id)
        models.EmailClient.update(sync_task_id=None).where(models.EmailClient.id == client_id,
                                                           models.EmailClient.sync_task_id == task_id).execute()


# ---------------------------------------------------------------- recovery's reads

def running_workers():
    """The workers that have running records, by name."""
    return {row[0] for row in Record.select(Record.worker).where(Record.state == RUNNING).distinct().tuples()}


def running_under(worker):
    """The running records of `worker`."""
    return list(Record.select().where(Record.state == RUNNING, Record.worker == worker))


def stale_waiting(cutoff, count=False):
    """Pending records queued before `cutoff`, and retries due before it: each should be in the broker."""
    query = Record.select().where(((Record.state == PENDING) & (Record.enqueued_at < cutoff)) |
                                  ((Record.state == RETRYING) & (Record.next_retry_at < cutoff)))
    return query.count() if count else list(query)
