"""Ledger floor benchmark: what stock Huey does end to end with and without the ledger's three writes
per task, against Celery 5, rounds interleaved in time.

bench/queue_bench.py holds emailsvc to 3.5x Celery embedded and 2.0x on Redis +
PostgreSQL. This bench measures the floor under those targets: the same no-op
flood (N tasks, from just before the first enqueue to the last one's finish, a
producer loop in this machine's 2 cores with a consumer of 2 worker processes)
on
- stock SqliteHuey, and stock SqliteHuey plus the ledger's writes in a SQLite
  file beside it (the embedded mode's shape), also with task_record's
  secondary indexes dropped (sqlite+ledger*: what they cost);
- stock PriorityRedisHuey, and stock PriorityRedisHuey plus the ledger's
  writes in PostgreSQL (the scale-out mode's shape);
where the ledger's writes are the record's INSERT before the enqueue returns,
the claim's compare-and-set before the run and the final write after it, one
statement each, on the service's own schema (models.migrate(): the table and
the indexes the task history, the dashboard and the metrics read), and nothing
else of the service (bench/floor_app.py). A design that keeps the ledger's
contract can beat this floor only by writing less per task, or in fewer round
trips (the service's Redis + PostgreSQL mode sends a run's final write with
the worker's next claim).

Each round runs Celery, the five stock-Huey runs and the service itself (queue_bench's
child processes: the seed consumer, 1 consumer), the order rotating; ratios are
against the same round's Celery, verdicts on their medians: does the floor
with the ledger reach each queue_bench target.

    ./run.sh bench ledger_floor_bench [--n 10000] [--rounds 3]
"""
import argparse
import json
import os
import pathlib
import sqlite3
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.queue_bench import Child  # noqa: E402
from tests import services  # noqa: E402

DEADLINE = 300   # seconds one floor run may take
WARM_TASKS = 200
SYSTEMS = ('celery', 'sqlite', 'sqlite+ledger', 'sqlite+ledger*', 'emailsvc SQLite', 'redis', 'redis+ledger',
           'emailsvc Redis')
SERVICE = {'emailsvc SQLite': ('embedded', 'sqlite+ledger'), 'emailsvc Redis': ('scaleout', 'redis+ledger')}
BARE = 'sqlite+ledger*'   # the ledger's table without the indexes the history, dashboard and metrics read
TARGETS = {'sqlite+ledger': ('embedded', 3.5), 'redis+ledger': ('Redis+PG', 2.0)}


# ---------------------------------------------------------------- child: one floor run

def run_floor(n):
    """In a child whose environment configures bench/floor_app.py: start its consumer, warm it up,
    time n tasks end to end; prints {"rate": tasks/s}."""
    sys.path.insert(0, str(ROOT / 'bench'))
    import floor_app
    done = pathlib.Path(os.environ['FLOOR_DONE'])
    if floor_app.ledger is not None:
        floor_app.register_lease()
    consumer = subprocess.Popen([sys.executable, '-m', 'huey.bin.huey_consumer', 'floor_app.huey', '-w', '2',
                                 '-k', 'process', '-d', '0.001', '-m', '0.01', '-q'],
                                cwd=ROOT / 'bench', stdout=subprocess.DEVNULL, stderr=open(f'{done}.log', 'ab'))
    try:
        rates = [flood(floor_app, done, count) for count in (WARM_TASKS, n)]
    finally:
        consumer.terminate()
        consumer.wait(30)
    print(json.dumps({'rate': rates[-1]}))


def flood(floor_app, done, n):
    done.unlink(missing_ok=True)
    start = time.time()
    for _ in range(n - 1):
        floor_app.enqueue()
    floor_app.enqueue(last=True)
    deadline = time.monotonic() + DEADLINE
    while not done.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f'the last of {n} tasks did not finish within {DEADLINE} s')
        time.sleep(0.005)
    time.sleep(0.01)   # the file is written; let its one write finish
    return n / (float(done.read_text()) - start)


# ---------------------------------------------------------------- parent

def ledger_schema(url, workdir):
    """Create the service's schema (models.migrate) in the database at url."""
    from cryptography.fernet import Fernet
    env = {k: v for k, v in os.environ.items() if not k.startswith('EMAILSVC_')}
    env.update(EMAILSVC_VAR=str(workdir), EMAILSVC_SERVER_SECRET=os.urandom(24).hex(),
               EMAILSVC_CONFIG=str(workdir / 'absent.ini'), EMAILSVC_LOG_LEVEL='WARNING',
               EMAILSVC_SECURITY_CREDENTIAL_KEYS=Fernet.generate_key().decode(), EMAILSVC_DATABASE_URL=url)
    subprocess.run([sys.executable, '-c', 'import tasks, models; models.migrate()'], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)


def drop_secondary_indexes(path):
    """Leave task_record its primary key only: what the history's filters, the dashboard's charts
    and the metrics' finished_at ranges cost each task."""
    connection = sqlite3.connect(path)
    names = [name for name, in connection.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'task_record' AND sql IS NOT NULL")]
    for name in names:
        connection.execute(f'DROP INDEX "{name}"')
    connection.commit()
    connection.close()


def floor_env(system, number, workdir, redis, postgres):
    """The environment of one floor run: a fresh queue and, with +ledger, a fresh ledger schema."""
    run = workdir / f'{system.replace("+", "-")}-{number}'
    run.mkdir()
    env = dict(os.environ, FLOOR_DONE=str(run / 'done'), FLOOR_LEDGER='', PYTHONPATH=str(ROOT))
    if system.startswith('redis'):
        env['FLOOR_QUEUE'] = redis.url
        import redis as redis_client
        with redis_client.Redis.from_url(redis.url) as client:
            client.flushdb()   # the last run's floor queue and results
    else:
        env['FLOOR_QUEUE'] = str(run / 'queue.db')
    if system in ('sqlite+ledger', BARE):
        env['FLOOR_LEDGER'] = str(run / 'emailsvc.db')
        ledger_schema(f'sqlite:///{env["FLOOR_LEDGER"]}', run)
        if system == BARE:
            drop_secondary_indexes(env['FLOOR_LEDGER'])
    elif system == 'redis+ledger':
        env['FLOOR_LEDGER'] = postgres.create_database(f'floor_{number}')
        ledger_schema(env['FLOOR_LEDGER'], run)
    return env


def run_system(system, number, workdir, redis, postgres, n, children):
    if system in SERVICE:
        return children[SERVICE[system][0]].ask('one', n=n)
    if system == 'celery':
        from bench.celery_baseline import run_celery_baseline
        return run_celery_baseline(redis.url, n_tasks=n, latency_samples=0, workdir=workdir,
                                   drain=False)['throughput_e2e']
    env = floor_env(system, number, workdir, redis, postgres)
    out = subprocess.run([sys.executable, __file__, '--child', '--n', str(n)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=2 * DEADLINE)
    if out.returncode != 0:
        raise RuntimeError(f'{system} floor run failed:\n{out.stderr[-2000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])['rate']


def report(rounds):
    print('throughput end to end (first enqueue to last finish), tasks/s, 2 worker processes:')
    print(f'  {"round":>5}  ' + ''.join(f'{s:>16}' for s in SYSTEMS))
    for number, figures in enumerate(rounds, 1):
        print(f'  {number:>5}  ' + ''.join(f'{figures[s]:>16.0f}' for s in SYSTEMS))
    print('the same as a multiple of the round\'s Celery (median of the rounds last):')
    medians = {}
    for system in SYSTEMS[1:]:
        ratios = [figures[system] / figures['celery'] for figures in rounds]
        medians[system] = statistics.median(ratios)
        print(f'  {system:<16}' + ''.join(f'{r:>8.2f}x' for r in ratios) + f'   median {medians[system]:.2f}x')
    print(f'  ({BARE}: task_record without its secondary indexes, which the task history, the dashboard and '
          'the metrics read)')
    for plain, with_ledger in (('sqlite', 'sqlite+ledger'), ('sqlite', BARE), ('redis', 'redis+ledger')):
        kept = statistics.median(figures[with_ledger] / figures[plain] for figures in rounds)
        print(f'  {with_ledger} keeps {kept:.0%} of {plain}\'s rate')
    for system, (_, floor) in SERVICE.items():
        share = statistics.median(figures[system] / figures[floor] for figures in rounds)
        print(f'  {system} (the service, seed consumer) runs at {share:.0%} of the {floor} floor')
    for system, (mode, target) in TARGETS.items():
        verdict = 'met' if medians[system] >= target else 'NOT MET'
        print(f'floor of {mode} >= {target}x Celery (stock Huey + the ledger\'s writes) {verdict}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--n', type=int, default=10000, help='tasks in each throughput run')
    parser.add_argument('--rounds', type=int, default=3, help='rounds, interleaved in time')
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n < 1 or args.rounds < 1:
        parser.error('--n and --rounds must be at least 1')
    if args.child:
        return run_floor(args.n)
    rounds, children = [], {}
    with services.benchmark_servers('ledger_floor_bench') as (workdir, redis, postgres):
        try:
            for mode in ('embedded', 'scaleout'):   # alive for the whole run, as in queue_bench
                children[mode] = Child(mode, workdir, redis, postgres, timeout=2 * DEADLINE)
            for number in range(args.rounds):
                order = SYSTEMS[number % len(SYSTEMS):] + SYSTEMS[:number % len(SYSTEMS)]
                rounds.append({system: run_system(system, number, workdir, redis, postgres, args.n, children)
                               for system in order})
        finally:
            for child in children.values():
                child.close()
    report(rounds)


if __name__ == '__main__':
    main()
