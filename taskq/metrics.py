"""What /metrics says about tasks and mail, derived from the shared database.

Why the database and not prometheus_client's multiprocess mode: that mode
sums the counters of the processes of one host through files in one
directory; our tasks run in worker processes on many hosts, which come and go
(a worker is replaced every consumer.max_tasks_per_worker tasks), and web
processes on other hosts answer the scrape. The ledger (models.TaskRecord)
already records every task's end, by every process on every host, so the
counters are read from it and every web process answers the same numbers.
Nothing is added to the task hot path: no write beyond the ledger's own.

Cost does not grow with history. A scrape never counts the whole ledger:

  - `MetricTotal` holds the counters of every record that finished before a
    watermark (one small table: a row per metric and label set);
  - each scrape first moves the watermark up to `now - metrics.settle_seconds`,
    adding what finished in between (an indexed range of finished_at), and then
    counts the records finished after the watermark live, again by range. So a
    scrape reads the tasks of the last half minute or so, whatever the depth.

Moving the watermark is one transaction that locks its row (SQLite: BEGIN
IMMEDIATE; PostgreSQL: SELECT ... FOR UPDATE SKIP LOCKED), so two web
processes never add the same records twice; a scrape that finds it locked just
reads. The settle delay covers workers whose clock runs behind the web
host's and commits still in flight: a record whose finished_at is already
below the watermark when it commits is never counted, so keep the delay above
the clock skew between hosts.

What a counter means, exactly:

  - tasks finished: a record reaching succeeded, failed, dead or revoked, by
    name and state. A re-run of a failed task that finishes again counts
    again (two endings); one re-run before the settle delay has passed
    replaces the first ending, which is then not counted. Purging a record
    after it settled changes nothing.
  - retries: attempts beyond the first of each finished task (Huey retries
    and recovery's re-runs), counted when the task finishes.
  - run time: the last attempt's start to its end; queue wait: enqueue to
    start, for tasks that ran once (a retried task's wait would include its
    retry delays).
  - messages synced (sync_emails results), sent (succeeded send_email),
    deleted (delete_emails results), spam verdicts (check_spam results, by
    verdict). Results are cleared after queue.results_ttl; a scrape at least
    that often (any Prometheus does) counts them all.

Counters start at the install (or the upgrade that added them): history
before that is on the dashboard, not in the counters.
"""
import datetime
import functools
import os
import platform
import subprocess

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily

import models
from taskq import ledger, workers

RUN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
ENDED = (ledger.SUCCEEDED, ledger.FAILED, ledger.DEAD)  # ran to an end (revoked ones never ran this attempt)
WATERMARK = 'watermark'
EPOCH = datetime.datetime(1970, 1, 1)


def seconds(moment):
    return (moment - EPOCH).total_seconds()


def moment(epoch_seconds):
    return EPOCH + datetime.timedelta(seconds=epoch_seconds)


# ---------------------------------------------------------------- counting a range of finished records

class Dialect:
    """The few SQL expressions that differ between SQLite and PostgreSQL."""

    def __init__(self, database):
        self.postgres = isinstance(database.obj, models.pw.PostgresqlDatabase)
        self.param = database.param

    def elapsed(self, start, end):
        if self.postgres:
            return f'EXTRACT(EPOCH FROM ({end} - {start}))'
        return f'((julianday({end}) - julianday({start})) * 86400.0)'

    def number(self, field):
        if self.postgres:
            return f"CAST(CAST(result AS json)->>'{field}' AS double precision)"
        return f"json_extract(result, '$.{field}')"

    def unindexed(self, column):
        """`column` kept out of index choice: SQLite would walk the (state, enqueued_at) index for
        `state IN (...)`, most of the ledger, instead of the finished_at range."""
        return column if self.postgres else f'+{column}'

    def flag(self, field, value):
        if self.postgres:
            return f"(CAST(result AS json)->>'{field}') = '{'true' if value else 'false'}'"
        return f"json_extract(result, '$.{field}') = {1 if value else 0}"


@functools.lru_cache(maxsize=4)
def tally_sql(dialect):
    p = dialect.param
    spam = dialect.flag('is_spam', True)
    ham = dialect.flag('is_spam', False)
    counts = (
        'SELECT name, state, COUNT(*), SUM(attempts - 1), '
        f"SUM(CASE WHEN name = 'sync_emails' AND state = 'succeeded' THEN {dialect.number('messages_synced')} END), "
        f"SUM(CASE WHEN name = 'delete_emails' AND state = 'succeeded' THEN {dialect.number('deleted_count')} END), "
        f"SUM(CASE WHEN name = 'check_spam' AND state = 'succeeded' AND {spam} THEN 1 ELSE 0 END), "
        f"SUM(CASE WHEN name = 'check_spam' AND state = 'succeeded' AND {ham} THEN 1 ELSE 0 END) "
        f'FROM task_record WHERE finished_at >= {p} AND finished_at < {p} GROUP BY name, {dialect.unindexed("state")}')

    def buckets(column, bounds):
        return ', '.join(f'SUM(CASE WHEN {column} <= {b} THEN 1 ELSE 0 END)' for b in bounds)
    ended = ', '.join(f"'{s}'" for s in ENDED)
    times = (
        f'SELECT name, COUNT(run), SUM(run), {buckets("run", RUN_BUCKETS)}, '
        f'COUNT(wait), SUM(wait), {buckets("wait", WAIT_BUCKETS)} FROM ('
        f'SELECT name, {dialect.elapsed("started_at", "finished_at")} AS run, '
        f'CASE WHEN attempts = 1 THEN {dialect.elapsed("enqueued_at", "started_at")} END AS wait '
        f'FROM task_record WHERE finished_at >= {p} AND finished_at < {p} AND started_at IS NOT NULL '
        f'AND {dialect.unindexed("state")} IN ({ended})) AS ran GROUP BY name')
    return counts, times


def tally(dialect, since, until):
    """{metric key: amount} for the records finished in [since, until)."""
    counts_sql, times_sql = tally_sql(dialect)
    field = models.TaskRecord.finished_at
    params = (field.db_value(since), field.db_value(until))
    out = {}

    def add(key, amount):
        if amount:
            out[key] = out.get(key, 0) + float(amount)
    for name, state, count, retries, synced, deleted, spam, ham in \
            models.database.execute_sql(counts_sql, params).fetchall():
        add(f'finished\t{name}\t{state}', count)
        add(f'retries\t{name}', retries)
        add('messages\tsynced', synced)
        add('messages\tdeleted', deleted)
        if name == 'send_email' and state == ledger.SUCCEEDED:
            add('messages\tsent', count)
        add('spam\tspam', spam)
        add('spam\tham', ham)
    n = len(RUN_BUCKETS)
    for row in models.database.execute_sql(times_sql, params).fetchall():
        name, run_count, run_sum, run_buckets = row[0], row[1], row[2], row[3:3 + n]
        wait_count, wait_sum, wait_buckets = row[3 + n], row[4 + n], row[5 + n:]
        for kind, count, total, buckets, bounds in (('run', run_count, run_sum, run_buckets, RUN_BUCKETS),
                                                    ('wait', wait_count, wait_sum, wait_buckets, WAIT_BUCKETS)):
            add(f'{kind}_count\t{name}', count)
            add(f'{kind}_sum\t{name}', max(total or 0, 0))
            for bound, within in zip(bounds, buckets):
                add(f'{kind}_bucket\t{name}\t{bound}', within)
    return out


# ---------------------------------------------------------------- the rolled-up totals

def roll_up(settle_seconds, now=None):
    """Add the records that finished between the watermark and `now - settle_seconds` to the totals.
    Returns the number of keys changed, or None when another process holds the watermark."""
    until = (now or models.utcnow()) - datetime.timedelta(seconds=max(settle_seconds, 0))
    dialect = Dialect(models.database)
    with models.database.atomic():
        query = models.MetricTotal.select().where(models.MetricTotal.key == WATERMARK)
        if dialect.postgres:
            query = query.for_update('FOR UPDATE SKIP LOCKED')
        row = query.first()
        if row is None:
            # Start counting now: create the watermark (a racing creator's insert is ignored).
            models.MetricTotal.insert(key=WATERMARK, value=seconds(until)).on_conflict_ignore().execute()
            return 0
        since = moment(row.value)
        if until <= since:
            return 0
        amounts = tally(dialect, since, until)
        if amounts:
            T = models.MetricTotal
            T.insert_many([{'key': k, 'value': v} for k, v in amounts.items()]) \
                .on_conflict(conflict_target=[T.key], update={T.value: T.value + models.pw.EXCLUDED.value}).execute()
        models.MetricTotal.update(value=seconds(until)).where(models.MetricTotal.key == WATERMARK).execute()
        return len(amounts)


def totals():
    """The rolled-up counters plus the records finished since the watermark, counted live."""
    stored = {row.key: row.value for row in models.MetricTotal.select()}  # one statement: one snapshot
    since = moment(stored.pop(WATERMARK)) if WATERMARK in stored else models.utcnow()
    now = models.utcnow() + datetime.timedelta(days=1)  # include records stamped by a clock ahead of ours
    for key, amount in tally(Dialect(models.database), since, now).items():
        stored[key] = stored.get(key, 0) + amount
    return stored


# ---------------------------------------------------------------- gauges

def oldest_waiting_age(now=None):
    """Seconds the oldest pending task has waited (0 when none waits); the (state, enqueued_at) index answers."""
    with models.all_tenants():
        row = (models.TaskRecord.select(models.TaskRecord.enqueued_at)
               .where(models.TaskRecord.state == ledger.PENDING)
               .order_by(models.TaskRecord.enqueued_at).limit(1).first())
    if row is None:
        return 0.0
    return max(((now or models.utcnow()) - row.enqueued_at).total_seconds(), 0.0)


def live_consumers(alive_seconds, now=None):
    """{'alive': consumers, 'workers': worker processes} with a heartbeat within `alive_seconds`."""
    cutoff = (now or models.utcnow()) - datetime.timedelta(seconds=alive_seconds)
    H = models.ConsumerHeartbeat
    # By consumer id, not host and pid: hostnames and pids repeat across containers.
    rows = [workers.consumer_of(worker) for worker, in H.select(H.id).where(H.last_seen >= cutoff).tuples()]
    return {'alive': len(set(rows)), 'workers': len(rows)}


@functools.lru_cache(maxsize=1)
def build_info():
    """Version (EMAILSVC_VERSION, set by the container build, or the git commit) and runtime versions."""
    import huey
    version = os.environ.get('EMAILSVC_VERSION')
    if not version:
        try:
            version = subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True, text=True,
                                     timeout=5, cwd=os.path.dirname(os.path.dirname(__file__))).stdout.strip()
        except OSError:
            version = ''
    return {'version': version or 'unknown', 'python': platform.python_version(), 'huey': huey.__version__}


# ---------------------------------------------------------------- the collector

class LedgerCollector:
    """A prometheus_client collector: task and mail counters, queue and consumer gauges, build info."""

    def __init__(self, huey, settings):
        self.huey = huey
        self.settings = settings

    def collect(self):
        with models.database.connection_context():
            roll_up(self.settings['metrics.settle_seconds'])
            counts = totals()
            oldest = oldest_waiting_age()
            consumers = live_consumers(self.settings['consumer.alive_seconds'])
        yield from self.task_metrics(counts)
        yield from self.mail_metrics(counts)
        queue = self.huey.queue_depth()
        depth = GaugeMetricFamily('emailsvc_queue_depth', 'Tasks waiting in the broker', labels=['priority'])
        for priority, count in queue['by_priority'].items():
            depth.add_metric([priority], count)
        yield depth
        by_lane = GaugeMetricFamily('emailsvc_lane_queue_depth', 'Tasks waiting in the broker, by lane',
                                    labels=['lane'])
        for lane, waiting in queue['by_lane'].items():
            by_lane.add_metric([lane], waiting['depth'])
        yield by_lane
        yield GaugeMetricFamily('emailsvc_oldest_waiting_task_age_seconds',
                                'Seconds the oldest pending task has waited (0: none waits)', value=oldest)
        yield GaugeMetricFamily('emailsvc_consumers_alive', 'Consumers with a recent heartbeat',
                                value=consumers['alive'])
        yield GaugeMetricFamily('emailsvc_workers_alive', 'Worker processes with a recent heartbeat',
                                value=consumers['workers'])
        info = InfoMetricFamily('emailsvc_build', 'Version of emailsvc and its runtime')
        info.add_metric([], build_info())
        yield info

    @staticmethod
    def task_metrics(counts):
        finished = CounterMetricFamily('emailsvc_tasks_finished', 'Tasks that reached a final state',
                                       labels=['name', 'state'])
        retries = CounterMetricFamily('emailsvc_task_retries', 'Attempts beyond the first, of finished tasks',
                                      labels=['name'])
        names = set()
        for key, value in sorted(counts.items()):
            kind, *labels = key.split('\t')
            if kind == 'finished':
                finished.add_metric(labels, value)
            elif kind == 'retries':
                retries.add_metric(labels, value)
            elif kind in ('run_count', 'wait_count'):
                names.add(labels[0])
        yield finished
        yield retries
        for kind, bounds, metric, help_text in (
                ('run', RUN_BUCKETS, 'emailsvc_task_run_seconds', 'Run time of a finished task\'s last attempt'),
                ('wait', WAIT_BUCKETS, 'emailsvc_task_queue_wait_seconds',
                 'Enqueue to start, of tasks that ran once')):
            histogram = HistogramMetricFamily(metric, help_text, labels=['name'])
            for name in sorted(names):
                count = counts.get(f'{kind}_count\t{name}', 0)
                if not count:
                    continue
                buckets = [(str(b), counts.get(f'{kind}_bucket\t{name}\t{b}', 0)) for b in bounds]
                histogram.add_metric([name], buckets + [('+Inf', count)], counts.get(f'{kind}_sum\t{name}', 0))
            yield histogram

    @staticmethod
    def mail_metrics(counts):
        messages = CounterMetricFamily('emailsvc_messages', 'Messages synced, sent and deleted by tasks',
                                       labels=['action'])
        for action in ('synced', 'sent', 'deleted'):
            messages.add_metric([action], counts.get(f'messages\t{action}', 0))
        yield messages
        verdicts = CounterMetricFamily('emailsvc_spam_verdicts', 'Spam checks by verdict', labels=['verdict'])
        for verdict in ('spam', 'ham'):
            verdicts.add_metric([verdict], counts.get(f'spam\t{verdict}', 0))
        yield verdicts
