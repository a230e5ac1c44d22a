"""Soak: mixed load for N minutes while consumers are SIGKILLed or SIGSTOPped every so often.

Sends (to a local SMTP server), syncs (from a private Dovecot) and no-ops are
enqueued at a steady rate to `--consumers` consumers; every `--kill-every`
seconds one of them takes a blow: with one consumer, SIGKILL of its whole tree
and a new start (as before); with several, one picked at random gets SIGKILL of
its tree (and a new start), SIGKILL of one worker, or SIGSTOP of its tree for
longer than the recovery grace (then SIGCONT), so the others fence it and take
its tasks over. Each minute prints accepted, completed, lost (still not final
after the run), duplicated deliveries (Message-IDs the SMTP server received
twice) and the throughput.

    ./run.sh bench soak --minutes 10 [--mode embedded|scaleout] [--consumers 3]
"""
import argparse
import collections
import os
import pathlib
import random
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
               EMAILSVC_CONSUMER_HEARTBEAT_SECONDS='1', EMAILSVC_CONSUMER_RECOVERY_GRACE=str(GRACE),
               PYTHONPATH=str(ROOT))
    if mode == 'scaleout':
        redis, postgres = services.start_redis(workdir / 'redis'), services.start_postgres(workdir / 'pg')
        env.update(EMAILSVC_QUEUE_URL=redis.url, EMAILSVC_DATABASE_URL=postgres.url)
        return env, [redis, postgres]
    env.update(EMAILSVC_QUEUE_URL=f'sqlite:///{workdir}/var/queue.db',
               EMAILSVC_DATABASE_URL=f'sqlite:///{workdir}/var/emailsvc.db')
    return env, []


GRACE = 5   # EMAILSVC_CONSUMER_RECOVERY_GRACE below


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
        return 'send', tasks.queue_send(client, 1, clean, None)
    if kind == 1:
        return 'sync', tasks.sync_emails(client.id, client.tenant_id, 1).id
    return 'noop', tasks.noop(client.tenant_id, 1).id


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--minutes', type=float, default=10)
    parser.add_argument('--mode', choices=('embedded', 'scaleout'), default='embedded')
    parser.add_argument('--rate', type=float, default=20, help='tasks enqueued per second')
    parser.add_argument('--kill-every', type=float, default=30, help='seconds between blows at a consumer')
    parser.add_argument('--consumers', type=int, default=1, help='consumers running at once (as on separate hosts)')
    args = parser.parse_args()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix='soak-'))
    smtp, dovecot = services.start_smtp(workdir / 'smtp'), services.start_dovecot(workdir / 'dovecot')
    env, servers = environment(workdir, args.mode, smtp, dovecot)
    os.environ.update(env)
    import models
    import tasks
    from emailsvc import UNAVAILABLE   # what the API answers 503 for
    models.migrate()
    client = make_account(models, tasks, smtp, dovecot)
    log = open(workdir / 'consumer.log', 'ab')
    fleet = Fleet(env, log, args.consumers)
    accepted, kinds, kills = {}, collections.Counter(), 0
    refused = collections.Counter()   # enqueues refused as the API refuses them (503), by error
    start = last_kill = last_report = time.monotonic()
    n = 0
    try:
        while time.monotonic() - start < args.minutes * 60:
            try:
                with models.tenant_scope(client.tenant_id):
                    kind, task_id = enqueue_one(n, tasks, client)
            except UNAVAILABLE as exc:
                # What the API answers 503 for: not accepted, so not counted. In the embedded mode a
                # consumer stopped inside an SQLite write holds the file's lock until it resumes.
                refused[type(exc).__name__] += 1
            else:
                accepted[task_id] = time.monotonic()
                kinds[kind] += 1
            n += 1
            fleet.resume_due()
            if time.monotonic() - last_kill >= args.kill_every:
                fleet.blow()
                kills, last_kill = kills + 1, time.monotonic()
            if time.monotonic() - last_report >= 60:
                report(models, smtp, accepted, kills, time.monotonic() - start)
                last_report = time.monotonic()
            time.sleep(1 / args.rate)
        # Long enough for the last retries: a sync's five back off 5 + 10 + 20 + 40 + 80 s.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and finished(models, accepted) < len(accepted):
            fleet.resume_due(at_once=True)
            time.sleep(1)
        report(models, smtp, accepted, kills, time.monotonic() - start, final=True)
        print(f'  consumers: {args.consumers}; blows: {dict(fleet.blows)}')
        print(f'  mix: {dict(kinds)}; refused (the API\'s 503, not accepted): {sum(refused.values())} {dict(refused)}')
        print(f'  final states: {final_states(models, accepted)}')
    finally:
        fleet.end()
        for server in [smtp, dovecot, *servers]:
            server.stop()


class Fleet:
    """The consumers and the blows at them; a stopped one is resumed after the grace, from the main loop."""

    def __init__(self, env, log, size):
        self.env, self.log = env, log
        self.consumers = [start_consumer(env, log) for _ in range(size)]
        self.stopped = {}   # index -> monotonic time to SIGCONT it
        self.blows = collections.Counter()
        self.rng = random.Random(7)

    def blow(self):
        index = self.rng.randrange(len(self.consumers))
        if index in self.stopped:
            return
        kinds = ('kill consumer',) if len(self.consumers) == 1 else ('kill consumer', 'kill worker', 'stop consumer')
        kind = self.rng.choice(kinds)
        consumer = self.consumers[index]
        workers = child_pids(consumer.pid)
        if kind == 'kill worker' and workers:
            os.kill(self.rng.choice(workers), signal.SIGKILL)
        elif kind == 'stop consumer':
            os.killpg(consumer.pid, signal.SIGSTOP)
            self.stopped[index] = time.monotonic() + GRACE * 1.5
        else:
            kind = 'kill consumer'
            os.killpg(consumer.pid, signal.SIGKILL)
            consumer.wait()
            self.consumers[index] = start_consumer(self.env, self.log)
        self.blows[kind] += 1

    def resume_due(self, at_once=False):
        for index, due in list(self.stopped.items()):
            if at_once or time.monotonic() >= due:
                os.killpg(self.consumers[index].pid, signal.SIGCONT)
                del self.stopped[index]

    def end(self):
        self.resume_due(at_once=True)
        for consumer in self.consumers:
            os.killpg(consumer.pid, signal.SIGKILL)
            consumer.wait()


def child_pids(pid):
    """The pids of `pid`'s children (a consumer's workers and scheduler), from /proc."""
    try:
        with open(f'/proc/{pid}/task/{pid}/children') as children:
            return [int(child) for child in children.read().split()]
    except OSError:
        return []


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
        print(f'accepted {len(accepted)} = final {done}, lost 0 {"met" if lost == 0 else "NOT MET"}')
        print(f'duplicated deliveries 0 {"met" if duplicated == 0 else "NOT MET"}')


if __name__ == '__main__':
    main()
