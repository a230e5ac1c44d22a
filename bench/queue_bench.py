"""Queue benchmark: emailsvc's Huey + ledger on both backends against Celery 5.

For each backend (embedded: SqliteHuey + SQLite; scale-out: PriorityRedisHuey
+ PostgreSQL, both started here on loopback) a child process, alive for the
whole run, starts the real consumers (`huey_consumer tasks.huey -k process`:
every lane with its 2 workers; the no-op task runs in the periodic lane, so 2
workers run the tasks, as in Celery's concurrency 2) and measures:

- throughput end to end: N no-op tasks, from just before the first enqueue
  (ledger row + broker, as the API does it) until the last of them finished,
  by the ledger's finished_at (the worker's clock: the same host);
- throughput again with 3 consumers on this machine instead of 1 (one host
  scaled out: the same queue, 3x the workers, the same 2 cores);
- idle enqueue-to-start latency: one task at a time on an idle consumer, from
  just before the enqueue to the ledger's started_at; p50/p99 over short
  idle gaps, plus the first task after a long idle period;
- memory: PSS (pages shared between processes split between them) of the web
  process plus a consumer with 2 workers (`emailsvc.py consumer --lanes
  periodic`): issue 2's target counts exactly that, "web process plus consumer
  with 2 workers at most 150 MB". Issue 12 split the consumer into lanes (12
  workers by default) and set no memory target of its own, so the PSS of web
  plus the seed consumer with every lane is printed beside it as a figure only.

The same run measures Celery 5 + Redis (acks_late, prefetch 1, concurrency 2;
bench/celery_baseline.py) end to end and prints our figures as ratios to it.

This machine's 2 cores are shared, and Celery's own rate has moved 502-1,025
tasks/s between runs of the same code: a ratio of figures taken minutes apart
measures the neighbours as much as the code. So the throughput figures are
taken in --rounds rounds, interleaved in time (each round runs embedded,
scale-out and Celery, the order rotating by round), each ratio is against the
same round's Celery, and the verdicts use the median of the per-round ratios.
Within a backend's round, 1 and 3 consumers run back to back in the same child
(1 then 3, then 3 then 1 in the next round, so the growing ledger favours
neither; the 1-consumer run is the one compared with Celery), and that
verdict is the median of the per-round 3/1 ratios. Latency
and memory are measured once per backend after the rounds (Celery's in its
last round).

    ./run.sh bench queue_bench [--n 10000] [--samples 200] [--idle 60] [--rounds 3]
"""
import argparse
import datetime
import json
import os
import pathlib
import select
import signal
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import services  # noqa: E402

DEADLINE = 600  # seconds any one wait may take
WARM_TASKS = 1000  # run by a consumer before its latency or memory is measured


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


def start_consumer(workdir, env, number, lanes=None):
    """The seed consumer (huey_consumer, every lane), or emailsvc.py's consumer of the given lanes only."""
    cmd = ([sys.executable, 'emailsvc.py', 'consumer', '--lanes', lanes] if lanes else
           [sys.executable, '-m', 'huey.bin.huey_consumer', 'tasks.huey', '-k', 'process', '-q'])
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(workdir / f'consumer-{number}.log', 'ab'),
                            stderr=subprocess.STDOUT, start_new_session=True)


def start_web(workdir, env):
    port = services.free_port()
    return subprocess.Popen([sys.executable, 'emailsvc.py', 'web'], cwd=ROOT,
                            env=dict(env, EMAILSVC_SERVER_PORT=str(port), EMAILSVC_LOG_LEVEL='WARNING'),
                            stdout=open(workdir / 'web.log', 'ab'), stderr=subprocess.STDOUT)


def wait_for_workers(models, consumers, workers):
    pids = [c.pid for c in consumers]
    wait_until(lambda: models.ConsumerHeartbeat.select().where(
        models.ConsumerHeartbeat.consumer_pid.in_(pids)).count() == workers * len(pids), 60, 'consumer workers')


def stop(procs):
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    for proc in procs:
        proc.wait(60)


def tree_pss_mb(pids):
    """PSS of these processes and their descendants, MB, and how many processes that is."""
    tree = [p for pid in pids for p in process_tree(pid)]
    return sum(pss_kb(p) for p in tree) / 1024, len(tree)


class Backend:
    """One backend's consumers in this child process; the parent sends it one command a line."""

    def __init__(self):
        import models
        import tasks
        models.migrate()
        self.models, self.tasks = models, tasks
        self.workdir = pathlib.Path(os.environ['EMAILSVC_VAR'])
        self.env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.workers = sum(tasks.huey.lane_workers.values())
        self.noop_lane = tasks.huey.service_tasks['noop'].task_class.lane

    def consumers(self, running, count):
        """running grown (new seed consumers) or shrunk (the last ones stopped) to count, every worker beating."""
        stop(running[count:])
        running = running[:count] + [start_consumer(self.workdir, self.env, number)
                                     for number in range(len(running) + 1, count + 1)]
        wait_for_workers(self.models, running, self.workers)
        return running

    def rates(self, n, counts):
        """Throughput with each number of consumers in `counts`, back to back: {count: tasks/s}."""
        rates, running = {}, []
        try:
            for count in counts:
                running = self.consumers(running, count)
                rates[count] = throughput(self.tasks, self.models, n)
        finally:
            stop(running)
        return rates

    def pair(self, n, three_first):
        """Throughput with 1 consumer and with 3, back to back, in the order asked."""
        rates = self.rates(n, (3, 1) if three_first else (1, 3))
        return {'one': rates[1], 'three': rates[3], 'three_first': three_first}

    def one(self, n):
        """Throughput with the seed consumer alone (bench/ledger_floor_bench.py compares it with its floors)."""
        return self.rates(n, (1,))[1]

    def final(self, n, samples, idle):
        """Latency on the seed consumer; PSS of web + the seed consumer, then of web + a consumer with 2 workers."""
        warm = min(n, WARM_TASKS)   # workers that have run tasks: connections open, caches filled
        web = start_web(self.workdir, self.env)
        running = []
        try:
            running = self.consumers([], 1)
            throughput(self.tasks, self.models, warm)
            result = latency(self.tasks, self.models, samples, idle)
            result['pss_all_lanes_mb'], result['processes_all_lanes'] = tree_pss_mb([running[0].pid, web.pid])
            result['workers_all_lanes'] = self.workers
            stop(running)
            # Issue 2's 2 workers whatever config.ini gives the lane: the noop task's lane alone, set to 2.
            lane_env = dict(self.env, **{f'EMAILSVC_LANES_{self.noop_lane.upper()}': '2'})
            running = [start_consumer(self.workdir, lane_env, self.noop_lane, lanes=self.noop_lane)]
            wait_for_workers(self.models, running, 2)
            result['lane_2'] = self.noop_lane
            throughput(self.tasks, self.models, warm)
            result['pss_2_mb'], result['processes_2'] = tree_pss_mb([running[0].pid, web.pid])
        finally:
            stop(running + [web])
        return result


def run_child():
    """Answer the parent's commands (one JSON line each) until it closes stdin.

    The replies go to the original stdout, and everything else this process
    prints to stderr (the parent's log file), so no stray line can be read as one."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), 'w')
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    backend = Backend()
    for line in sys.stdin:
        command = json.loads(line)
        action = getattr(backend, command.pop('do'))
        replies.write(json.dumps(action(**command)) + '\n')
        replies.flush()


def noop_since(models, since):
    """The no-op tasks enqueued since `since` (not the periodic tasks the consumer's scheduler queues)."""
    record = models.TaskRecord
    return record.select().where(record.name == 'noop', record.enqueued_at >= since)


def succeeded_count(models, since):
    with models.all_tenants():
        return noop_since(models, since).where(models.TaskRecord.state == 'succeeded').count()


def finished(models, task_id):
    with models.all_tenants():
        return models.TaskRecord.get_by_id(task_id).finished_at is not None


def last_finish(models, since):
    """When the last of the tasks enqueued since `since` finished, by the ledger (epoch seconds)."""
    with models.all_tenants():
        # PostgreSQL sorts NULLs first in a descending order: a task still running came first
        row = noop_since(models, since).order_by(models.TaskRecord.finished_at.desc()).get()
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
    wait_until(lambda: finished(models, last.id), DEADLINE, 'the last task enqueued to finish')
    wait_until(lambda: succeeded_count(models, since) >= n, DEADLINE, f'{n} tasks to succeed', every=0.05)
    return n / (last_finish(models, since) - start)


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


# ---------------------------------------------------------------- parent: rounds of every backend and Celery

LABELS = {'scaleout': 'emailsvc Redis + PostgreSQL', 'embedded': 'emailsvc SQLite (embedded)',
          'celery': 'Celery 5 + Redis (acks_late, pf 1)'}
SHORT = {'scaleout': 'Redis+PG', 'embedded': 'embedded', 'celery': 'Celery'}


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


class Child:
    """A backend's child process (run_child), asked one thing at a time; idle between commands."""

    def __init__(self, name, workdir, redis, postgres, timeout):
        self.name, self.timeout, self.log = name, timeout, workdir / f'{name}-child.log'
        self.proc = subprocess.Popen([sys.executable, __file__, '--child'], cwd=ROOT,
                                     env=backend_env(name, workdir, redis, postgres), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, 'ab'))

    def ask(self, do, **arguments):
        self.proc.stdin.write(json.dumps(dict(arguments, do=do)) + '\n')
        self.proc.stdin.flush()
        # One reply line per command, so select() on the pipe sees it before the buffered readline.
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ''
        if not line:
            raise RuntimeError(f'{self.name} benchmark failed or gave no answer to {do} within {self.timeout:.0f} s:\n'
                               f'{self.log.read_text(errors="replace")[-3000:]}')
        return json.loads(line)

    def close(self):
        """End of input: the child stops what it runs and exits."""
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def round_order(number):
    """Round 0 runs embedded, scale-out, Celery; each later round starts one further along."""
    systems = ['embedded', 'scaleout', 'celery']
    return systems[number % 3:] + systems[:number % 3]


def run_rounds(children, redis, workdir, args):
    from bench.celery_baseline import run_celery_baseline
    rounds, celery = [], None
    for number in range(args.rounds):
        last = number == args.rounds - 1
        figures = {'order': round_order(number)}
        for system in figures['order']:
            if system == 'celery':   # latency, drain and memory once, in the last round
                celery = run_celery_baseline(redis.url, n_tasks=args.n, latency_samples=args.samples if last else 0,
                                             workdir=workdir, drain=last)
                figures['celery'] = celery['throughput_e2e']
            else:   # 1 and 3 consumers, alternating which goes first, so neither always follows more ledger rows
                figures[system] = children[system].ask('pair', n=args.n, three_first=number % 2 == 1)
        rounds.append(figures)
    return rounds, celery


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--n', type=int, default=10000, help='tasks in each throughput run')
    parser.add_argument('--samples', type=int, default=200, help='latency samples')
    parser.add_argument('--idle', type=float, default=60, help='seconds idle before the last latency sample')
    parser.add_argument('--rounds', type=int, default=3, help='throughput rounds, interleaved in time')
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child()
    if args.rounds < 1:
        parser.error('--rounds must be at least 1')

    children = {}
    with services.benchmark_servers('queue_bench') as (workdir, redis, postgres):
        try:
            for name in ('embedded', 'scaleout'):
                children[name] = Child(name, workdir, redis, postgres, timeout=2 * DEADLINE + 4 * args.idle)
            rounds, celery = run_rounds(children, redis, workdir, args)
            final = {name: child.ask('final', n=args.n, samples=args.samples, idle=args.idle)
                     for name, child in children.items()}
        finally:
            for child in children.values():
                child.close()
    report(rounds, final, celery, args)


# ---------------------------------------------------------------- report

def ratios(rounds, system):
    """Per round: the backend's 1-consumer rate over that round's Celery, and its 3-consumer over 1-consumer rate."""
    return ([r[system]['one'] / r['celery'] for r in rounds],
            [r[system]['three'] / r[system]['one'] for r in rounds])


def report(rounds, final, celery, args):
    median = statistics.median
    vs_celery = {system: ratios(rounds, system)[0] for system in ('scaleout', 'embedded')}
    scaling = {system: ratios(rounds, system)[1] for system in ('scaleout', 'embedded')}
    print(f'queue benchmark: {args.n} no-op tasks a run (their lane has 2 process workers), ledger included; '
          f'{args.rounds} rounds interleaved in time, each ratio against the same round\'s Celery')
    print('throughput end to end (first enqueue to last finish), tasks/s, 1 consumer:')
    print(f'  {"round":>5}  {"order":28} {"Redis+PG":>9} {"x Celery":>9} {"embedded":>9} {"x Celery":>9} '
          f'{"Celery":>8}')
    for number, r in enumerate(rounds):
        print(f'  {number + 1:>5}  {", ".join(SHORT[s] for s in r["order"]):28} {r["scaleout"]["one"]:9.0f} '
              f'{vs_celery["scaleout"][number]:8.2f}x {r["embedded"]["one"]:9.0f} '
              f'{vs_celery["embedded"][number]:8.2f}x {r["celery"]:8.0f}')
    print(f'  {"median":>5}  {"":28} {median(r["scaleout"]["one"] for r in rounds):9.0f} '
          f'{median(vs_celery["scaleout"]):8.2f}x {median(r["embedded"]["one"] for r in rounds):9.0f} '
          f'{median(vs_celery["embedded"]):8.2f}x {median(r["celery"] for r in rounds):8.0f}')
    print('1 consumer vs 3 on this machine, tasks/s (back to back in one child process; the verdict is the '
          'median 3/1):')
    print(f'  {"round":>5}  {"first":>5} {"Redis+PG 1":>11} {"3":>7} {"3/1":>6} {"embedded 1":>11} {"3":>7} '
          f'{"3/1":>6}')
    for number, r in enumerate(rounds):
        print(f'  {number + 1:>5}  {3 if r["scaleout"]["three_first"] else 1:>5} '
              + ' '.join(f'{r[s]["one"]:11.0f} {r[s]["three"]:7.0f} {scaling[s][number]:5.2f}x'
                         for s in ('scaleout', 'embedded')))
    print(f'  {"median":>5}  {"":>5} '
          + ' '.join(f'{median(r[s]["one"] for r in rounds):11.0f} {median(r[s]["three"] for r in rounds):7.0f} '
                     f'{median(scaling[s]):5.2f}x' for s in ('scaleout', 'embedded')))
    print(f'  (Celery drain of a pre-filled queue, producer idle, last round: {celery["throughput"]:.0f} tasks/s; '
          'the ratios compare like with like: enqueue and run together, from the first enqueue to the last '
          'completion)')
    report_latency_memory(final, celery, args)
    report_targets(final, vs_celery, scaling)


def report_latency_memory(final, celery, args):
    print(f'idle enqueue-to-start latency, once after the rounds (Celery: its last round), ms; '
          f'after idle: the first task after {args.idle:.0f} s of idleness:')
    print(f'  {"":34} {"p50":>8} {"p99":>8} {"after idle":>11}')
    for name in ('scaleout', 'embedded'):
        r = final[name]
        print(f'  {LABELS[name]:34} {r["latency_p50_ms"]:8.2f} {r["latency_p99_ms"]:8.2f} {r["after_idle_ms"]:11.2f}')
    print(f'  {LABELS["celery"]:34} {celery["latency_p50_ms"]:8.2f} {celery["latency_p99_ms"]:8.2f}')
    every = final['scaleout']['workers_all_lanes']
    print('memory, PSS (pages shared between processes split between them), MB:')
    for name in ('scaleout', 'embedded'):
        r = final[name]
        print(f'  {LABELS[name]:34} {r["pss_2_mb"]:8.1f}  web + a consumer with 2 workers (emailsvc.py consumer '
              f'--lanes {r["lane_2"]}; {r["processes_2"]} processes), issue 2\'s target')
    print(f'  {LABELS["celery"]:34} {celery["pss_mb"]:8.1f}  the worker tree ({celery["processes"]} processes; '
          f'RSS {celery["rss_mb"]:.0f} MB)')
    print('  informational, no target (issue 12 set none): web + the seed consumer with every lane '
          f'({every} workers): ' + ', '.join(f'{LABELS[name]} {final[name]["pss_all_lanes_mb"]:.1f} MB '
                                             f'({final[name]["processes_all_lanes"]} processes)'
                                             for name in ('scaleout', 'embedded')))


def report_targets(final, vs_celery, scaling):
    median = statistics.median
    for target, ok in (
            ('Redis+PG >= 2.0x Celery', median(vs_celery['scaleout']) >= 2.0),
            ('embedded >= 3.5x Celery', median(vs_celery['embedded']) >= 3.5),
            ('p99 <= 3 ms Redis+PG', final['scaleout']['latency_p99_ms'] <= 3),
            ('p99 <= 10 ms embedded', final['embedded']['latency_p99_ms'] <= 10),
            ('PSS web + consumer with 2 workers <= 150 MB (issue 2)',
             max(final[name]['pss_2_mb'] for name in ('scaleout', 'embedded')) <= 150),
            ('3 consumers >= 1 consumer Redis+PG', median(scaling['scaleout']) >= 1.0),
            ('3 consumers >= 1 consumer embedded', median(scaling['embedded']) >= 1.0)):
        print(f'{target} {"met" if ok else "NOT MET"}')


if __name__ == '__main__':
    main()
