"""Soak: mixed load for N minutes while the consumer is SIGKILLed and restarted every so often.

Sends (to a local SMTP server), syncs (from a private Dovecot) and no-ops are
enqueued at a steady rate; every `--kill-every` seconds the whole consumer
tree gets SIGKILL and a new one starts. Each minute prints accepted, completed,
lost (accepted more than `--grace` ago and still not final after the run),
duplicated deliveries (Message-IDs the SMTP server received twice) and the
throughput.

    ./run.sh bench soak --minutes 10 [--mode embedded|scaleout]
"""
import argparse
import collections
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import services  # noqa: E402


def environment(workdir, mode, smtp, dovecot):
    from cryptography.fernet import Fernet
    env = {k: v for k, v in os.environ.items() if not k.startswith('EMAILSVC_')}
    env.update(EMAILSVC_VAR=str(workdir / 'var'), EMAILSVC_CONFIG=str(workdir / 'absent.ini'),
               EMAILSVC_LOG_LEVEL='WARNING', EMAILSVC_SERVER_SECRET=os.urandom(24).hex(),
               EMAILSVC_SECURITY_CREDENTIAL_KEYS=Fernet.generate_key().decode(),
               EMAILSVC_MAIL_CA_FILES=f'{smtp.cert_path},{dovecot.cert_path}',
               EMAILSVC_SECURITY_ALLOWED_NETWORKS='127.0.0.0/8',
               EMAILSVC_CONSUMER_HEARTBEAT_SECONDS='1', EMAILSVC_CONSUMER_RECOVERY_GRACE='5',
               PYTHONPATH=str(ROOT))
    if mode == 'scaleout':
        redis, postgres = services.start_redis(workdir / 'redis'), services.start_postgres(workdir / 'pg')
        env.update(EMAILSVC_QUEUE_URL=redis.url, EMAILSVC_DATABASE_URL=postgres.url)
        return env, [redis, postgres]
    env.update(EMAILSVC_QUEUE_URL=f'sqlite:///{workdir}/var/queue.db',
               EMAILSVC_DATABASE_URL=f'sqlite:///{workdir}/var/emailsvc.db')
    return env, []


def start_consumer(env, log):
    return subprocess.Popen([sys.executable, '-m', 'huey.bin.huey_consumer', 'tasks.huey', '-w', '2', '-k',
                             'process', '-c', '1', '-q'], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def make_account(models, tasks, smtp, dovecot):
    dovecot.add_user('soak', 'soak-pw')
    smtp.add_user('soak', 'soak-pw')
    tenant = models.Tenant.create(name='soak')
    with models.tenant_scope(tenant.id):
        client = models.EmailClient.create(
            user_id=1, email='soak@example.com', copy_sent=False, incoming_protocol='imap',
            incoming_host='127.0.0.1', incoming_port=dovecot.imap_port, incoming_security='none',
            incoming_username='soak', smtp_host='127.0.0.1', smtp_port=smtp.port, smtp_security='starttls',
            smtp_username='soak')
        for kind in ('incoming', 'smtp'):
            models.Credential.store(client, kind, 'soak-pw')
    return client


def enqueue_one(n, tasks, client):
    kind = n % 4
    if kind == 0:
        clean = {'to': [f'r{n}@example.net'], 'cc': [], 'bcc': [], 'subject': f'soak {n}', 'body_text': 'x',
                 'attachment_ids': []}
        return 'send', tasks.queue_send(client, 1, clean, None)[0]
    if kind == 1:
        return 'sync', tasks.sync_emails(client.id, client.tenant_id, 1).id
    return 'noop', tasks.noop(client.tenant_id, 1).id


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--minutes', type=float, default=10)
    parser.add_argument('--mode', choices=('embedded', 'scaleout'), default='embedded')
    parser.add_argument('--rate', type=float, default=20, help='tasks enqueued per second')
    parser.add_argument('--kill-every', type=float, default=30, help='seconds between consumer kills')
    args = parser.parse_args()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix='soak-'))
    smtp, dovecot = services.start_smtp(workdir / 'smtp'), services.start_dovecot(workdir / 'dovecot')
    env, servers = environment(workdir, args.mode, smtp, dovecot)
    os.environ.update(env)
    import models
    import tasks
    models.migrate()
    client = make_account(models, tasks, smtp, dovecot)
    log = open(workdir / 'consumer.log', 'ab')
    consumer = start_consumer(env, log)
    accepted, kinds, kills = {}, collections.Counter(), 0
    start = last_kill = last_report = time.monotonic()
    n = 0
    try:
        while time.monotonic() - start < args.minutes * 60:
            with models.tenant_scope(client.tenant_id):
                kind, task_id = enqueue_one(n, tasks, client)
            accepted[task_id] = time.monotonic()
            kinds[kind] += 1
            n += 1
            if time.monotonic() - last_kill >= args.kill_every:
                os.killpg(consumer.pid, signal.SIGKILL)
                consumer.wait()
                consumer = start_consumer(env, log)
                kills, last_kill = kills + 1, time.monotonic()
            if time.monotonic() - last_report >= 60:
                report(models, smtp, accepted, kills, time.monotonic() - start)
                last_report = time.monotonic()
            time.sleep(1 / args.rate)
        # Long enough for the last retries: a sync's five back off 5 + 10 + 20 + 40 + 80 s.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and finished(models, accepted) < len(accepted):
            time.sleep(1)
        report(models, smtp, accepted, kills, time.monotonic() - start, final=True)
        print(f'  mix: {dict(kinds)}')
        print(f'  final states: {final_states(models, accepted)}')
    finally:
        os.killpg(consumer.pid, signal.SIGKILL)
        consumer.wait()
        for server in [smtp, dovecot, *servers]:
            server.stop()


def finished(models, accepted):
    from taskq import ledger
    with models.all_tenants():
        return models.TaskRecord.select().where(models.TaskRecord.id.in_(list(accepted)),
                                                models.TaskRecord.state.in_(ledger.FINAL_STATES)).count()


def final_states(models, accepted):
    """How the accepted tasks ended, and the commonest error of each state that is not success."""
    with models.all_tenants():
        rows = list(models.TaskRecord.select(models.TaskRecord.state, models.TaskRecord.error)
                    .where(models.TaskRecord.id.in_(list(accepted))))
    states = collections.Counter(r.state for r in rows)
    errors = {state: collections.Counter((r.error or '').splitlines()[0][:80] for r in rows if r.state == state)
              .most_common(1) for state in states if state != 'succeeded'}
    return {'counts': dict(states), 'commonest errors': errors, 'missing from the ledger': len(accepted) - len(rows)}


def report(models, smtp, accepted, kills, elapsed, final=False):
    done = finished(models, accepted)
    message_ids = [m['data'].split(b'Message-ID: ', 1)[1].split(b'\r\n', 1)[0] for m in smtp.received()]
    duplicated = len(message_ids) - len(set(message_ids))
    lost = len(accepted) - done if final else 0
    print(f'{"final" if final else f"{elapsed / 60:5.1f} min"}: accepted {len(accepted)}  completed {done}  '
          f'lost {lost}  duplicated {duplicated}  kills {kills}  throughput {done / elapsed:.1f} tasks/s',
          flush=True)
    if final:
        print(f'every accepted task final, lost 0 {"met" if lost == 0 else "NOT MET"}')
        print(f'duplicated deliveries 0 {"met" if duplicated == 0 else "NOT MET"}')


if __name__ == '__main__':
    main()
