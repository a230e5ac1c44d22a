"""Push (IMAP IDLE) latency, one watcher's capacity, and a takeover, against a private Dovecot.

Starts, in a temporary directory, a private Dovecot (tests/services.py) whose
limits allow thousands of connections (see BENCH_DOVECOT_CONF), and emailsvc
in embedded mode (SQLite queue and database): a consumer without periodic
tasks (no periodic_sync: what becomes readable came by push), the web server
and a watcher, each a real process with the settings' defaults
(watcher.heartbeat_seconds 5, watcher.recovery_grace 30).

1. Latency, as one chain: one watched account whose user has a webhook
   endpoint (made over the API, events message.created) on a real HTTP
   receiver on loopback (tests/webhook_receiver.py, a thread of this
   process) that verifies every signature with the independent
   `standardwebhooks` package as it arrives. `--messages` (200) messages
   APPENDed to the INBOX one after another over a separate, already
   logged-in IMAP session. For each, from just before the APPEND: (a) until
   GET /api/v1/messages (polled every 20 ms) lists it (readable), (b) until
   the receiver has its message.created delivery (the event's message_id is
   the id the API lists) with a valid signature, and the chain: until both.
   p50/p95/p99/max of each printed; the targets are the chain's. The seed's
   poll: up to 300 s (sync_interval). Baseline in the same run: APPEND ->
   EXISTS on a bare IDLE connection (mailkit.idle, no service): Dovecot holds
   every announcement 500 ms (NOTIFY_DELAY_MSECS in its mailbox-watch.c),
   most of the total.
2. Capacity: `--accounts` (1,000) Dovecot users and accounts (made straight in
   the database: no first sync). The consumer is stopped first, so the syncs
   the watcher queues on connecting wait in the queue and the figures are the
   watcher's alone. Time until every lease says `idling`; then, over
   `--idle-seconds` (60) with nothing happening, the watcher's RSS (VmRSS)
   and CPU (utime + stime from /proc, as a % of one core).
3. Takeover: the watcher holding every account is killed with SIGKILL and
   a second one started at once (as a supervisor would); time from the kill
   until the second holds every lease and each says `idling` (its start-up
   included). Target: within watcher.recovery_grace + 10 s. (Two live
   watchers share the accounts out instead: tests/test_watcher.py.)

    ./run.sh bench push_bench [--messages 200] [--accounts 1000] [--idle-seconds 60]
"""
import argparse
import email.utils
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import services  # noqa: E402  (the project root is not on sys.path for a plain script)
from tests.conftest import wait_for  # noqa: E402
from tests.webhook_receiver import Receiver  # noqa: E402

PASSWORD = 'push-bench-pw'
DEADLINE = int(os.environ.get('PUSH_BENCH_DEADLINE', 600))
TARGET_P95, TARGET_P99 = 2.0, 5.0
TARGET_RSS_MB, TARGET_CPU_PERCENT = 150, 2.0
TAKEOVER_SLACK = 10.0

# One imap process serves many clients (all mail belongs to one system user,
# so they may share it): 1,000 single-client processes would each take an
# inotify instance, and Linux allows 128 per user by default
# (fs.inotify.max_user_instances); past it Dovecot falls back to looking
# every 30 s. client_limit alone does not do it: Dovecot's imap default
# service_count = 1 ends a process after its first client, and at
# process_limit the login processes drop the rest ("Internal login
# failure"); service_count = 0 keeps each process for many clients. Login
# processes in performance mode (service_count 0) keep their clients too.
BENCH_DOVECOT_CONF = '''
default_process_limit = 200
default_client_limit = 5000
mail_max_userip_connections = 50
service imap {
  service_count = 0
  client_limit = 100
  process_limit = 200
}
service imap-login {
  service_count = 0
  client_limit = 1000
  process_min_avail = 2
}
service anvil {
  client_limit = 5000
}
service auth {
  client_limit = 5000
}
'''


class BenchDovecot(services.Dovecot):
    def _write_config(self, cert, key):
        super()._write_config(cert, key)
        with self.config.open('a') as config:
            config.write(BENCH_DOVECOT_CONF)

    def add_users(self, names):
        """Many users at once: the passwd-files written, then one login checked (add_user checks each)."""
        uid, gid = self.mail_user.pw_uid, self.mail_user.pw_gid
        for name in names:
            line = f'{name}:{{PLAIN}}{PASSWORD}:{uid}:{gid}::{self.mail_root / name}::\n'
            services.smtp_server.write_atomically(self.users / name, line.encode())
        self._wait_for_login(names[-1], PASSWORD)


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))]


def wait(condition, timeout, what):
    return wait_for(condition, timeout, message=what)


def proc_kb(pid, field):
    with open(f'/proc/{pid}/status') as status:
        for line in status:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    with open(f'/proc/{pid}/stat') as stat:
        fields = stat.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')   # utime + stime


def start(workdir, name, args, **env):
    return services.PythonChild(workdir / f'{name}.log', args, **env)


class Api:
    def __init__(self, port, key):
        self.base, self.key = f'http://127.0.0.1:{port}', key

    def get(self, path):
        return self.call(urllib.request.Request(self.base + path, headers=self.auth()))

    def post(self, path, body):
        return self.call(urllib.request.Request(self.base + path, data=json.dumps(body).encode(), method='POST',
                                                headers={**self.auth(), 'Content-Type': 'application/json'}))

    def auth(self):
        return {'Authorization': f'Bearer {self.key}'}

    @staticmethod
    def call(request):
        with urllib.request.urlopen(request, timeout=15) as response:
            return json.loads(response.read())


class TimingReceiver(Receiver):
    """The test receiver, also noting when each message.created delivery that verified arrived, by our
    message id (the first arrival: a repeat changes nothing)."""

    def __init__(self, port):
        super().__init__(port)
        self.arrived = {}   # message id -> time.monotonic() of its first verified delivery
        self.invalid = 0

    def record(self, path, headers, body):
        super().record(path, headers, body)
        arrived = time.monotonic()
        with self.lock:
            valid = self.received[-1][2]
            event = json.loads(body)
            if not valid or not self.secrets.get(path):
                self.invalid += 1
            elif event['type'] == 'message.created':
                self.arrived.setdefault(str(event['data']['message_id']), arrived)

    def arrival(self, message_id):
        with self.lock:
            return self.arrived.get(str(message_id))


def environment(workdir):
    from cryptography.fernet import Fernet
    var = workdir / 'var'
    os.environ.update(
        EMAILSVC_VAR=str(var), EMAILSVC_CONFIG=str(workdir / 'absent.ini'), EMAILSVC_LOG_LEVEL='WARNING',
        EMAILSVC_SERVER_SECRET=os.urandom(24).hex(), EMAILSVC_SECURITY_CREDENTIAL_KEYS=Fernet.generate_key().decode(),
        EMAILSVC_DATABASE_URL=f'sqlite:///{var}/emailsvc.db', EMAILSVC_QUEUE_URL=f'sqlite:///{var}/queue.db',
        EMAILSVC_SECURITY_ALLOWED_NETWORKS='127.0.0.0/8', EMAILSVC_SERVER_PORT=str(services.free_port()))


def make_accounts(models, dovecot, names):
    """One tenant and user owning an account per Dovecot user, straight in the database; returns (key, ids)."""
    tenant = models.Tenant.create(name=f'push-bench-{os.urandom(4).hex()}')
    ids = []
    with models.tenant_scope(tenant.id):
        owner = models.User.create(name='bench')
        key = models.ApiKey.issue(tenant_id=tenant.id, user_id=owner.id)[1]
        with models.database.atomic():
            for name in names:
                client = models.EmailClient.create(
                    user_id=owner.id, email=f'{name}@example.org', incoming_protocol='imap',
                    incoming_host=services.HOST, incoming_port=dovecot.imap_port, incoming_security='none',
                    incoming_username=name, next_sync_at=None)   # nothing for a periodic sync to take
                models.Credential.store(client, 'incoming', PASSWORD)
                ids.append(client.id)
    return key, ids


def lease_states(models, holder_pid=None):
    lease = models.WatchLease
    query = lease.select(lease.state, lease.holder)
    return [(state, holder) for state, holder in query.tuples()
            if holder_pid is None or f':{holder_pid}:' in holder]


def state_counts(models):
    counts = {}
    for state, _ in lease_states(models):
        counts[state] = counts.get(state, 0) + 1
    return counts


def all_idling(models, count, pid):
    rows = lease_states(models, pid)
    return len(rows) == count and all(state == 'idling' for state, _ in rows)


def synced(models, account):
    """The account's INBOX is stored and no sync of it waits or runs: the next change starts from quiet."""
    with models.all_tenants():
        client = models.EmailClient.get_by_id(account)
        inbox = models.EmailFolder.get_or_none(models.EmailFolder.client == account)
        record = models.TaskRecord.get_or_none(models.TaskRecord.id == client.sync_task_id)
    return inbox is not None and (record is None or record.state == 'succeeded')


def message(n):
    return (f'From: Ann <ann@example.org>\r\nTo: bob@example.com\r\nSubject: push {n}\r\n'
            f'Date: {email.utils.format_datetime(email.utils.localtime())}\r\n'
            f'Message-ID: <push{n}.{os.urandom(4).hex()}@example.org>\r\n\r\nhello {n}\r\n').encode()


def listed(api, account, subject):
    """The API's id of the message with this subject in the account, or None while it is not readable."""
    items = api.get(f'/api/v1/messages?account_id={account}&limit=5')['items']
    return next((m['id'] for m in items if m['subject'] == subject), None)


def measure_latency(models, dovecot, web_port, count):
    """Per message: (readable over the API, its webhook delivered and verified, both), seconds from the APPEND."""
    from mailkit import imap
    user = 'latency'
    dovecot.add_users([user])
    key, (account,) = make_accounts(models, dovecot, [user])
    api = Api(web_port, key)
    receiver = TimingReceiver(services.free_port()).start()
    hook = api.post('/api/v1/webhooks', {'url': receiver.url + '/push', 'events': ['message.created']})
    receiver.secrets['/push'] = [hook['secret']]
    wait(lambda: all_idling(models, 1, None) and synced(models, account), 60,
         'the watcher to idle on the latency account, and the sync its first IDLE queued to end')
    readable, delivered, chain = [], [], []
    try:
        with imap.ImapSession(dovecot.host, dovecot.imap_port, 'none', user, PASSWORD) as session:
            for n in range(count):
                subject = f'push {n}'
                started = time.monotonic()
                session.append('INBOX', message(n))
                message_id = wait(lambda: listed(api, account, subject), 60, f'message {n} to be readable')
                readable.append(time.monotonic() - started)
                arrived = wait(lambda: receiver.arrival(message_id), 60, f'message {n}\'s webhook')
                delivered.append(arrived - started)
                chain.append(max(readable[-1], delivered[-1]))
    finally:
        receiver.stop()
    if receiver.invalid:
        raise SystemExit(f'{receiver.invalid} deliveries failed standardwebhooks verification')
    models.WatchLease.delete().execute()   # the capacity phase counts its own accounts
    with models.all_tenants():
        models.EmailClient.update(push=False).where(models.EmailClient.id == account).execute()
    return readable, delivered, chain


def measure_notify_delay(dovecot, count=20):
    """APPEND -> EXISTS on an IDLE connection of our own, no service: what Dovecot itself takes to announce."""
    import asyncio
    from mailkit import egress, idle, imap
    user = 'notify'
    dovecot.add_users([user])

    async def run():
        seen, ready, delays = asyncio.Event(), asyncio.Event(), []
        watching = asyncio.create_task(idle.watch(
            idle.Server(dovecot.host, dovecot.imap_port, 'none', user, PASSWORD), seen.set,
            on_idle=lambda status, count: ready.set(), policy=egress.Policy(['127.0.0.0/8'])))
        await asyncio.wait_for(ready.wait(), 30)
        with imap.ImapSession(dovecot.host, dovecot.imap_port, 'none', user, PASSWORD) as session:
            for n in range(count):
                seen.clear()
                started = time.monotonic()
                await asyncio.to_thread(session.append, 'INBOX', message(n))
                await asyncio.wait_for(seen.wait(), 30)
                delays.append(time.monotonic() - started)
        watching.cancel()
        return delays
    return asyncio.run(run())


def measure_capacity(models, dovecot, watcher, accounts, idle_seconds):
    names = [f'cap{n:05d}' for n in range(accounts)]
    started = time.monotonic()
    dovecot.add_users(names)
    print(f'  {accounts} Dovecot users made in {time.monotonic() - started:.1f} s', flush=True)
    make_accounts(models, dovecot, names)
    started = time.monotonic()
    wait(lambda: watcher.alive() and all_idling(models, accounts, watcher.proc.pid), DEADLINE,
         lambda: f'the watcher to idle on {accounts} accounts (lease states: {state_counts(models)})')
    connected = time.monotonic() - started
    time.sleep(10)   # let the beat after the last connection pass, then measure a quiet stretch
    cpu_before, wall_before = cpu_seconds(watcher.proc.pid), time.monotonic()
    peak_rss = 0
    while time.monotonic() - wall_before < idle_seconds:
        peak_rss = max(peak_rss, proc_kb(watcher.proc.pid, 'VmRSS'))
        time.sleep(1)
    cpu = (cpu_seconds(watcher.proc.pid) - cpu_before) / (time.monotonic() - wall_before) * 100
    return connected, peak_rss / 1024, cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--messages', type=int, default=200)
    parser.add_argument('--accounts', type=int, default=1000)
    parser.add_argument('--idle-seconds', type=float, default=60)
    args = parser.parse_args()

    workdir = pathlib.Path(tempfile.mkdtemp(prefix='push-bench-'))
    environment(workdir)
    dovecot = BenchDovecot(workdir / 'dovecot')
    dovecot._start()
    processes = []
    try:
        import models
        import tasks
        models.migrate()
        grace = tasks.SETTINGS['watcher.recovery_grace']
        consumer = start(workdir, 'consumer', ['-m', 'huey.bin.huey_consumer', 'tasks.huey', '-w', '2',
                                                 '-k', 'process', '--no-periodic'])
        web = start(workdir, 'web', ['emailsvc.py', 'web'])
        watcher = start(workdir, 'watcher', ['watcher.py'], EMAILSVC_LOG_LEVEL='INFO')   # says 'started'
        processes += [consumer, web, watcher]
        web_port = int(os.environ['EMAILSVC_SERVER_PORT'])
        wait(lambda: web.alive() and services._answers(web_port, b'HTTP', b'GET /health HTTP/1.0\r\n\r\n'),
             60, 'the web server')

        notify = statistics.median(measure_notify_delay(dovecot))
        print(f'baseline: Dovecot announces an APPEND to an IDLE client after {notify:.3f} s (median of 20; '
              f'mailbox-watch.c waits NOTIFY_DELAY_MSECS 500 for more changes)')
        print(f'push latency: {args.messages} APPENDs to a watched INBOX; from the APPEND until readable over '
              f'the API, until its message.created webhook was delivered and verified, and until both', flush=True)
        readable, delivered, chain = measure_latency(models, dovecot, web_port, args.messages)
        for name, latencies in (('readable', readable), ('webhook', delivered), ('chain', chain)):
            print(f'  {name:9} ' + '  '.join(f'p{round(f * 100)} {percentile(latencies, f):.3f} s'
                                             for f in (0.5, 0.95, 0.99)) +
                  f'  max {max(latencies):.3f} s  mean {statistics.mean(latencies):.3f} s')
        p50, p95, p99 = (percentile(chain, f) for f in (0.5, 0.95, 0.99))
        print(f'  (the seed polls: up to 300 s; chain p95 {300 / p95:.0f}x sooner; the service adds '
              f'{p50 - notify:.3f} s to Dovecot\'s announcement at the median)')

        consumer.stop()
        print(f'capacity: one watcher, {args.accounts} accounts IDLE on one Dovecot', flush=True)
        connected, rss_mb, cpu = measure_capacity(models, dovecot, watcher, args.accounts, args.idle_seconds)
        print(f'  every account idling {connected:.1f} s after the accounts were made; over {args.idle_seconds:.0f} s '
              f'idle: RSS {rss_mb:.1f} MB, CPU {cpu:.2f} % of one core')

        print(f'takeover: SIGKILL the watcher holding every account; a second one, started after, takes them '
              f'over (recovery_grace {grace:g} s)', flush=True)
        watcher.kill()   # with every account's lease; the second starts after, as a supervisor would
        killed = time.monotonic()
        second = start(workdir, 'watcher-2', ['watcher.py'], EMAILSVC_LOG_LEVEL='INFO')
        processes.append(second)
        wait(lambda: second.alive() and all_idling(models, args.accounts, second.proc.pid), DEADLINE,
             'the second watcher to idle on every account')
        takeover = time.monotonic() - killed
        print(f'  every account idling under the second watcher {takeover:.1f} s after the kill')
    finally:
        for process in reversed(processes):
            process.stop()
        dovecot.stop()
        if not os.environ.get('PUSH_BENCH_KEEP'):
            shutil.rmtree(workdir, ignore_errors=True)

    print(f'push latency (readable and webhook verified) p95 <= {TARGET_P95:g} s ({p95:.3f} s) '
          f'{"met" if p95 <= TARGET_P95 else "NOT MET"}')
    print(f'push latency (readable and webhook verified) p99 <= {TARGET_P99:g} s ({p99:.3f} s) '
          f'{"met" if p99 <= TARGET_P99 else "NOT MET"}')
    print(f'watcher RSS with {args.accounts} accounts <= {TARGET_RSS_MB} MB ({rss_mb:.1f} MB) '
          f'{"met" if rss_mb <= TARGET_RSS_MB else "NOT MET"}')
    print(f'watcher CPU idle with {args.accounts} accounts <= {TARGET_CPU_PERCENT:g} % of one core ({cpu:.2f} %) '
          f'{"met" if cpu <= TARGET_CPU_PERCENT else "NOT MET"}')
    print(f'takeover of {args.accounts} accounts <= recovery_grace + {TAKEOVER_SLACK:g} s ({takeover:.1f} s of '
          f'{grace + TAKEOVER_SLACK:g}) {"met" if takeover <= grace + TAKEOVER_SLACK else "NOT MET"}')


if __name__ == '__main__':
    main()
