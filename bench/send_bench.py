"""Send benchmark: N sends through the HTTP API and the consumer to a local SMTP server.

Embedded mode, 2 process workers, the test suite's aiosmtpd server (STARTTLS +
AUTH) on loopback; one API client posting one send after another over a
kept-alive connection. Prints messages/s from the first API call until the
ledger shows every send finished, how many messages the server received,
which must equal N (no send lost, none delivered twice), and the CPU time per
message of each process, which says where the machine's 2 cores go. The Sent
copy to IMAP is off (copy_sent false), so the figure is SMTP delivery alone.

    ./run.sh bench send_bench [--n 1000]
"""
import argparse
import http.client
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import services  # noqa: E402

DEADLINE = 600


def wait_until(condition, timeout, what, poll=0.01):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f'timed out waiting for {what}')
        time.sleep(poll)


def process_tree_cpu(pid):
    """CPU seconds used so far by pid and its live descendants (the consumer's workers are processes)."""
    stats = {}
    for entry in pathlib.Path('/proc').iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / 'stat').read_text().rpartition(')')[2].split()
            except OSError:   # exited while we looked
                continue
            stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree = {pid}
    for _ in range(4):   # consumer -> workers is two levels; four is plenty
        tree |= {p for p, (parent, _) in stats.items() if parent in tree}
    return sum(stats[p][1] for p in tree if p in stats) / os.sysconf('SC_CLK_TCK')


class ApiClient:
    """One kept-alive HTTP connection, as an application posting many sends would hold."""

    def __init__(self, port, key):
        self.conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
        self.headers = {'Authorization': f'Bearer {key}', 'Content-Type': 'application/json'}

    def post(self, path, body):
        self.conn.request('POST', path, body=json.dumps(body), headers=self.headers)
        resp = self.conn.getresponse()
        answer = json.loads(resp.read())
        if resp.status >= 300:
            raise RuntimeError(f'POST {path}: {resp.status} {answer}')
        return answer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--n', type=int, default=1000)
    args = parser.parse_args()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix='send-bench-'))
    smtp = services.start_smtp(workdir / 'smtp')
    smtp.add_user('bench', 'bench-pw')
    from cryptography.fernet import Fernet
    env = {k: v for k, v in os.environ.items() if not k.startswith('EMAILSVC_')}
    env.update(EMAILSVC_VAR=str(workdir / 'var'), EMAILSVC_CONFIG=str(workdir / 'absent.ini'),
               EMAILSVC_DATABASE_URL=f'sqlite:///{workdir}/var/emailsvc.db',
               EMAILSVC_QUEUE_URL=f'sqlite:///{workdir}/var/queue.db', EMAILSVC_LOG_LEVEL='WARNING',
               EMAILSVC_SERVER_SECRET=os.urandom(24).hex(), EMAILSVC_MAIL_CA_FILES=str(smtp.cert_path),
               EMAILSVC_SECURITY_ALLOWED_NETWORKS='127.0.0.0/8',
               EMAILSVC_SECURITY_CREDENTIAL_KEYS=Fernet.generate_key().decode(), PYTHONPATH=str(ROOT))
    os.environ.update(env)
    import models
    import tasks  # noqa: F401  (opens the database named in the environment)
    from taskq import ledger
    models.migrate()
    port = services.free_port()
    procs = [subprocess.Popen([sys.executable, 'emailsvc.py', 'consumer'], cwd=ROOT, env=env,
                              stdout=open(workdir / 'consumer.log', 'wb'), stderr=subprocess.STDOUT),
             subprocess.Popen([sys.executable, 'emailsvc.py', 'web'], cwd=ROOT,
                              env=dict(env, EMAILSVC_SERVER_PORT=str(port)),
                              stdout=open(workdir / 'web.log', 'wb'), stderr=subprocess.STDOUT)]
    base = f'http://127.0.0.1:{port}'
    try:
        tenant = models.Tenant.create(name='bench')
        with models.tenant_scope(tenant.id):
            user = models.User.create(name='bench')
        key = models.ApiKey.issue(tenant_id=tenant.id, user_id=user.id)[1]

        def web_up():
            try:
                return urllib.request.urlopen(base + '/health', timeout=2).status == 200
            except OSError:
                return False
        wait_until(web_up, 60, 'the web server')
        wait_until(lambda: models.ConsumerHeartbeat.select().count() >= 2, 60, 'consumer workers')
        api = ApiClient(port, key)
        account = api.post('/api/v1/accounts', {
            'email': 'bench@example.com', 'copy_sent': False,
            'incoming': {'protocol': 'imap', 'host': '127.0.0.1', 'port': 1, 'security': 'none',
                         'username': 'bench', 'password': 'unused'},
            'smtp': {'host': '127.0.0.1', 'port': smtp.port, 'security': 'starttls',
                     'username': 'bench', 'password': 'bench-pw'}})['id']
        pids = {'web': procs[1].pid, 'consumer': procs[0].pid, 'smtp server': smtp.pid}
        before = {name: process_tree_cpu(pid) for name, pid in pids.items()}
        before['this client'] = sum(os.times()[:2])
        start = time.perf_counter()
        ids = [api.post(f'/api/v1/accounts/{account}/send', {
            'to': [f'rcpt{n}@example.net'], 'subject': f'bench {n}', 'body_text': 'hello ' * 200})['task_id']
            for n in range(args.n)]
        accepted = time.perf_counter() - start

        def done():   # every send_email of this fresh database is ours
            with models.all_tenants():
                return models.TaskRecord.select().where(models.TaskRecord.name == 'send_email',
                                                        models.TaskRecord.state.in_(ledger.FINAL_STATES)).count()
        wait_until(lambda: done() == args.n, DEADLINE, f'{args.n} sends to finish', poll=0.05)
        elapsed = time.perf_counter() - start
        with models.all_tenants():
            succeeded = models.TaskRecord.select().where(models.TaskRecord.id.in_(ids),
                                                         models.TaskRecord.state == 'succeeded').count()
        received = len(smtp.received())
        cpu = {name: process_tree_cpu(pid) - before[name] for name, pid in pids.items()}
        cpu['this client'] = sum(os.times()[:2]) - before['this client']
    finally:
        for proc in procs:
            proc.send_signal(2)
        for proc in procs:
            proc.wait(30)
        smtp.stop()
    print(f'send benchmark: {args.n} sends through the API (accepted in {accepted:.1f} s) and 2 process workers '
          f'to a local SMTP server (STARTTLS + AUTH)')
    print(f'  {args.n / elapsed:8.0f} messages/s   succeeded {succeeded}   received by the server {received}   '
          f'duplicates {max(0, received - args.n)}')
    print('  CPU per message: ' + ', '.join(f'{name} {seconds / args.n * 1000:.1f} ms' for name, seconds in cpu.items())
          + f' (the machine has {os.cpu_count()} cores)')
    print(f'>= 200 messages/s {"met" if args.n / elapsed >= 200 else "NOT MET"}')
    print(f'received == {args.n}, no duplicate {"met" if received == args.n else "NOT MET"}')


if __name__ == '__main__':
    main()
