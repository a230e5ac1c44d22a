"""Queue benchmark: emailsvc's Huey + ledger on both backends against Celery 5.

For each backend (embedded: SqliteHuey + SQLite; scale-out: PriorityRedisHuey
+ PostgreSQL, both started here on loopback) a child process runs the real
consumer (`huey_consumer tasks.huey -k process`: every lane with its 2 workers;
the no-op task runs in the periodic lane, so 2 workers run the tasks, as in
Celery's concurrency 2) and a web server, and measures:

- throughput end to end: N no-op tasks, from just before the first enqueue
  (ledger row + broker, as the API does it) until the last of them finished,
  by the ledger's finished_at (the worker's clock: the same host);
- idle enqueue-to-start latency: one task at a time on an idle consumer, from
  just before the enqueue to the ledger's started_at; p50/p99 over short
  idle gaps, plus the first task after a long idle period;
- memory: PSS of the web process plus the consumer tree (main, scheduler,
  every lane's workers), so pages shared between forked processes are counted once;
- throughput again with 3 consumers on this machine instead of 1 (one host
  scaled out: the same queue, 3x the workers, the same 2 cores).

The same run measures Celery 5 + Redis (acks_late, prefetch 1, concurrency 2;
bench/celery_baseline.py) and prints our figures as ratios to it.

    ./run.sh bench queue_bench [--n 10000] [--samples 200] [--idle 60]

Other engineers share this machine's 2 cores: run it twice and compare.
"""
import argparse
import datetime
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import services  # noqa: E402

DEADLINE = 600  # seconds any one wait may take


def wait_until(condition, timeout, what, every=0.005):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f'timed out waiting for {what}')
        time.sleep(every)


# ---------------------------------------------------------------- child: one backend

def pss_kb(pid):
    try:
        for line in open(f'/proc/{pid}/smaps_rollup'):
            if line.startswith('Pss:'):
                return int(line.split()[1])
    except FileNotFoundError:
        return 0
    return 0


def process_tree(pid):
    children = subprocess.run(['pgrep', '-P', str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [p for child in children for p in process_tree(int(child))]


def start_consumer(workdir, env, number):
    return subprocess.Popen([sys.executable, '-m', 'huey.bin.huey_consumer', 'tasks.huey', '-k', 'process', '-q'],
                            cwd=ROOT, env=env, stdout=open(workdir / f'consumer-{number}.log', 'wb'),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_workers(models, consumers, workers):
    pids = [c.pid for c in consumers]
    wait_until(lambda: models.ConsumerHeartbeat.select().where(
        models.ConsumerHeartbeat.consumer_pid.in_(pids)).count() == workers * len(pids), 60, 'consumer workers')


def stop(procs):
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    for proc in procs:
        proc.wait(60)


def run_backend(args):
    import models
    import tasks
    models.migrate()
    workdir = pathlib.Path(os.environ['EMAILSVC_VAR'])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    workers = sum(tasks.huey.lane_workers.values())
    consumer = start_consumer(workdir, env, 1)
    port = services.free_port()
    web = subprocess.Popen([sys.executable, 'emailsvc.py', 'web'], cwd=ROOT,
                           env=dict(env, EMAILSVC_SERVER_PORT=str(port), EMAILSVC_LOG_LEVEL='WARNING'),
                           stdout=open(workdir / 'web.log', 'wb'), stderr=subprocess.STDOUT)
    more = []
    try:
        wait_for_workers(models, [consumer], workers)
        rate, enqueue_s = throughput(tasks, models, args.n)
        result = {'throughput': rate, 'enqueue_s': enqueue_s, 'workers': workers}
        result.update(latency(tasks, models, args.samples, args.idle))
        result['pss_mb'] = sum(pss_kb(p) for p in process_tree(consumer.pid) + [web.pid]) / 1024
        result['processes'] = len(process_tree(consumer.pid)) + 1
        more = [start_consumer(workdir, env, number) for number in (2, 3)]
        wait_for_workers(models, [consumer] + more, workers)
        result['throughput_3'] = throughput(tasks, models, args.n)[0]
    finally:
        stop([consumer, web] + more)
    print(json.dumps(result))


def succeeded_count(models, since):
    with models.all_tenants():
        return models.TaskRecord.select().where(models.TaskRecord.state == 'succeeded',
                                                models.TaskRecord.enqueued_at >= since).count()


def finished(models, task_id):
    with models.all_tenants():
        return models.TaskRecord.get_by_id(task_id).finished_at is not None


def last_finish(models, since):
    """When the last of the tasks enqueued since `since` finished, by the ledger (epoch seconds)."""
    with models.all_tenants():
        row = (models.TaskRecord.select(models.TaskRecord.finished_at)
               .where(models.TaskRecord.enqueued_at >= since).order_by(models.TaskRecord.finished_at.desc()).get())
    return row.finished_at.replace(tzinfo=datetime.timezone.utc).timestamp()


def throughput(tasks, models, n):
    """Tasks/s from just before the first enqueue to the last task's finish as the ledger stamped it.

    Like Celery's run, whose last task reports its own finishing time: waiting costs
    the 2 cores next to nothing (one lookup by id every 5 ms until the last task
    enqueued is done, then a count every 50 ms), where counting every 5 ms took
    CPU from the workers it was timing."""
    since = models.utcnow()
    start = time.time()
    for _ in range(n):
        last = tasks.noop()
    enqueued = time.time() - start
    wait_until(lambda: finished(models, last.id), DEADLINE, 'the last task enqueued to finish')
    wait_until(lambda: succeeded_count(models, since) >= n, DEADLINE, f'{n} tasks to succeed', every=0.05)
    return n / (last_finish(models, since) - start), enqueued


def started_latency_ms(tasks, models):
    sent = time.time()
    task = tasks.noop()

    def started():
        with models.all_tenants():
            row = models.TaskRecord.get_by_id(task.id)
        return row.started_at
    wait_until(started, 30, 'a task to start')
    with models.all_tenants():
        started_at = models.TaskRecord.get_by_id(task.id).started_at
    return (started_at.replace(tzinfo=datetime.timezone.utc).timestamp() - sent) * 1000


def latency(tasks, models, samples, idle):
    wait_until(lambda: tasks.huey.pending_count() == 0, DEADLINE, 'the queue to drain')
    values = []
    for i in range(samples):
        time.sleep(0.02 + (i % 5) * 0.02)  # 20-100 ms idle between samples: the worker waits, not polls
        values.append(started_latency_ms(tasks, models))
    time.sleep(idle)
    after_idle = started_latency_ms(tasks, models)
    values.sort()
    return {'latency_p50_ms': statistics.median(values),
            'latency_p99_ms': values[min(len(values) - 1, int(len(values) * 0.99))],
            'after_idle_ms': after_idle, 'idle_s': idle}


# ---------------------------------------------------------------- parent: every backend and Celery

def backend_env(name, workdir, redis, postgres):
    secret = os.urandom(24).hex()
    from cryptography.fernet import Fernet
    env = {k: v for k, v in os.environ.items() if not k.startswith('EMAILSVC_')}
    env.update(EMAILSVC_VAR=str(workdir / name), EMAILSVC_SERVER_SECRET=secret, EMAILSVC_LOG_LEVEL='WARNING',
               EMAILSVC_CONFIG=str(workdir / 'absent.ini'),
               EMAILSVC_SECURITY_CREDENTIAL_KEYS=Fernet.generate_key().decode())
    if name == 'embedded':
        env.update(EMAILSVC_DATABASE_URL=f'sqlite:///{workdir}/{name}/emailsvc.db',
                   EMAILSVC_QUEUE_URL=f'sqlite:///{workdir}/{name}/queue.db')
    else:
        env.update(EMAILSVC_DATABASE_URL=postgres.create_database('bench'), EMAILSVC_QUEUE_URL=redis.url)
    (workdir / name).mkdir(parents=True, exist_ok=True)
    return env


def measure_backend(name, workdir, redis, postgres, args):
    cmd = [sys.executable, __file__, '--child', '--n', str(args.n), '--samples', str(args.samples),
           '--idle', str(args.idle)]
    out = subprocess.run(cmd, env=backend_env(name, workdir, redis, postgres), cwd=ROOT,
                         capture_output=True, text=True, timeout=DEADLINE + 4 * args.idle)
    if out.returncode:
        raise RuntimeError(f'{name} benchmark failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--n', type=int, default=10000, help='tasks in the throughput run')
    parser.add_argument('--samples', type=int, default=200, help='latency samples')
    parser.add_argument('--idle', type=float, default=60, help='seconds idle before the last latency sample')
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_backend(args)

    from bench.celery_baseline import run_celery_baseline
    workdir = pathlib.Path(tempfile.mkdtemp(prefix='queue-bench-'))
    redis, postgres = services.start_redis(workdir / 'redis'), services.start_postgres(workdir / 'postgres')
    try:
        results = {name: measure_backend(name, workdir, redis, postgres, args) for name in ('embedded', 'scaleout')}
        celery = run_celery_baseline(redis.url, n_tasks=args.n, latency_samples=args.samples, workdir=workdir)
    finally:
        redis.stop()
        postgres.stop()
    report(results, celery, args)


def report(results, celery, args):
    print(f'queue benchmark: {args.n} no-op tasks (their lane has 2 process workers), ledger included')
    print(f'  {"":34} {"tasks/s":>9} {"vs Celery":>10} {"p50 ms":>8} {"p99 ms":>8} '
          f'{"after idle":>11} {"PSS MB":>8} {"3 consumers":>12}')
    for name, label in (('scaleout', 'emailsvc Redis + PostgreSQL'), ('embedded', 'emailsvc SQLite (embedded)')):
        r = results[name]
        print(f'  {label:34} {r["throughput"]:9.0f} {r["throughput"] / celery["throughput_e2e"]:9.2f}x '
              f'{r["latency_p50_ms"]:8.2f} {r["latency_p99_ms"]:8.2f} {r["after_idle_ms"]:9.2f}ms '
              f'{r["pss_mb"]:8.1f} {r["throughput_3"]:8.0f}/s')
    print(f'  {"Celery 5 + Redis (acks_late, pf 1)":34} {celery["throughput_e2e"]:9.0f} {1:9.2f}x '
          f'{celery["latency_p50_ms"]:8.2f} {celery["latency_p99_ms"]:8.2f} {"":>11} {celery["pss_mb"]:8.1f}')
    print(f'  (Celery drain of a pre-filled queue, producer idle: {celery["throughput"]:.0f} tasks/s; the ratios '
          'compare like with like: enqueue and run together, from the first enqueue to the last completion)')
    print(f'  (after idle: the first task after {args.idle:.0f} s of idleness; PSS: web + consumer tree for '
          f'emailsvc ({results["scaleout"]["workers"]} workers: every lane\'s), the worker tree for Celery; '
          '3 consumers: the same run with 3 consumers on this machine)')
    redis_pg, embedded = results['scaleout'], results['embedded']
    celery_rate = celery['throughput_e2e']
    for target, ok in (('Redis+PG >= 2.0x Celery', redis_pg['throughput'] / celery_rate >= 2.0),
                       ('embedded >= 3.5x Celery', embedded['throughput'] / celery_rate >= 3.5),
                       ('p99 <= 3 ms Redis+PG', redis_pg['latency_p99_ms'] <= 3),
                       ('p99 <= 10 ms embedded', embedded['latency_p99_ms'] <= 10),
                       ('PSS <= 150 MB', max(redis_pg['pss_mb'], embedded['pss_mb']) <= 150),
                       ('3 consumers >= 1 consumer Redis+PG', redis_pg['throughput_3'] >= redis_pg['throughput']),
                       ('3 consumers >= 1 consumer embedded', embedded['throughput_3'] >= embedded['throughput'])):
        print(f'{target} {"met" if ok else "NOT MET"}')


if __name__ == '__main__':
    main()
