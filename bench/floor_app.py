"""Stock Huey with nothing of emailsvc but, optionally, the ledger's three writes per task: the app
bench/ledger_floor_bench.py runs under `huey_consumer floor_app.huey`.

What a task costs any design that keeps emailsvc's ledger contract, written
as plainly as it can be: the record's INSERT before the enqueue returns (a 202
means the task is on record), the claim's compare-and-set before the run (one
run owns the record, under a worker whose lease row exists) and the final
write after it, each a statement of its own on the service's real schema,
built by taskq/ledger.py's own builders. No signed payloads, lanes, tenant
turns, doorbell, lease renewal, or revoke marks.

Environment: FLOOR_QUEUE (a SQLite file, or a redis:// URL), FLOOR_LEDGER (a
SQLite file, a postgresql:// URL, or empty for no ledger), FLOOR_DONE (a file
the last task writes its finishing time into).
"""
import datetime
import os
import pathlib
import sqlite3
import sys
import time

from huey import PriorityRedisHuey, SqliteHuey
from huey import signals as S

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from taskq import ledger as service_ledger  # noqa: E402  the service's statements, as it builds them
from taskq.storage import WriteTurns  # noqa: E402  the service's own turns among a SQLite file's writers

QUEUE, LEDGER, DONE = os.environ['FLOOR_QUEUE'], os.environ.get('FLOOR_LEDGER', ''), os.environ['FLOOR_DONE']
WORKER = 'floor-worker'

if QUEUE.startswith('redis://'):
    huey = PriorityRedisHuey('floor', url=QUEUE, blocking=True)
else:
    # fsync=False is synchronous=OFF, a step lighter than the service's NORMAL: the floor is generous
    huey = SqliteHuey('floor', filename=QUEUE, fsync=False)

LEASE = ('INSERT INTO "consumer_heartbeat" ("id", "host", "pid", "consumer_pid", "started_at", "last_seen", '
         '"tasks_done") VALUES ({p}, {p}, {p}, {p}, {p}, {p}, 0)')
CLAIM_COLUMNS = ('started_at', 'retries_left', 'next_retry_at', 'finished_at')   # as ledger.claim sets them
FINAL_COLUMNS = ('state', 'finished_at', 'result', 'error', 'traceback')         # as a success's final write


def statements(param):
    """(INSERT, claim, final write, lease row) in the database's parameter style."""
    return (service_ledger._insert_sql(param, service_ledger.RECORD_COLUMNS),
            service_ledger._claim_sql(param, CLAIM_COLUMNS),
            service_ledger._update_sql(param, FINAL_COLUMNS, (), 1, ('worker',)),
            LEASE.format(p=param))


class SqliteLedger:
    param = '?'

    def __init__(self, path):
        self.path, self.turns, self.connections = path, WriteTurns(path), {}

    def write(self, sql, params):
        connection = self.connections.get(os.getpid())   # one per process: the workers are forked
        if connection is None:
            connection = self.connections[os.getpid()] = sqlite3.connect(self.path, isolation_level=None,
                                                                         check_same_thread=False, timeout=5)
            connection.execute('pragma journal_mode=wal')
            connection.execute('pragma synchronous=NORMAL')
        with self.turns.turn():
            return connection.execute(sql, params).rowcount


class PostgresLedger:
    param = '%s'

    def __init__(self, url):
        self.url, self.connections = url, {}

    def write(self, sql, params):
        import psycopg2
        key = os.getpid()
        if key not in self.connections:
            connection = psycopg2.connect(self.url)
            connection.autocommit = True
            self.connections[key] = (connection, set())
        connection, prepared = self.connections[key]
        name, prepare, run = service_ledger._prepared_form(sql)
        with connection.cursor() as cursor:
            if name not in prepared:   # prepared once per connection, as taskq.ledger.execute does
                cursor.execute(prepare)
                prepared.add(name)
            cursor.execute(run, params)
            return cursor.rowcount


ledger = (PostgresLedger(LEDGER) if LEDGER.startswith('postgresql://') else
          SqliteLedger(LEDGER) if LEDGER else None)
INSERT, CLAIM, FINAL, LEASE_ROW = statements(ledger.param) if ledger is not None else (None,) * 4


def now():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


@huey.task()
def noop(last=False):
    if last:
        pathlib.Path(DONE).write_text(repr(time.time()))


def enqueue(last=False):
    task = noop.s(last)
    if ledger is not None:
        ledger.write(INSERT, (task.id, 'pending', 'noop', 0, 0, None, None, None,
                                   '{"tenant_id": null, "user_id": null}', 0, now()))
    huey.enqueue(task)


def register_lease():
    """The lease row the claim requires (the service's worker registers one at its start)."""
    ledger.write(LEASE_ROW, (WORKER, 'floor', os.getpid(), os.getpid(), now(), now()))


if ledger is not None:
    @huey.pre_execute()
    def claim(task):
        if ledger.write(CLAIM, (now(), 0, None, None, WORKER, task.id, 'pending', 'retrying', WORKER)) != 1:
            raise RuntimeError(f'floor: the claim of {task.id} was not made')

    @huey.signal(S.SIGNAL_COMPLETE)
    def final(signal_name, task):
        if ledger.write(FINAL, ('succeeded', now(), None, None, None, task.id, 'running', WORKER)) != 1:
            raise RuntimeError(f'floor: the final write of {task.id} was not made')
