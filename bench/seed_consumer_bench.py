"""Seed consumer benchmark: the deployment's consumer drains as fast with the seed's settings as with the leanest.

`./run.sh` and `./run.sh consumer` run emailsvc.py consumer with config.ini's
seed settings: a worker is replaced after consumer.max_tasks_per_worker tasks
(1000), and the log level is INFO. Both once cost throughput the queue
benchmark never saw (its consumers are huey_consumer without -M, logging at
WARNING): a recycled worker's lane ran a worker short until the consumer's
next health check (1 s), and Huey logged two JSON lines per task at INFO.

For each backend (embedded: SQLite; scale-out: Redis + PostgreSQL, started
here on loopback) this queues N no-op tasks with no consumer running, then
starts `emailsvc.py consumer --lanes <the no-op task's lane>` with 2 workers
and times the drain by the ledger: from the first task's start to the last
one's finish (the consumer's start-up is not counted). Each round drains once
with the seed's settings and once with the leanest (recycling off, WARNING),
the order alternating by round; the verdict is the median of the per-round
ratios.

Measured before the changes this benchmark came with, with recycling alone
(log level WARNING on both sides): embedded 0.62x, Redis+PG 0.74x; and the
log level alone (a drain, recycling off, embedded): INFO 3,024-3,524 tasks/s
against 3,671-4,006 at WARNING. Then the seed's settings ran at 0.80-0.90x:
a recycled worker's successor took the next task 30-120 ms after its last (up
to one 0.1 s turn of the consumer's loop, which now ends at a worker's exit,
and ~25 ms of fork and start); now 17-29 ms. A no-op flood ends each worker
every ~0.7 s; real tasks recycle minutes apart.

    ./run.sh bench seed_consumer_bench [--n 10000] [--rounds 3]
"""
import argparse
import os
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.queue_bench import DEADLINE, backend_env, start_consumer, stop, wait_until  # noqa: E402
from tests import services  # noqa: E402

TARGET = 0.9   # drain with the seed's settings / with the leanest
SEED = {}      # config.ini as shipped
LEAN = {'EMAILSVC_CONSUMER_MAX_TASKS_PER_WORKER': '0', 'EMAILSVC_LOG_LEVEL': 'WARNING'}


def drain(tasks, models, workdir, env, lane, n, settings):
    """Tasks/s of a fresh 2-worker consumer of `lane` with these settings draining n queued no-op tasks."""
    since = models.utcnow()
    ids = [tasks.noop().id for _ in range(n)]
    env = dict(env, **{f'EMAILSVC_LANES_{lane.upper()}': '2'}, **settings)
    consumer = start_consumer(workdir, env, 'seed' if settings is SEED else 'lean', lanes=lane)
    record = models.TaskRecord
    try:
        with models.all_tenants():
            ours = record.select().where(record.name == 'noop', record.enqueued_at >= since)
            wait_until(lambda: record.get_by_id(ids[-1]).finished_at is not None, DEADLINE, 'the last task')
            wait_until(lambda: ours.where(record.state == 'succeeded').count() >= n, DEADLINE,
                       f'{n} tasks to succeed', every=0.05)
            first = ours.order_by(record.started_at).get().started_at
            last = ours.order_by(record.finished_at.desc()).get().finished_at
    finally:
        stop([consumer])
    return n / (last - first).total_seconds()


def run_child(n, rounds):
    """In a backend's environment: `rounds` pairs of drains; prints one line of rates per round."""
    import models
    import tasks
    models.migrate()
    workdir = pathlib.Path(os.environ['EMAILSVC_VAR'])
    # config.ini's values, not the benchmark environment's WARNING
    env = {k: v for k, v in os.environ.items() if k != 'EMAILSVC_LOG_LEVEL'}
    env['PYTHONPATH'] = str(ROOT)
    lane = tasks.huey.service_tasks['noop'].task_class.lane
    for number in range(rounds):
        order = (SEED, LEAN) if number % 2 == 0 else (LEAN, SEED)
        rates = [drain(tasks, models, workdir, env, lane, n, settings) for settings in order]
        seed, lean = rates if order[0] is SEED else rates[::-1]
        print(f'{seed:.1f} {lean:.1f}', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--n', type=int, default=10000, help='tasks in each drain')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args.n, args.rounds)
    if args.rounds < 1 or args.n < 1:
        parser.error('--rounds and --n must be at least 1')
    results = {}
    with services.benchmark_servers('seed_consumer_bench') as (workdir, redis, postgres):
        for name in ('embedded', 'scaleout'):
            out = subprocess.run([sys.executable, __file__, '--child', '--n', str(args.n), '--rounds', str(args.rounds)],
                                 cwd=ROOT, env=backend_env(name, workdir, redis, postgres), capture_output=True,
                                 text=True, timeout=4 * DEADLINE * args.rounds)
            if out.returncode:
                raise RuntimeError(f'{name} drains failed:\n{out.stderr[-3000:]}')
            results[name] = [tuple(float(x) for x in line.split()) for line in out.stdout.splitlines()]
    report(results, args)


def report(results, args):
    print(f'seed consumer benchmark: {args.n} queued no-op tasks drained by emailsvc.py consumer (2 workers), '
          f'{args.rounds} rounds; tasks/s, first start to last finish by the ledger')
    print('  seed: config.ini as shipped (a worker replaced every 1000 tasks, log level INFO); '
          'lean: recycling off, WARNING')
    print(f'  {"round":>5}  {"backend":10} {"seed":>8} {"lean":>8} {"ratio":>7}')
    verdicts = {}
    for name, label in (('embedded', 'embedded'), ('scaleout', 'Redis+PG')):
        ratios = [seed / lean for seed, lean in results[name]]
        for number, (seed, lean) in enumerate(results[name]):
            print(f'  {number + 1:>5}  {label:10} {seed:8.0f} {lean:8.0f} {ratios[number]:6.2f}x')
        verdicts[label] = statistics.median(ratios)
        print(f'  {"median":>5}  {label:10} {"":8} {"":8} {verdicts[label]:6.2f}x')
    for label, ratio in verdicts.items():
        print(f'{label} seed settings >= {TARGET}x the leanest {"met" if ratio >= TARGET else "NOT MET"}')


if __name__ == '__main__':
    main()
