"""/metrics scrape time at 10,000 and 1,000,000 ledger records (target: under 50 ms, and cost not growing
with history: within 1.5x from 10,000 to 1,000,000).

Bulk-loads task records spread over 30 days (all states, 20 tenants, the last minutes busier, so the
live window and each roll-up have work), then times the collector in-process (what a scrape costs the
web process, without HTTP): the first scrape after loading, then the median of --samples scrapes.
Embedded mode by default; set EMAILSVC_DATABASE_URL / EMAILSVC_QUEUE_URL for PostgreSQL and Redis.

    .venv/bin/python bench/metrics_bench.py [--sizes 10000,1000000] [--samples 30]
"""
import argparse
import datetime
import json
import os
import pathlib
import random
import statistics
import sys
import tempfile
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--sizes', default='10000,1000000')
    parser.add_argument('--samples', type=int, default=30)
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix='metrics-bench-'))
    os.environ.setdefault('EMAILSVC_VAR', str(work))
    os.environ.setdefault('EMAILSVC_DATABASE_URL', f'sqlite:///{work}/emailsvc.db')
    os.environ.setdefault('EMAILSVC_QUEUE_URL', f'sqlite:///{work}/queue.db')
    os.environ.setdefault('EMAILSVC_SERVER_SECRET', 'bench-' + uuid.uuid4().hex)
    import prometheus_client

    import models
    import tasks
    from taskq import metrics
    models.migrate()
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(metrics.LedgerCollector(tasks.huey, tasks.SETTINGS))
    print(f'database {os.environ["EMAILSVC_DATABASE_URL"].split(":")[0]}, queue '
          f'{os.environ["EMAILSVC_QUEUE_URL"].split(":")[0]}')

    figures, loaded = {}, 0
    for size in [int(s) for s in args.sizes.split(',')]:
        load(models, size - loaded, start=loaded)
        loaded = size
        t0 = time.perf_counter()
        prometheus_client.generate_latest(registry)
        first = (time.perf_counter() - t0) * 1000
        # A fresh batch finishing "now", as a live service has, for the live window of each scrape.
        recent(models, 200)
        times = []
        for _ in range(args.samples):
            t0 = time.perf_counter()
            prometheus_client.generate_latest(registry)
            times.append((time.perf_counter() - t0) * 1000)
        figures[size] = statistics.median(times)
        print(f'{size:>9,} records: first scrape {first:.1f} ms, median {figures[size]:.1f} ms, '
              f'p90 {sorted(times)[int(len(times) * 0.9) - 1]:.1f} ms ({args.samples} scrapes)')
    largest, smallest = max(figures), min(figures)
    met = figures[largest] < 50
    print(f'scrape under 50 ms at {largest:,} records: {"met" if met else "NOT MET"}')
    ratio = figures[largest] / figures[smallest]
    print(f'{largest:,} vs {smallest:,} records within 1.5x ({ratio:.2f}x): {"met" if ratio <= 1.5 else "NOT MET"}')


NAMES = ('sync_emails', 'send_email', 'delete_emails', 'check_spam', 'periodic_sync', 'noop')
STATES = ('succeeded',) * 80 + ('failed',) * 6 + ('dead',) * 4 + ('revoked',) * 3 + ('pending',) * 3 + \
    ('running',) * 2 + ('retrying',) * 2
RESULTS = {'sync_emails': {'status': 'success', 'messages_synced': 12}, 'send_email': {'status': 'success'},
           'delete_emails': {'status': 'success', 'deleted_count': 2},
           'check_spam': {'status': 'success', 'is_spam': False, 'spam_score': 0.1}}


def row(models, now, age_seconds, rand):
    name = rand.choice(NAMES)
    state = rand.choice(STATES)
    enqueued = now - datetime.timedelta(seconds=age_seconds)
    started = enqueued + datetime.timedelta(seconds=rand.random() * 2) if state != 'pending' else None
    final = state in ('succeeded', 'failed', 'dead', 'revoked')
    finished = started + datetime.timedelta(seconds=rand.random() * 5) if final and started else None
    return {'id': uuid.uuid4().hex, 'tenant_id': rand.randint(1, 20), 'user_id': rand.randint(1, 100),
            'name': name, 'state': state, 'priority': 5, 'attempts': 1 + (state == 'dead') * 3,
            'retries_left': 0, 'enqueued_at': enqueued, 'started_at': started, 'finished_at': finished,
            'result': json.dumps(RESULTS.get(name)) if state == 'succeeded' and name in RESULTS else None,
            'args': '{}'}


def load(models, count, start):
    rand = random.Random(start)
    now = models.utcnow()
    T = models.TaskRecord
    t0 = time.perf_counter()
    with models.database.connection_context():
        batch = []
        for i in range(count):
            batch.append(row(models, now, rand.random() * 30 * 86400, rand))
            if len(batch) == 1000:
                insert(models, T, batch)
                batch = []
        if batch:
            insert(models, T, batch)
    print(f'loaded {count:,} records in {time.perf_counter() - t0:.1f} s')


def insert(models, T, batch):
    columns = list(batch[0])
    sql = (f'INSERT INTO task_record ({", ".join(columns)}) VALUES '
           f'({", ".join([models.database.param] * len(columns))})')
    values = [tuple(T._meta.fields[c].db_value(r[c]) if c not in ('result', 'args') else r[c] for c in columns)
              for r in batch]
    with models.database.atomic():
        models.database.cursor().executemany(sql, values)


def recent(models, count):
    rand = random.Random(count)
    now = models.utcnow()
    with models.database.connection_context():
        insert(models, models.TaskRecord, [row(models, now, rand.random() * 20, rand) for _ in range(count)])


if __name__ == '__main__':
    main()
