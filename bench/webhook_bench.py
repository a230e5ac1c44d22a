"""Webhook delivery benchmark: throughput, then no event lost across a receiver outage and consumer SIGKILLs.

The real consumer (`huey_consumer tasks.huey -w 2 -k process`, periodic tasks
on) delivers to a real HTTP receiver on loopback (tests/webhook_receiver.py's
StreamReceiver: asyncio, a thread of this process) that verifies every
signature with the independent `standardwebhooks` package as it arrives. Events are written with models.emit, as the
tasks write them; their commit wakes deliveries, as a task's commit does.

1. Throughput: --endpoints users with one endpoint each; --n events per
   endpoint written at once; deliveries/s from the first write until the
   receiver holds every event id.
2. Resilience: events written at --rate per second for --produce seconds;
   meanwhile the consumer is SIGKILLed (whole process group) twice and
   restarted, and the receiver is stopped for --outage seconds. Then: every
   event id delivered at least once to its endpoint (lost = 0), duplicates
   counted, in-order first deliveries checked, signatures valid.

    ./run.sh bench webhook_bench [--scaleout] [--n 1000] [--endpoints 4] [--outage 60]
"""
import argparse
import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryptography.fernet import Fernet  # noqa: E402

from tests import services  # noqa: E402
from tests.webhook_receiver import StreamReceiver  # noqa: E402

TARGET_RATE = 500   # deliveries/s


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f'timed out after {timeout}s waiting for {what}')
        time.sleep(0.05)


def configure(args, workdir):
    env = {'EMAILSVC_CONFIG': str(workdir / 'absent.ini'), 'EMAILSVC_VAR': str(workdir / 'var'),
           'EMAILSVC_SERVER_SECRET': 'bench-' + os.urandom(16).hex(),
           'EMAILSVC_SECURITY_CREDENTIAL_KEYS': Fernet.generate_key().decode(),
           'EMAILSVC_SECURITY_ALLOWED_NETWORKS': '127.0.0.0/8', 'EMAILSVC_LOG_LEVEL': 'WARNING',
           # Short pauses, so the outage and the kills are recovered from in seconds, not minutes.
           'EMAILSVC_WEBHOOKS_RETRY_BASE': '1', 'EMAILSVC_WEBHOOKS_RETRY_MAX': '5',
           'EMAILSVC_WEBHOOKS_LEASE_SECONDS': '5', 'EMAILSVC_CONSUMER_HEARTBEAT_SECONDS': '0.5',
           'EMAILSVC_CONSUMER_ALIVE_SECONDS': '3', 'EMAILSVC_CONSUMER_RECOVERY_GRACE': '3'}
    started = []
    if args.scaleout:
        redis, postgres = services.start_redis(workdir / 'redis'), services.start_postgres(workdir / 'postgres')
        started = [redis, postgres]
        env.update(EMAILSVC_QUEUE_URL=redis.url, EMAILSVC_DATABASE_URL=postgres.create_database('bench'))
    else:
        env.update(EMAILSVC_QUEUE_URL=f'sqlite:///{workdir}/var/queue.db',
                   EMAILSVC_DATABASE_URL=f'sqlite:///{workdir}/var/emailsvc.db')
    os.environ.update(env)
    return started


class ConsumerProcess:
    def __init__(self, workdir):
        self.log = open(workdir / 'consumer.log', 'ab')
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, '-m', 'huey.bin.huey_consumer', 'tasks.huey', '-w', '2',
                                      '-k', 'process', '-q'], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, models, workers=2):
        """Until its workers heartbeat: a run's figure must not include the consumer's start-up."""
        Beat = models.ConsumerHeartbeat
        wait_until(lambda: Beat.select().where(Beat.consumer_pid == self.proc.pid).count() >= workers, 60,
                   'consumer workers to heartbeat')

    def kill(self):
        """SIGKILL the consumer's whole process group (its workers too), as a power cut would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError):   # the group is gone already: nothing left to stop
            os.killpg(self.proc.pid, signal.SIGKILL)   # any worker left behind


def make_endpoints(models, receiver, count):
    """`count` users, each with one webhook endpoint to its own path on the receiver; [(pair, path)]."""
    import secrets as secrets_mod
    from mailkit import webhooks
    endpoints = []
    tenant = models.Tenant.create(name=f'bench-{secrets_mod.token_hex(3)}')
    with models.tenant_scope(tenant.id):
        for n in range(count):
            user = models.User.create(name=f'user{n}')
            secret = webhooks.new_secret()
            path = f'/u{n}'
            models.Webhook.create(user_id=user.id, url=receiver.url + path, secret=models.Webhook.seal(secret),
                                  cursor=models.last_event_id())
            receiver.secrets[path] = [secret]
            endpoints.append(((tenant.id, user.id), path))
    return endpoints


def enable(models, endpoints, enabled):
    with models.all_tenants():
        models.Webhook.update(enabled=enabled).where(
            models.Webhook.user_id.in_([user_id for (_, user_id), _ in endpoints])).execute()


class Producer:
    """Writes events for every endpoint's user (their commits wake deliveries); remembers each event id by path."""

    def __init__(self, models, tasks, endpoints):
        self.models, self.tasks, self.endpoints = models, tasks, endpoints
        self.expected = {path: [] for _, path in endpoints}

    def write(self, per_endpoint):
        models = self.models
        for (tenant_id, user_id), path in self.endpoints:
            with models.tenant_scope(tenant_id), models.database.atomic():
                before = models.last_event_id()
                models.emit_many('account.recovered', [{'n': n} for n in range(per_endpoint)],
                                 tenant_id=tenant_id, user_id=user_id, account_id=None)
                ids = [e.id for e in models.Event.select(models.Event.id).where(
                    models.Event.user_id == user_id, models.Event.id > before).order_by(models.Event.id)]
            self.expected[path] += [models.event_id_text(i) for i in ids]

    def wake(self):
        self.tasks.wake_webhooks({pair for pair, _ in self.endpoints})

    def total(self):
        return sum(len(ids) for ids in self.expected.values())


def cpu_seconds(pid):
    """User + system CPU seconds of a process and its children that are alive or waited for."""
    total = 0.0
    for child in [pid] + [int(p) for p in subprocess.run(['pgrep', '-P', str(pid)], capture_output=True,
                                                       text=True).stdout.split()]:
        try:
            fields = open(f'/proc/{child}/stat').read().rsplit(')', 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
    return total


def delivered_all(receiver, expected):
    return all(set(receiver.ids(path)) >= set(ids) for path, ids in expected.items())


def throughput(models, tasks, receiver, consumer, args):
    endpoints = make_endpoints(models, receiver, args.endpoints)
    producer = Producer(models, tasks, endpoints)
    enable(models, endpoints, False)   # written first, nothing woken by their commits: delivery alone counts
    producer.write(args.n)
    consumer_cpu, own_cpu = cpu_seconds(consumer.proc.pid), sum(os.times()[:2])
    started = time.monotonic()
    enable(models, endpoints, True)
    producer.wake()
    wait_until(lambda: delivered_all(receiver, producer.expected), 600, 'every throughput delivery')
    seconds = time.monotonic() - started
    cpu = {'consumer': cpu_seconds(consumer.proc.pid) - consumer_cpu, 'receiver': sum(os.times()[:2]) - own_cpu}
    return producer.total(), seconds, cpu


def resilience(models, tasks, receiver, consumer, args):
    endpoints = make_endpoints(models, receiver, args.endpoints)
    producer = Producer(models, tasks, endpoints)
    per_tick = max(1, round(args.rate * 0.1 / args.endpoints))
    kills = [args.produce * 0.1, args.outage + args.produce * 0.1 + 8]   # one before the outage, one after
    outage_at = args.produce * 0.15
    timeline = []
    started = time.monotonic()
    receiver_down = False
    for _ in range(int(args.produce * 10) + 100000):
        now = time.monotonic() - started
        if now >= args.produce and not kills:
            break
        if now < args.produce:
            producer.write(per_tick)
        if kills and now >= kills[0]:
            consumer.kill()
            consumer.start()
            timeline.append(f'{now:6.1f}s consumer SIGKILLed (process group) and restarted')
            kills.pop(0)
        if not receiver_down and outage_at <= now < outage_at + args.outage and receiver.server is not None:
            receiver.stop()
            receiver_down = True
            timeline.append(f'{now:6.1f}s receiver stopped')
        if receiver_down and now >= outage_at + args.outage:
            receiver.start()
            receiver_down = False
            timeline.append(f'{now:6.1f}s receiver started again')
        time.sleep(0.1)
    if receiver_down:
        receiver.start()
    produced_for = time.monotonic() - started
    try:
        wait_until(lambda: delivered_all(receiver, producer.expected), args.drain, 'every event delivered')
    except RuntimeError as exc:
        timeline.append(str(exc))
    return producer, timeline, produced_for, time.monotonic() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--scaleout', action='store_true', help='Redis + PostgreSQL instead of SQLite')
    parser.add_argument('--n', type=int, default=1000, help='events per endpoint in the throughput run')
    parser.add_argument('--endpoints', type=int, default=4)
    parser.add_argument('--rate', type=float, default=100.0, help='events/s written in the resilience run')
    parser.add_argument('--produce', type=float, default=90.0, help='seconds events are written')
    parser.add_argument('--outage', type=float, default=60.0, help='seconds the receiver is down')
    parser.add_argument('--drain', type=float, default=240.0, help='seconds allowed to deliver the rest')
    parser.add_argument('--throughput-only', action='store_true', help='skip the outage and the kills')
    args = parser.parse_args()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix='webhook-bench-'))
    started_services = configure(args, workdir)
    import models
    import tasks
    models.migrate()
    receiver = StreamReceiver(services.free_port()).start()
    consumer = ConsumerProcess(workdir)
    consumer.start()
    try:
        consumer.wait_ready(models)
        count, seconds, cpu = throughput(models, tasks, receiver, consumer, args)
        rate = count / seconds
        print(f'mode: {"scale-out (Redis + PostgreSQL)" if args.scaleout else "embedded (SQLite)"}, '
              f'consumer: 2 process workers, {args.endpoints} endpoints; load average before: '
              f'{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
        print(f'throughput: {count} deliveries in {seconds:.2f} s = {rate:.0f} deliveries/s '
              f'(signatures valid: {all(receiver.all_valid(p) for p in receiver.secrets)})')
        print(f'  CPU per delivery: consumer {cpu["consumer"] / count * 1000:.2f} ms, receiver (HTTP parsing + '
              f'signature check) {cpu["receiver"] / count * 1000:.2f} ms: at most '
              f'{os.cpu_count() / ((cpu["consumer"] + cpu["receiver"]) / count):.0f} deliveries/s on an idle machine '
              f'(the database and broker servers not counted)')
        if args.throughput_only:
            print(f'{TARGET_RATE} deliveries/s ' + ('met' if rate >= TARGET_RATE else 'NOT MET'))
            return
        receiver.received.clear()
        producer, timeline, produced_for, total = resilience(models, tasks, receiver, consumer, args)
        for line in timeline:
            print('  ' + line)
        expected = producer.expected
        lost = sum(len(set(ids) - set(receiver.ids(path))) for path, ids in expected.items())
        received = sum(len(receiver.ids(path)) for path in expected)
        unique = sum(len(set(receiver.ids(path)) & set(ids)) for path, ids in expected.items())
        in_order = all([i for i in dict.fromkeys(receiver.ids(path)) if i in set(ids)] == ids
                       for path, ids in expected.items())
        valid = all(receiver.all_valid(path) for path in expected)
        print(f'resilience: {producer.total()} events written over {produced_for:.0f} s, receiver down '
              f'{args.outage:.0f} s, 2 consumer SIGKILLs; all delivered {total:.0f} s after the start')
        print(f'  delivered at least once: {unique}/{producer.total()}   lost: {lost}   '
              f'duplicates: {received - unique} ({(received - unique) / max(unique, 1):.2%})   '
              f'first deliveries in order: {in_order}   signatures valid: {valid}')
        print(f'{TARGET_RATE} deliveries/s ' + ('met' if rate >= TARGET_RATE else 'NOT MET'))
        print('0 events lost across a 60 s receiver outage and two consumer SIGKILLs '
              + ('met' if lost == 0 and args.outage >= 60 else 'NOT MET'))
        print('every event id delivered at least once, duplicates counted ' + ('met' if unique == producer.total()
                                                                               else 'NOT MET'))
    finally:
        consumer.stop()
        if receiver.server is not None:
            receiver.stop()
        services.stop_all(started_services)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    main()
