"""Dashboard server time at 10,000 and 1,000,000 ledger records, in both modes (issue 11's targets).

Targets: the overview and the tasks page under 200 ms, one task's detail under 20 ms, each live-update
fragment under 30 ms, a /metrics scrape under 50 ms; and each figure at 1,000,000 records within 1.5x of
the same figure at 10,000 (cost must not grow with history).

How it measures: in-process, through the WSGI app the web process serves (`emailsvc.app`, with the
dashboard mounted at /dashboard), without HTTP and without waitress. The dashboard requests carry the
session cookie of a real sign-in (POST /dashboard/login through the same app, with an operator key);
/metrics carries the operator key. Each figure is the median of --samples calls after two warm-up
calls; p90 beside it. The deep page is the filtered list's deepest full page (its cursor has 50 older
records after it: about 15,000 records deep at 1,000,000). The overview's very first call after loading,
which rolls up the last day's closed minutes into TaskRollup once (TaskRollup is emptied before each
size), is printed on its own. A web process reads TaskRollup once a minute (dashboard.rolled_counts), so
the overview's median is of calls within a minute; that minute's first call costs about its figure plus
the reading (5-15 ms at 1,000,000 records).

What is loaded: task records bulk-inserted straight into the ledger (executemany / execute_values in
chunks of 1,000 inside one transaction; not through the API), 20 tenants of 5 users each, every task
name, final states (succeeded, failed, dead, revoked): LAST_DAY of them in the last day at every size
and the rest over the 29 days before it (history grows with the size, the recent throughput does not:
what is measured is cost against history, and a busier last day fills the per-minute roll-ups and
/metrics' live window at any ledger size),
errors and tracebacks on failures, a history line on one in ten, account ids in the arguments; plus a
backlog that does not grow with history (pending, running with progress, retrying, all in the last
10 minutes) and 150 tasks finishing in the last minutes, so every live window has work. Four
heartbeating workers for the consumers page. PostgreSQL gets ANALYZE after loading, as autovacuum would
run it; SQLite gets nothing the service does not do itself.

Embedded mode (SQLite) and scale-out mode (PostgreSQL + Redis, started here on loopback by
tests/services.py) each run in a child process, since `tasks` and `models` read the environment at import.

    ./run.sh bench dashboard_bench [--sizes 10000,1000000] [--samples 20] [--modes embedded,scaleout]
"""
import argparse
import datetime
import json
import os
import pathlib
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS_MS = {'overview': 200, 'tasks': 200, 'tasks filtered': 200, 'tasks deep page': 200, 'detail': 20,
              'fragment overview': 30, 'fragment tasks': 30, 'fragment detail': 30, 'fragment consumers': 30,
              'metrics': 50}
GROWTH = 1.5
LAST_DAY = 3333  # finishes in the last day at every size: a third of the smallest
TENANTS, USERS_PER_TENANT = 20, 5
NAMES = ('sync_emails',) * 50 + ('send_email',) * 25 + ('check_spam',) * 15 + ('delete_emails',) * 5 + \
    ('periodic_sync',) * 5
FINAL = ('succeeded',) * 88 + ('failed',) * 6 + ('dead',) * 3 + ('revoked',) * 3
ERRORS = {'sync_emails': ('TemporaryMailError', 'cannot reach imap.example.net:993: timed out'),
          'send_email': ('PermanentMailError', 'smtp.example.net answered 550 \'5.1.1 user unknown\''),
          'check_spam': ('FailNow', 'message 4711 not found'),
          'delete_emails': ('TemporaryMailError', 'imap.example.net answered NO [UNAVAILABLE]'),
          'periodic_sync': ('OperationalError', 'could not connect to server')}
RESULTS = {'sync_emails': {'status': 'success', 'messages_synced': 12, 'messages_updated': 0, 'messages_deleted': 0},
           'send_email': {'status': 'success', 'message_id': '<x@example.net>'},
           'delete_emails': {'status': 'success', 'deleted_count': 2},
           'check_spam': {'status': 'success', 'is_spam': False, 'spam_score': 0.1},
           'periodic_sync': {'status': 'success', 'queued': 3}}


# ---------------------------------------------------------------- parent: both modes

def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', default='10000,1000000')
    parser.add_argument('--samples', type=int, default=20)
    parser.add_argument('--modes', default='embedded,scaleout')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_mode(args)

    from cryptography.fernet import Fernet
    from tests import services
    workdir = pathlib.Path(tempfile.mkdtemp(prefix='dashboard-bench-'))
    figures, servers = {}, []
    try:
        for mode in args.modes.split(','):
            env = {k: v for k, v in os.environ.items() if not k.startswith('EMAILSVC_')}
            env.update(EMAILSVC_VAR=str(workdir / mode), EMAILSVC_CONFIG=str(workdir / 'absent.ini'),
                       EMAILSVC_SERVER_SECRET='bench-' + uuid.uuid4().hex, EMAILSVC_LOG_LEVEL='WARNING',
                       EMAILSVC_SECURITY_CREDENTIAL_KEYS=Fernet.generate_key().decode())
            (workdir / mode).mkdir(parents=True)
            if mode == 'embedded':
                env.update(EMAILSVC_DATABASE_URL=f'sqlite:///{workdir}/{mode}/emailsvc.db',
                           EMAILSVC_QUEUE_URL=f'sqlite:///{workdir}/{mode}/queue.db')
            else:
                redis, postgres = services.start_redis(workdir / 'redis'), services.start_postgres(workdir / 'pg')
                servers += [redis, postgres]
                env.update(EMAILSVC_DATABASE_URL=postgres.create_database('dashboard_bench'),
                           EMAILSVC_QUEUE_URL=redis.url)
            print(f'== {mode} mode', flush=True)
            out = subprocess.run([sys.executable, __file__, '--child', mode, '--sizes', args.sizes,
                                  '--samples', str(args.samples)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                 text=True)
            lines = out.stdout.strip().splitlines()
            print('\n'.join(lines[:-1]), flush=True)
            if out.returncode:
                raise SystemExit(f'{mode} mode failed (exit {out.returncode}); see above')
            figures[mode] = {int(size): values for size, values in json.loads(lines[-1]).items()}
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # over a gigabyte per mode at 1,000,000 records
    verdicts(figures)


def verdicts(figures):
    """One line per target: its name, then `met` or `NOT MET`."""
    print('== targets')
    for mode, by_size in figures.items():
        small, large = min(by_size), max(by_size)
        for name, limit in TARGETS_MS.items():
            value = by_size[large][name]
            print(f'{mode} {name} under {limit} ms at {large:,} records ({value:.1f} ms) '
                  f'{"met" if value < limit else "NOT MET"}')
        for name in TARGETS_MS:
            ratio = by_size[large][name] / by_size[small][name]
            print(f'{mode} {name} at {large:,} within {GROWTH}x of {small:,} ({ratio:.2f}x) '
                  f'{"met" if ratio <= GROWTH else "NOT MET"}')


# ---------------------------------------------------------------- child: one mode

def run_mode(args):
    import models
    import tasks  # noqa: F401  (initialises the database from the environment)
    import dashboard
    import emailsvc
    models.migrate()
    postgres = not os.environ['EMAILSVC_DATABASE_URL'].startswith('sqlite')
    print(f'database {"PostgreSQL" if postgres else "SQLite"}, queue '
          f'{os.environ["EMAILSVC_QUEUE_URL"].split(":")[0]}; server time in-process through emailsvc.app (WSGI, '
          f'no HTTP); median of {args.samples} calls after 2 warm-up calls', flush=True)
    users = make_tenants(models)
    operator_key = models.ApiKey.issue(operator=True)[1]
    app = Wsgi(emailsvc.app)
    cookie = app.sign_in(operator_key)
    heartbeats(models)
    figures, loaded = {}, 0
    for size in [int(s) for s in args.sizes.split(',')]:
        backlog = 250  # pending, running, retrying and the tasks finishing now: the same at every depth
        seconds = load(models, users, size - loaded - backlog, seed=size, postgres=postgres)
        recent(models, users, seed=size, postgres=postgres)
        loaded = size
        if postgres:
            with models.database.connection_context():
                models.database.execute_sql('ANALYZE')
        with models.database.connection_context():
            with models.all_tenants():
                count = models.TaskRecord.select().count()
            # The records just loaded finished in minutes the previous size's overview already rolled up:
            # start the roll-up afresh, so the first overview rolls up this depth's last day.
            models.TaskRollup.delete().execute()
        dashboard._rolled = (None, {})  # and forget this process's reading of it, as a new web process would
        print(f'-- {count:,} records (loaded in {seconds:.1f} s)', flush=True)
        figures[size] = measure(models, app, cookie, operator_key, args.samples)
    print(json.dumps(figures))


class Wsgi:
    """Calls the WSGI app in-process: (status, headers, body) per request, and its server time."""

    def __init__(self, app):
        self.app = app

    def call(self, method, path, headers=(), body=b''):
        path, _, query = path.partition('?')
        environ = {'REQUEST_METHOD': method, 'PATH_INFO': path, 'QUERY_STRING': query, 'SERVER_NAME': 'bench',
                   'SERVER_PORT': '80', 'SERVER_PROTOCOL': 'HTTP/1.1', 'REMOTE_ADDR': '127.0.0.1',
                   'wsgi.url_scheme': 'http', 'wsgi.input': __import__('io').BytesIO(body),
                   'wsgi.errors': sys.stderr, 'wsgi.multithread': True, 'wsgi.multiprocess': False,
                   'wsgi.run_once': False, 'wsgi.version': (1, 0), 'CONTENT_LENGTH': str(len(body)),
                   'HTTP_HOST': 'bench'}
        for name, value in headers:
            key = name.upper().replace('-', '_')
            environ[key if key == 'CONTENT_TYPE' else 'HTTP_' + key] = value
        answer = {}
        started = time.perf_counter()
        chunks = self.app(environ, lambda status, hdrs, exc_info=None: answer.update(status=status, headers=hdrs))
        data = b''.join(chunks)
        if hasattr(chunks, 'close'):
            chunks.close()
        elapsed = (time.perf_counter() - started) * 1000
        return int(answer['status'].split()[0]), dict(answer['headers']), data, elapsed

    def sign_in(self, key):
        status, headers, _, _ = self.call('POST', '/dashboard/login', [('Content-Type',
                                          'application/x-www-form-urlencoded')],
                                          urllib.parse.urlencode({'key': key}).encode())
        assert status == 303, status
        return headers['Set-Cookie'].split(';')[0]


def measure(models, app, cookie, operator_key, samples):
    """{figure name: median ms} for this depth; prints each figure."""
    with models.database.connection_context():
        with models.all_tenants():
            T = models.TaskRecord
            detail = (T.select(T.id).where(T.state == 'failed', T.history.is_null(False))
                      .order_by(T.enqueued_at.desc()).first()).id
            # The deepest full page of the filtered list: its cursor has 50 older records after it.
            deep = (T.select(T.id).where(T.state == 'failed', T.name == 'send_email')
                    .order_by(T.enqueued_at, T.id).offset(50).first()).id
    filtered = 'state=failed&name=send_email'
    tenant_filtered = 'state=succeeded&tenant=7'
    pages = {
        'overview': '/dashboard/',
        'tasks': '/dashboard/tasks',
        'tasks filtered': f'/dashboard/tasks?{filtered}',
        'tasks deep page': f'/dashboard/tasks?{filtered}&cursor={deep}',
        'tasks tenant filter': f'/dashboard/tasks?{tenant_filtered}',
        'tasks text filter': '/dashboard/tasks?state=failed&q=user+unknown',
        'detail': f'/dashboard/tasks/{detail}',
        'consumers': '/dashboard/consumers',
        'fragment overview': '/dashboard/fragment/overview',
        'fragment tasks': f'/dashboard/fragment/tasks?{filtered}',
        'fragment detail': f'/dashboard/fragment/tasks/{detail}',
        'fragment consumers': '/dashboard/fragment/consumers',
        'metrics': '/metrics',
    }
    figures = {}
    for name, path in pages.items():
        headers = [('Authorization', f'Bearer {operator_key}')] if name == 'metrics' else [('Cookie', cookie)]
        times = []
        for i in range(samples + 2):
            status, _, body, elapsed = app.call('GET', path, headers)
            assert status == 200, (name, status, body[:500])
            if name == 'overview' and i == 0:
                print(f'   {"overview, first call":24} {elapsed:8.1f} ms  (rolls up the last day into TaskRollup)')
            if i >= 2:
                times.append(elapsed)
        times.sort()
        figures[name] = statistics.median(times)
        limit = TARGETS_MS.get(name)
        print(f'   {name:24} {figures[name]:8.1f} ms  p90 {times[int(len(times) * 0.9) - 1]:7.1f} ms  '
              f'{len(body):>7,} bytes{f"  (target < {limit} ms)" if limit else ""}', flush=True)
    return figures


def make_tenants(models):
    """20 tenants of 5 users: [(tenant_id, user_id)]."""
    users = []
    for t in range(TENANTS):
        tenant = models.Tenant.create(name=f'bench-tenant-{t + 1}')
        with models.tenant_scope(tenant.id):
            users += [(tenant.id, models.User.create(name=f'user{u + 1}').id) for u in range(USERS_PER_TENANT)]
    return users


def heartbeats(models):
    now = models.utcnow()
    for consumer in (1000, 2000):
        for worker in (1, 2):
            models.ConsumerHeartbeat.create(id=f'bench-host:{consumer + worker}', host='bench-host',
                                            pid=consumer + worker, consumer_pid=consumer, started_at=now,
                                            last_seen=now + datetime.timedelta(days=1), tasks_done=1234)


def task_row(users, rand, now, age, state, name=None):
    tenant_id, user_id = rand.choice(users)
    name = name or rand.choice(NAMES)
    enqueued = now - datetime.timedelta(seconds=age)
    started = None if state == 'pending' else enqueued + datetime.timedelta(seconds=rand.random() * 2)
    finished = started + datetime.timedelta(seconds=0.05 + rand.random() * 5) \
        if state in ('succeeded', 'failed', 'dead', 'revoked') else None
    failed = state in ('failed', 'dead', 'retrying')
    error = traceback = history = None
    if failed:
        kind, text = ERRORS[name]
        error = f'{kind}: {text}'
        traceback = f'Traceback (most recent call last):\n  File "tasks.py", line 162, in {name}\n{error}\n'
    if failed or rand.random() < 0.1:
        history = json.dumps({'kind': 'attempt', 'at': enqueued.isoformat() + 'Z', 'ended': enqueued.isoformat() + 'Z',
                              'worker': 'bench-host:1001', 'error': error or 'TemporaryMailError: timed out'}) + '\n'
    args = {'tenant_id': tenant_id, 'user_id': user_id}
    if name != 'periodic_sync':
        args = {'email_client_id': rand.randint(1, 400), **args}
    if name == 'send_email':
        args.update(to=['someone@example.net'], subject='Quarterly figures')
    return {'id': uuid.uuid4().hex, 'tenant_id': None if name == 'periodic_sync' else tenant_id,
            'user_id': None if name == 'periodic_sync' else user_id, 'name': name, 'state': state, 'priority': 5,
            'attempts': 1 + (state == 'dead') * 3 + (state == 'retrying'), 'retries_left': 0 if state != 'retrying' else 2,
            'enqueued_at': enqueued, 'started_at': started, 'finished_at': finished,
            'worker': None if state == 'pending' else 'bench-host:1001',
            'progress_done': 150 if state == 'running' else None, 'progress_total': 400 if state == 'running' else None,
            'result': json.dumps(RESULTS[name]) if state == 'succeeded' else None, 'error': error,
            'traceback': traceback, 'request_id': uuid.uuid4().hex[:16], 'args': json.dumps(args),
            'history': history}


def load(models, users, count, seed, postgres):
    """`count` finished records: LAST_DAY in the last day, the rest in the 29 days before. Returns the seconds."""
    rand = random.Random(seed)
    now = models.utcnow()
    started = time.perf_counter()
    rows = []
    with models.database.connection_context():
        with models.database.atomic():
            for number in range(count):
                age = rand.random() * 86400 if number < LAST_DAY else 86400 + rand.random() * 29 * 86400
                rows.append(task_row(users, rand, now, age, rand.choice(FINAL)))
                if len(rows) == 1000:
                    insert(models, rows, postgres)
                    rows = []
            if rows:
                insert(models, rows, postgres)
    return time.perf_counter() - started


def recent(models, users, seed, postgres):
    """The backlog and the tasks finishing now: 50 pending, 20 running, 30 retrying, 150 finished."""
    rand = random.Random(seed + 1)
    now = models.utcnow()
    rows = [task_row(users, rand, now, rand.random() * 600, state)
            for state in ('pending',) * 50 + ('running',) * 20 + ('retrying',) * 30]
    rows += [task_row(users, rand, now, 10 + rand.random() * 240, rand.choice(FINAL)) for _ in range(150)]
    with models.database.connection_context():
        with models.database.atomic():
            insert(models, rows, postgres)


def insert(models, rows, postgres):
    columns = list(rows[0])
    fields = models.TaskRecord._meta.fields
    values = [tuple(fields[c].db_value(r[c]) if c not in ('result', 'args') else r[c] for c in columns) for r in rows]
    cursor = models.database.cursor()
    if postgres:
        from psycopg2.extras import execute_values  # one statement per chunk; executemany is a round trip per row
        execute_values(cursor, f'INSERT INTO task_record ({", ".join(columns)}) VALUES %s', values, page_size=1000)
    else:
        cursor.executemany(f'INSERT INTO task_record ({", ".join(columns)}) VALUES '
                           f'({", ".join([models.database.param] * len(columns))})', values)


if __name__ == '__main__':
    main()
