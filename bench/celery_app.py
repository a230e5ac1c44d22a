"""The Celery app for bench/celery_baseline.py, set up like the deployment Huey replaces.

The worker imports this module (celery -A bench.celery_app) and gets its
broker and queue from the environment; the benchmark itself calls make_app()
with the same values, so both sides share one configuration.

There is no result backend: each task reports what the benchmark needs by
writing to Redis itself (a counter, a start timestamp), so neither side pays
for storing or fetching results; bench/queue_bench.py should have its Huey tasks do the same.
"""
import os
import time

import redis
from celery import Celery

BROKER_ENV = 'BENCH_CELERY_BROKER'
QUEUE_ENV = 'BENCH_CELERY_QUEUE'

_clients: dict[str, redis.Redis] = {}


def _redis(url: str) -> redis.Redis:
    """One client per pool process, made on first use: after the fork, never inherited."""
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url)
    return _clients[url]


def make_app(broker_url: str | None, queue: str) -> Celery:
    app = Celery('bench', broker=broker_url, set_as_current=False)
    app.conf.update(
        # The deployment we replace: a task is acknowledged only once it has run,
        # and each pool process reserves one task at a time.
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,   # no result backend (see the module docstring)
        task_default_queue=queue,   # a queue of this run's own: leftovers of other runs are not counted
        broker_connection_retry_on_startup=True,   # the default; set to silence Celery's warning
    )

    @app.task(name='bench.noop', shared=False)   # shared tasks would join every later app
    def noop(counter: str, n: int, done: str) -> None:
        """Count itself; the n-th to finish records when, so the benchmark need not poll."""
        client = _redis(broker_url)
        if client.incr(counter) == n:
            client.rpush(done, time.time())

    @app.task(name='bench.hold', shared=False)
    def hold(held: str, gate: str, timeout: int) -> None:
        """Keep this pool process busy until the benchmark pushes to gate, so a backlog
        can build up; bounded, so a benchmark that died cannot hold the worker for ever."""
        client = _redis(broker_url)
        client.rpush(held, 1)
        deadline = time.monotonic() + timeout
        # One-second waits: redis-py 8 gives up on a socket silent for 5 s (its default
        # socket_timeout), so a single long BLPOP would fail and free the worker early.
        for _ in range(timeout + 1):
            if client.blpop([gate], timeout=1) or time.monotonic() > deadline:
                return

    @app.task(name='bench.stamp', shared=False)
    def stamp(key: str) -> None:
        """Record when the task started, for the enqueue-to-start latency."""
        started = time.time()   # first, before any Redis work of our own
        _redis(broker_url).rpush(key, started)

    return app


# For the worker, which has the environment; an importer that has not set it gets an
# app with no broker, unused: call make_app() instead.
app = make_app(os.environ.get(BROKER_ENV), os.environ.get(QUEUE_ENV, 'celery'))
