"""Recycle benchmark: the deployment's consumer drains as fast with its worker recycling as without.

`./run.sh consumer` (emailsvc.py consumer) replaces a worker after
consumer.max_tasks_per_worker tasks (seed: 1000, Huey's -M); the lane runs a
worker short from that worker's exit until the consumer's health check starts
another. For each backend (embedded: SQLite; scale-out: Redis + PostgreSQL,
started here on loopback) this queues N no-op tasks with no consumer running,
then starts `emailsvc.py consumer --lanes <the no-op task's lane>` with 2
workers and times the drain by the ledger: from the first task's start to the
last one's finish (the consumer's start-up is not counted). Each round drains
once with the seed's recycling and once with recycling off (0), the order
alternating by round; the verdict is the median of the per-round ratios.

Measured before the change this benchmark came with (a 1 s health check):
embedded 2,026-2,078 tasks/s with recycling against 2,957 without.

    ./run.sh bench recycle_bench [--n 10000] [--rounds 3]
"""
import argparse
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.queue_bench import DEADLINE, backend_env, start_consumer, stop, wait_until  # noqa: E402
from tests import services  # noqa: E402

TARGET = 0.9   # drain with recycling / without


def drain(tasks, models, workdir, env, lane, n, max_tasks):
    """Tasks/s of a fresh 2-worker consumer of `lane` draining n queued no-op tasks."""
    since = models.utcnow()
    ids = [tasks.noop().id for _ in range(n)]
    env = dict(env, **{f'EMAILSVC_LANES_{lane.upper()}': '2', 'EMAILSVC_CONSUMER_MAX_TASKS_PER_WORKER': str(max_tasks)})
    consumer = start_consumer(workdir, env, f'recycle-{max_tasks}', lanes=lane)
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
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    lane = tasks.huey.service_tasks['noop'].task_class.lane
    seed = tasks.SETTINGS['consumer.max_tasks_per_worker']
    for number in range(rounds):
        order = (seed, 0) if number % 2 == 0 else (0, seed)
        rates = {max_tasks: drain(tasks, models, workdir, env, lane, n, max_tasks) for max_tasks in order}
        print(f'{seed} {rates[seed]:.1f} {rates[0]:.1f}', flush=True)


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
    workdir = pathlib.Path(tempfile.mkdtemp(prefix='recycle-bench-'))
    redis, postgres = services.start_redis(workdir / 'redis'), services.start_postgres(workdir / 'postgres')
    results = {}
    try:
        for name in ('embedded', 'scaleout'):
            out = subprocess.run([sys.executable, __file__, '--child', '--n', str(args.n), '--rounds', str(args.rounds)],
                                 cwd=ROOT, env=backend_env(name, workdir, redis, postgres), capture_output=True,
                                 text=True, timeout=4 * DEADLINE * args.rounds)
            if out.returncode:
                raise RuntimeError(f'{name} drains failed:\n{out.stderr[-3000:]}')
            results[name] = [tuple(float(x) for x in line.split()) for line in out.stdout.splitlines()]
    except BaseException:
        print(f'recycle_bench: the logs are kept in {workdir}', file=sys.stderr)
        raise
    finally:
        redis.stop()
        postgres.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    report(results, args)


def report(results, args):
    seed = int(results['embedded'][0][0])
    print(f'recycle benchmark: {args.n} queued no-op tasks drained by emailsvc.py consumer (2 workers), '
          f'{args.rounds} rounds; tasks/s, first start to last finish by the ledger')
    print(f'  {"round":>5}  {"backend":10} {f"recycled every {seed}":>20} {"never":>8} {"ratio":>7}')
    verdicts = {}
    for name, label in (('embedded', 'embedded'), ('scaleout', 'Redis+PG')):
        ratios = [recycled / never for _, recycled, never in results[name]]
        for number, (_, recycled, never) in enumerate(results[name]):
            print(f'  {number + 1:>5}  {label:10} {recycled:20.0f} {never:8.0f} {ratios[number]:6.2f}x')
        verdicts[label] = statistics.median(ratios)
        print(f'  {"median":>5}  {label:10} {"":20} {"":8} {verdicts[label]:6.2f}x')
    for label, ratio in verdicts.items():
        print(f'{label} recycling >= {TARGET}x never recycling {"met" if ratio >= TARGET else "NOT MET"}')


if __name__ == '__main__':
    main()
