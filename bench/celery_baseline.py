"""Celery 5 on a Redis broker: the baseline bench/queue_bench.py compares Huey with.

Configured as the deployment Huey replaces (bench/celery_app.py): acks_late,
prefetch multiplier 1, a prefork pool of 2. The worker runs as a subprocess;
tasks report through Redis themselves, with no result backend. Measures:

- throughput_e2e: N no-op tasks on a worker that has only run its warm-up,
  from just before the first enqueue until the last has finished, so the
  worker drains while we enqueue and they share the CPUs; enqueue_s is the
  enqueueing alone;
- throughput (drain): then N no-op tasks enqueued while both pool processes
  are held busy, timed from their release until the last task has finished.
  The consumer alone, with no producer competing for the 2 cores;
- latency: enqueue-to-start of one task at a time on an idle worker, from
  just before the enqueue call until the task's first statement. Each sample
  follows 20-100 ms of idleness, every idle_every-th one idle_s, so p99 sees
  a worker that has sat idle;
- memory: RSS and PSS summed over the worker's processes, after the runs.
  RSS counts pages the fork shares once per process; PSS splits them.

drain=False skips the drain run and latency_samples=0 the latency samples
(their figures are None): bench/queue_bench.py measures Celery's end-to-end
rate in several rounds and the rest once.

    .venv/bin/pip install -r bench/requirements.txt   # benchmark only
    .venv/bin/python bench/celery_baseline.py [--redis-url redis://127.0.0.1:PORT/0] [--n 10000]

Without --redis-url it starts its own redis-server (tests/services.py).
"""
import contextlib
import argparse
import os
import pathlib
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import redis

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # a plain script has bench/, not the project root, on sys.path
from bench import celery_app  # noqa: E402

CONCURRENCY = 2
READY_TIMEOUT = 60   # seconds for the worker to start and run its warm-up tasks
SAMPLE_TIMEOUT = 10   # seconds for one latency task to start
STOP_TIMEOUT = 15


class BenchError(RuntimeError):
    pass


def run_celery_baseline(redis_url: str, n_tasks: int = 10000, latency_samples: int = 200,
                        workdir: pathlib.Path | None = None, *, idle_every: int = 10, idle_s: float = 2.0,
                        drain: bool = True) -> dict:
    """Start a Celery worker on redis_url, measure it, stop it; returns the figures (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix='celery-bench-') as tmp:
        workdir = pathlib.Path(workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(4)
        queue = f'bench-celery-{token}'   # every key of this run contains token, so cleanup can find them
        client = redis.Redis.from_url(redis_url)
        log = workdir / f'celery-worker-{token}.log'
        app = celery_app.make_app(redis_url, queue)
        worker = _start_worker(redis_url, queue, token, log)
        try:
            # One connection and producer of our own, closed on the way out: .delay() would use
            # kombu's process-wide pools, which outlive this call and its Redis.
            with app.connection_for_write() as conn, conn.Producer() as producer:
                def send(task: str, *args) -> None:
                    app.tasks[task].apply_async(args, producer=producer)
                wait = _Waiter(client, worker, log)
                _warm_up(send, wait, token)
                # End to end first: in every round of queue_bench it follows the warm-up alone.
                throughput_e2e, enqueue_s = _end_to_end(send, wait, token, n_tasks)
                throughput = _drain(send, wait, client, queue, token, n_tasks) if drain else None
                latencies = _latencies(send, wait, token, latency_samples, idle_every, idle_s)
                rss_mb, pss_mb, processes = _memory(worker.pid)
        finally:
            _stop_worker(worker)
            app.close()
            for key in client.scan_iter(match=f'*{token}*', count=1000):   # our queue, counters, stamps
                client.delete(key)
            client.close()
    p50, p99, top = _percentiles(latencies)
    return {'throughput': throughput, 'latency_p50_ms': p50, 'latency_p99_ms': p99, 'n': n_tasks,
            'rss_mb': rss_mb, 'pss_mb': pss_mb,
            # beyond the common keys, for context
            'throughput_e2e': throughput_e2e, 'enqueue_s': enqueue_s,
            'latency_max_ms': top, 'processes': processes}


# ---------------------------------------------------------------- the measurements

def _warm_up(send, wait, token: str) -> None:
    """Readiness is a task that ran: more than 'ping answered'. Enough tasks that each pool
    process has connected to Redis before anything is timed."""
    n = 4 * CONCURRENCY
    for _ in range(n):
        send('bench.noop', f'warm-{token}', n, f'warm-done-{token}')
    wait.pop(f'warm-done-{token}', READY_TIMEOUT, 'warm-up tasks')


def _drain(send, wait, client: redis.Redis, queue: str, token: str, n: int) -> float:
    held, gate, counter, done = f'held-{token}', f'gate-{token}', f'drain-{token}', f'drain-done-{token}'
    for _ in range(CONCURRENCY):
        send('bench.hold', held, gate, int(_bound(n)))
    for _ in range(CONCURRENCY):   # both pool processes are busy now
        wait.pop(held, SAMPLE_TIMEOUT, 'hold tasks to start')
    for _ in range(n):
        send('bench.noop', counter, n, done)
    # acks_late and prefetch 1: the two held tasks use up the worker's prefetch, so it takes none of these yet.
    if (queued := client.llen(queue)) != n:
        raise BenchError(f'{n - queued} of {n} tasks left the queue while the worker was held')
    released = time.time()   # wall clock: the last task's finishing time comes from another process
    client.rpush(gate, *[1] * CONCURRENCY)
    return n / (wait.pop(done, _bound(n), f'{n} tasks') - released)


def _end_to_end(send, wait, token: str, n: int) -> tuple[float, float]:
    counter, done = f'count-{token}', f'done-{token}'
    started = time.time()
    for _ in range(n):
        send('bench.noop', counter, n, done)
    enqueue_s = time.time() - started
    return n / (wait.pop(done, _bound(n), f'{n} tasks') - started), enqueue_s


def _bound(n: int) -> float:
    """Seconds to allow n tasks: generous, 20 tasks/s."""
    return 60 + n / 20


def _latencies(send, wait, token: str, samples: int, idle_every: int, idle_s: float) -> list[float]:
    key = f'stamp-{token}'
    jitter = random.Random(1)   # irregular gaps, so no sample is in step with a worker's poll interval
    latencies = []
    for i in range(samples):
        time.sleep(idle_s if i % idle_every == 0 else jitter.uniform(0.02, 0.1))
        enqueued = time.time()
        send('bench.stamp', key)
        latencies.append(wait.pop(key, SAMPLE_TIMEOUT, f'latency sample {i}') - enqueued)
    return latencies


def _percentiles(values: list[float]) -> tuple[float | None, float | None, float | None]:
    """p50, p99 and max in ms; None for each when no sample was taken."""
    if not values:
        return None, None, None
    if len(values) < 2:
        return values[0] * 1000, values[0] * 1000, values[0] * 1000
    cuts = statistics.quantiles(values, n=100, method='inclusive')
    return cuts[49] * 1000, cuts[98] * 1000, max(values) * 1000


class _Waiter:
    """Blocks on a Redis list in one-second steps, so a dead worker fails the run at once."""

    def __init__(self, client: redis.Redis, worker: subprocess.Popen, log: pathlib.Path):
        self.client, self.worker, self.log = client, worker, log

    def pop(self, key: str, timeout: float, what: str) -> float:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout) + 2):   # each BLPOP waits a second at most
            if self.worker.poll() is not None:
                raise BenchError(f'celery worker exited ({self.worker.returncode}) '
                                 f'waiting for {what}: {_tail(self.log)}')
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            item = self.client.blpop([key], timeout=min(1.0, remaining))
            if item is not None:
                return float(item[1])
        raise BenchError(f'no result for {what} after {timeout:.0f} s: {_tail(self.log)}')


# ---------------------------------------------------------------- the worker process

def _start_worker(redis_url: str, queue: str, token: str, log: pathlib.Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])),
               **{celery_app.BROKER_ENV: redis_url, celery_app.QUEUE_ENV: queue})
    cmd = [sys.executable, '-m', 'celery', '-A', 'bench.celery_app', 'worker',
           '--pool', 'prefork', '--concurrency', str(CONCURRENCY), '-Q', queue,
           '--hostname', f'bench-{token}@%h',
           # No cluster chatter: with one worker there is nobody to gossip or mingle with.
           '--without-gossip', '--without-mingle', '--without-heartbeat',
           '--loglevel', 'WARNING']   # INFO logs a line per task, which would be measured too
    with open(log, 'ab') as out:   # a file, not a pipe nobody reads
        # A session of its own: the pool processes share its process group, which finds them if the main one dies.
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _stop_worker(worker: subprocess.Popen) -> None:
    """SIGTERM is Celery's warm shutdown: it finishes running tasks and reaps its pool. SIGKILL if it hangs."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    deadline = time.monotonic() + STOP_TIMEOUT
    for _ in range(int(STOP_TIMEOUT / 0.05)):   # pool processes orphaned by a killed main process
        left = _group_members(worker.pid)
        if not left or time.monotonic() > deadline:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):   # it ended by itself meanwhile
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/pid/stat after the command name (state, ppid, pgrp, ...), or None if it is gone."""
    try:
        text = pathlib.Path(f'/proc/{pid}/stat').read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(')', 1)[1].split()


def _all_stats() -> dict[int, list[str]]:
    stats = {int(entry): _proc_stat(int(entry)) for entry in os.listdir('/proc') if entry.isdigit()}
    return {pid: fields for pid, fields in stats.items() if fields and fields[0] != 'Z'}


def _group_members(pgid: int) -> list[int]:
    return [pid for pid, fields in _all_stats().items() if fields[2] == str(pgid)]


def _tree(root: int) -> list[int]:
    """root and its live descendants."""
    children: dict[int, list[int]] = {}
    for pid, fields in _all_stats().items():
        children.setdefault(int(fields[1]), []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _memory(root: int) -> tuple[float, float, int]:
    """(RSS MB, PSS MB, processes) summed over the worker's process tree."""
    rss_kb = pss_kb = 0
    pids = _tree(root)
    for pid in pids:
        rss_kb += _field_kb(f'/proc/{pid}/status', 'VmRSS:')
        pss_kb += _field_kb(f'/proc/{pid}/smaps_rollup', 'Pss:')
    return rss_kb / 1024, pss_kb / 1024, len(pids)


def _field_kb(path: str, name: str) -> int:
    for line in pathlib.Path(path).read_text().splitlines():
        if line.startswith(name):
            return int(line.split()[1])
    raise BenchError(f'{path} has no {name} line')


def _tail(log: pathlib.Path, lines: int = 8) -> str:
    text = log.read_text(errors='replace') if log.exists() else ''
    return ' | '.join(line for line in text.splitlines()[-lines:] if line.strip()) or f'{log} is empty'


# ---------------------------------------------------------------- script

def main() -> None:
    import celery
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--redis-url', help='a running Redis (loopback); default: start one in a temp dir')
    parser.add_argument('--n', type=int, default=10000, help='tasks for the throughput run')
    parser.add_argument('--latency-samples', type=int, default=200)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]   # this is a shared 2-core machine: show when others were busy too
    with tempfile.TemporaryDirectory(prefix='celery-bench-') as tmp:
        server = None
        if not args.redis_url:
            from tests.services import start_redis   # only now: it needs the test requirements
            server = start_redis(pathlib.Path(tmp))
        try:
            r = run_celery_baseline(args.redis_url or server.url, args.n, args.latency_samples, pathlib.Path(tmp))
        finally:
            if server:
                server.stop()
    print(f'Celery {celery.__version__}, Redis broker, acks_late, prefetch 1, prefork x{CONCURRENCY}')
    print(f'  throughput  drain {r["throughput"]:.0f} tasks/s   end-to-end {r["throughput_e2e"]:.0f} tasks/s   '
          f'({r["n"]:,} no-op tasks; enqueueing {r["enqueue_s"]:.1f} s of end-to-end)')
    print(f'  latency     p50 {r["latency_p50_ms"]:.2f} ms   p99 {r["latency_p99_ms"]:.2f} ms   '
          f'max {r["latency_max_ms"]:.2f} ms   ({args.latency_samples} samples)')
    print(f'  load avg    {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1 min)')
    print(f'  worker      RSS {r["rss_mb"]:.0f} MB   PSS {r["pss_mb"]:.0f} MB   ({r["processes"]} processes)')


if __name__ == '__main__':
    main()
