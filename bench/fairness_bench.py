"""Fairness benchmark: tenant A's 2,000 queued syncs against tenant B's sends and sync.

Tenant A has 2,000 accounts on a local Dovecot (spread over 40 IMAP users,
so that no user passes Dovecot's per-user connection limit) and asks for all
of them to sync at once (user-requested syncs, the top priority). Right after,
tenant B asks for one sync and sends 50 messages (one every 0.1 s) to a local
SMTP server. For each of B's tasks the figure is how long it waited: from its
ledger record's enqueued_at to its started_at.

Two designs run the same load on fresh databases and queues, with the same
total of worker processes:

- lanes (this code): a lane per workflow, each with its workers (config.ini's
  [lanes], 2 each), and tenants taking turns within a lane;
- one priority queue (the design before lanes): every task in one queue served
  by all the workers, by priority, first come first served within one.

Runs on Redis + PostgreSQL (--mode scaleout, the default) or SQLite
(--mode embedded), started here on loopback.

    ./run.sh bench fairness_bench [--syncs 2000] [--sends 50] [--mode scaleout|embedded]
"""
import argparse
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

DEADLINE = 900   # seconds any one wait may take
PASSWORD = 'fair-pw'
IMAP_USERS = 40
DESIGNS = ('lanes', 'single')


def wait_until(condition, timeout, what, poll=0.02):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f'timed out waiting for {what}')
        time.sleep(poll)


# ---------------------------------------------------------------- the design before lanes

def collapse_lanes():
    """Every task into one lane, and no tenant turns: one priority queue, first come first served."""
    import tasks
    from taskq import storage
    for wrapper in tasks.huey.service_tasks.values():
        wrapper.task_class.lane = 'sync'
    for cls in (storage.LaneRedisStorage, storage.WakingSqliteStorage):
        cls.enqueue = (lambda enqueue: lambda self, data, priority=None, tenant=None:
                       enqueue(self, data, priority, None))(cls.enqueue)


CONSUMER = '''
import sys
sys.path.insert(0, {root!r})
import emailsvc, tasks
if {single}:
    from bench.fairness_bench import collapse_lanes
    collapse_lanes()
lanes = ['sync'] if {single} else None
tasks.huey.create_consumer(lanes=lanes, **emailsvc.consumer_options(tasks.SETTINGS)).run()
'''


# ---------------------------------------------------------------- child: one design

def make_tenant(models, name):
    tenant = models.Tenant.create(name=name)
    with models.tenant_scope(tenant.id):
        user = models.User.create(name=f'{name}-user')
    return tenant, user


def make_account(models, tenant, user, imap_user, imap_port, smtp=None):
    with models.tenant_scope(tenant.id):
        client = models.EmailClient.create(
            user_id=user.id, email=f'{imap_user}@example.com', incoming_protocol='imap', incoming_host='127.0.0.1',
            incoming_port=imap_port, incoming_security='none', incoming_username=imap_user, sync_enabled=False,
            copy_sent=False, **({'smtp_host': '127.0.0.1', 'smtp_port': smtp, 'smtp_security': 'starttls',
                                 'smtp_username': imap_user} if smtp else {}))
        models.Credential.store(client, 'incoming', PASSWORD)
        if smtp:
            models.Credential.store(client, 'smtp', PASSWORD)
    return client


def waited_ms(models, task_ids):
    """Each task's wait from enqueue to start, in ms; None for one that has not started."""
    with models.all_tenants():
        rows = models.TaskRecord.select().where(models.TaskRecord.id.in_(task_ids))
        return [(r.started_at - r.enqueued_at).total_seconds() * 1000 if r.started_at else None for r in rows]


def run_design(args):
    import models
    import tasks
    single = args.design == 'single'
    if single:
        collapse_lanes()
    models.migrate()
    workdir = pathlib.Path(os.environ['EMAILSVC_VAR'])
    workers = sum(tasks.huey.lane_workers.values())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if single:
        env['EMAILSVC_LANES_SYNC'] = str(workers)   # the same workers, all on the one queue
    consumer = subprocess.Popen([sys.executable, '-c', CONSUMER.format(root=str(ROOT), single=single)], cwd=ROOT,
                                env=env, stdout=open(workdir / 'consumer.log', 'wb'), stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        tenant_a, user_a = make_tenant(models, 'tenant-a')
        tenant_b, user_b = make_tenant(models, 'tenant-b')
        a_accounts = [make_account(models, tenant_a, user_a, f'fair{i % IMAP_USERS}', args.imap_port)
                      for i in range(args.syncs)]
        b_account = make_account(models, tenant_b, user_b, 'fairb', args.imap_port, smtp=args.smtp_port)
        wait_until(lambda: models.ConsumerHeartbeat.select().where(
            models.ConsumerHeartbeat.consumer_pid == consumer.pid).count() >= workers, 60, 'consumer workers')
        started = time.perf_counter()
        a_syncs = []
        for client in a_accounts:
            with models.tenant_scope(tenant_a.id):
                a_syncs.append(tasks.queue_sync(client, user_a.id)[0])
        queued_a = time.perf_counter() - started
        with models.tenant_scope(tenant_b.id):
            b_sync = tasks.queue_sync(b_account, user_b.id)[0]
            b_sends = []
            for n in range(args.sends):
                clean = {'to': [f'rcpt{n}@example.net'], 'cc': [], 'bcc': [], 'subject': f'fair {n}',
                         'body_text': 'hello', 'attachment_ids': []}
                b_sends.append(tasks.queue_send(b_account, user_b.id, clean))
                time.sleep(0.1)
        wait_until(lambda: None not in waited_ms(models, b_sends + [b_sync]), DEADLINE, "tenant B's tasks to start")
        sends = sorted(waited_ms(models, b_sends))
        sync_ms, = waited_ms(models, [b_sync])
        with models.all_tenants():
            a_left = models.TaskRecord.select().where(models.TaskRecord.id.in_(a_syncs),
                                                      models.TaskRecord.state.not_in(('succeeded', 'failed'))).count()
        wait_until(lambda: None not in waited_ms(models, a_syncs), DEADLINE, "tenant A's syncs to start", poll=0.5)
        drained = time.perf_counter() - started
        with models.all_tenants():
            a_failed = models.TaskRecord.select().where(models.TaskRecord.id.in_(a_syncs),
                                                        models.TaskRecord.state != 'succeeded').count()
    finally:
        consumer.send_signal(signal.SIGINT)
        try:
            consumer.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(consumer.pid, signal.SIGKILL)
            consumer.wait()
    print(json.dumps({'send_p50_ms': statistics.median(sends), 'send_p99_ms': sends[min(len(sends) - 1,
                                                                                     int(len(sends) * 0.99))],
                      'send_max_ms': sends[-1], 'sync_ms': sync_ms, 'a_left_when_b_started': a_left,
                      'queued_a_s': queued_a, 'a_drained_s': drained, 'a_not_succeeded': a_failed,
                      'workers': workers}))


# ---------------------------------------------------------------- parent: both designs

def design_env(design, workdir, mode, redis, postgres, ca_files):
    from cryptography.fernet import Fernet
    env = {k: v for k, v in os.environ.items() if not k.startswith('EMAILSVC_')}
    var = workdir / design
    var.mkdir(parents=True, exist_ok=True)
    env.update(EMAILSVC_VAR=str(var), EMAILSVC_CONFIG=str(workdir / 'absent.ini'), EMAILSVC_LOG_LEVEL='WARNING',
               EMAILSVC_SERVER_SECRET=os.urandom(24).hex(), EMAILSVC_MAIL_CA_FILES=ca_files,
               EMAILSVC_SECURITY_ALLOWED_NETWORKS='127.0.0.0/8', EMAILSVC_MAIL_TIMEOUT='30',
               EMAILSVC_SPAM_AUTO_CHECK='off', EMAILSVC_SECURITY_CREDENTIAL_KEYS=Fernet.generate_key().decode())
    if mode == 'embedded':
        env.update(EMAILSVC_DATABASE_URL=f'sqlite:///{var}/emailsvc.db', EMAILSVC_QUEUE_URL=f'sqlite:///{var}/queue.db')
    else:
        redis_db = DESIGNS.index(design) + 1   # a Redis database of its own per design
        env.update(EMAILSVC_DATABASE_URL=postgres.create_database(f'fair_{design}'),
                   EMAILSVC_QUEUE_URL=redis.url.rsplit('/', 1)[0] + f'/{redis_db}')
    return env


def measure(design, workdir, mode, redis, postgres, dovecot, smtp, args):
    cmd = [sys.executable, __file__, '--child', design, '--syncs', str(args.syncs), '--sends', str(args.sends),
           '--imap-port', str(dovecot.imap_port), '--smtp-port', str(smtp.port)]
    env = design_env(design, workdir, mode, redis, postgres, f'{dovecot.cert_path},{smtp.cert_path}')
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3 * DEADLINE)
    if out.returncode:
        raise RuntimeError(f'{design} run failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--syncs', type=int, default=2000, help="tenant A's queued syncs")
    parser.add_argument('--sends', type=int, default=50, help="tenant B's sends")
    parser.add_argument('--mode', choices=('scaleout', 'embedded'), default='scaleout')
    parser.add_argument('--child', choices=DESIGNS, dest='design', help=argparse.SUPPRESS)
    parser.add_argument('--imap-port', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--smtp-port', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.design:
        return run_design(args)

    workdir = pathlib.Path(tempfile.mkdtemp(prefix='fairness-bench-'))
    started = []
    try:
        dovecot = services.start_dovecot(workdir / 'dovecot')
        started.append(dovecot)
        smtp = services.start_smtp(workdir / 'smtp')
        started.append(smtp)
        redis = postgres = None
        if args.mode == 'scaleout':
            redis = services.start_redis(workdir / 'redis')
            started.append(redis)
            postgres = services.start_postgres(workdir / 'postgres')
            started.append(postgres)
        for i in range(IMAP_USERS):
            dovecot.add_user(f'fair{i}', PASSWORD)
        dovecot.add_user('fairb', PASSWORD)
        smtp.add_user('fairb', PASSWORD)
        results = {design: measure(design, workdir, args.mode, redis, postgres, dovecot, smtp, args)
                   for design in DESIGNS}
    finally:
        for service in reversed(started):
            service.stop()
    report(results, args)


def report(results, args):
    lanes, single = results['lanes'], results['single']
    print(f'fairness benchmark ({args.mode}): {args.syncs} syncs of tenant A queued, then 1 sync and {args.sends} '
          f'sends of tenant B; {lanes["workers"]} worker processes in both designs')
    print(f'  {"":30} {"send p50 ms":>12} {"send p99 ms":>12} {"B sync ms":>10} {"A left":>7} {"A drained s":>12}')
    for label, r in (('lanes + tenant turns', lanes), ('one priority queue (before)', single)):
        print(f'  {label:30} {r["send_p50_ms"]:12.1f} {r["send_p99_ms"]:12.1f} {r["sync_ms"]:10.1f} '
              f'{r["a_left_when_b_started"]:7d} {r["a_drained_s"]:12.1f}')
    print(f'  (A left: tenant A syncs not yet finished when B\'s last task started; A queued in '
          f'{lanes["queued_a_s"]:.1f} s; syncs of A that did not succeed: lanes {lanes["a_not_succeeded"]}, '
          f'one queue {single["a_not_succeeded"]})')
    print(f'  (one queue / lanes: send p99 {single["send_p99_ms"] / max(lanes["send_p99_ms"], 0.001):.0f}x, '
          f'B sync {single["sync_ms"] / max(lanes["sync_ms"], 0.001):.0f}x)')
    for target, ok in (('send of tenant B starts within 1 s (p99)', lanes['send_p99_ms'] <= 1000),
                       ('sync of tenant B starts within 10 s', lanes['sync_ms'] <= 10000),
                       ("tenant A's backlog still there when B's tasks started", lanes['a_left_when_b_started'] > 0)):
        print(f'{target} {"met" if ok else "NOT MET"}')


if __name__ == '__main__':
    main()
