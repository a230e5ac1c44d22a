"""Stopping the single-process-group service (`./run.sh`) never cuts a running task.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group, and
`docker stop` sends SIGTERM to run.sh; either way the consumer must get one
SIGINT (Huey's graceful stop) and let a running send finish. Each service here
is a real `./run.sh` in a process group of its own, on its own embedded
database and queue (in both test modes: what is tested is the signal path,
not the backends), sending to the session's SMTP server, which delivers and
then holds its 250 reply for 8 s; the group gets SIGINT once the message is
delivered and the worker waits for that reply.
"""
import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest

from tests import services
from tests.conftest import ROOT, STATE, Client, lane_workers, wait_for
from tests.test_sync import PASSWORD

STOPS = 10
REPLY_DELAY = 8


class Service:
    """`./run.sh` with its own var/ and port, in a process group of its own (as a terminal runs it)."""

    def __init__(self, workdir, name, ca_files):
        self.workdir = workdir / name
        self.port = services.free_port()
        var = self.workdir / 'var'
        self.env = {k: v for k, v in os.environ.items() if not k.startswith('EMAILSVC_')}
        self.env.update(EMAILSVC_VAR=str(var), EMAILSVC_CONFIG=str(self.workdir / 'absent.ini'),
                        EMAILSVC_SERVER_PORT=str(self.port), **lane_workers(1),
                        EMAILSVC_DATABASE_URL=f'sqlite:///{var}/emailsvc.db',
                        EMAILSVC_QUEUE_URL=f'sqlite:///{var}/queue.db',
                        EMAILSVC_MAIL_CA_FILES=ca_files,
                        EMAILSVC_MAIL_TIMEOUT='30', EMAILSVC_SECURITY_ALLOWED_NETWORKS='127.0.0.0/8',
                        PYTHONUNBUFFERED='1')
        self.workdir.mkdir(parents=True)
        self.log = self.workdir / 'run.log'
        self.proc = None

    def command(self, *args):
        proc = subprocess.run([sys.executable, 'emailsvc.py', *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def start(self):
        with open(self.log, 'ab') as log:
            self.proc = subprocess.Popen(['./run.sh'], cwd=ROOT, env=self.env, stdout=log, stderr=log,
                                         start_new_session=True)
        self.api = Client(f'http://127.0.0.1:{self.port}')
        wait_for(self.answers, timeout=60, message=f'./run.sh to answer on port {self.port}')

    def answers(self):
        try:
            return self.api.get('/health').status == 200
        except OSError:
            return False

    @staticmethod
    def wait_task(api, task_id, state, timeout=30):
        """The task's record over the service's API (`api` holds a key) once it is in `state`."""
        def reached():
            record = api.get(f'/api/v1/tasks/{task_id}').json
            return record if record['state'] == state else None
        return wait_for(reached, timeout=timeout, interval=0.05, message=f'task {task_id} to be {state}')

    def ctrl_c(self):
        """What a terminal does on Ctrl-C: SIGINT to every process of the foreground group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait_stopped(self, timeout=60):
        return self.proc.wait(timeout)

    def kill(self):
        """Stop it for good: Ctrl-C first, then SIGKILL to run.sh's group and to its children's, which
        run.sh starts in sessions of their own (setsid), so run.sh's group alone would leave them running."""
        if not self.proc or self.proc.poll() is not None:
            return
        children = child_pids(self.proc.pid)
        self.ctrl_c()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            for group in [self.proc.pid, *children]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
            self.proc.wait(10)


def child_pids(pid):
    listed = subprocess.run(['ps', '-o', 'pid=', '--ppid', str(pid)], capture_output=True, text=True).stdout
    return [int(line) for line in listed.split()]


def send_and_stop(service, smtp_server):
    """Start the service, send one mail, Ctrl-C while the server holds its 250; returns the outcome."""
    name = service.workdir.name
    service.command('admin', 'create-tenant', name)
    key = service.command('admin', 'create-key', '--tenant', name, '--user', 'alice').strip().splitlines()[-1]
    service.start()
    api = service.api.as_key(key)
    account = api.post('/api/v1/accounts', {
        'email': f'{name}@example.com', 'sync_enabled': False, 'copy_sent': False,
        'incoming': {'protocol': 'imap', 'host': '127.0.0.1', 'port': STATE['dovecot'].imap_port,
                     'security': 'none', 'username': name, 'password': PASSWORD},
        'smtp': {'host': '127.0.0.1', 'port': smtp_server.port, 'security': 'starttls',
                 'username': name, 'password': PASSWORD}})
    assert account.status == 201, account.text
    sent = api.post(f'/api/v1/accounts/{account.json["id"]}/send',
                    {'to': ['bob@example.net'], 'subject': f'stop test {name}', 'body_text': 'hello'})
    assert sent.status == 202, sent.text
    wait_for(lambda: delivered(smtp_server, name), timeout=60, message=f'{name}: the message to be delivered')
    service.ctrl_c()
    exit_code = service.wait_stopped()
    status = json.loads(service.command('tasks', 'status', sent.json['task_id']))
    return exit_code, status, delivered(smtp_server, name)


def delivered(smtp_server, name):
    return [m for m in smtp_server.received() if f'stop test {name}'.encode() in m['data']]


@pytest.fixture
def stop_smtp(tmp_path):
    """A private SMTP server whose every DATA reply waits REPLY_DELAY seconds after delivering."""
    server = services.start_smtp(tmp_path / 'smtp')
    server.delay_data_reply(REPLY_DELAY, times=STOPS)
    yield server
    server.stop()


def test_ctrl_c_during_sends_lets_every_send_finish_once(tmp_path, stop_smtp):
    for n in range(STOPS):
        stop_smtp.add_user(f'stop{n}', PASSWORD)
    # Only this SMTP server's certificate: two self-signed ones with one subject fail together.
    stopping = [Service(tmp_path, f'stop{n}', str(stop_smtp.cert_path)) for n in range(STOPS)]
    try:
        with concurrent.futures.ThreadPoolExecutor(STOPS) as pool:   # in parallel: 10 runs in ~20 s, not ~2 min
            outcomes = list(pool.map(lambda service: send_and_stop(service, stop_smtp), stopping))
    finally:
        for service in stopping:
            service.kill()
    for (exit_code, status, copies), service in zip(outcomes, stopping):
        assert exit_code == 0, service.log.read_text()[-2000:]
        assert (status['state'], status['attempts'], len(copies)) == ('succeeded', 1, 1), status
