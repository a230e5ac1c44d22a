"""Test harness: real servers, a real consumer and a real web server.

EMAILSVC_TEST_MODE=embedded (SQLite queue and database) or scaleout (Redis and
PostgreSQL, started here on loopback). The environment is set in
pytest_configure, before any test module imports `tasks`, which reads it.
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
from cryptography.fernet import Fernet

from tests import services

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / 'shared' / 'corpus'
MODE = os.environ.get('EMAILSVC_TEST_MODE', 'embedded')
STATE = {}

# Short delays and limits so retry, timeout and heartbeat behaviour shows in seconds.
TEST_SETTINGS = {
    'EMAILSVC_RETRY_BASE_DELAY': '0.4',
    'EMAILSVC_RETRY_JITTER': '0.2',
    'EMAILSVC_LIMITS_DEFAULT_SOFT': '2',
    'EMAILSVC_LIMITS_DEFAULT_HARD': '4',
    'EMAILSVC_CONSUMER_HEARTBEAT_SECONDS': '0.5',
    'EMAILSVC_CONSUMER_ALIVE_SECONDS': '3',
    'EMAILSVC_CONSUMER_RECOVERY_GRACE': '2',
    'EMAILSVC_LOG_LEVEL': 'INFO',
    'EMAILSVC_MAIL_SYNC_BATCH': '50',
    'EMAILSVC_MAIL_MAX_ATTACHMENT_MB': '1',
    # The private mail servers listen on loopback, which the egress policy refuses by default.
    'EMAILSVC_SECURITY_ALLOWED_NETWORKS': '127.0.0.0/8',
    # Webhook retries in a second or two, not minutes; a dead run's endpoint free again in seconds.
    'EMAILSVC_WEBHOOKS_RETRY_BASE': '0.3',
    'EMAILSVC_WEBHOOKS_RETRY_MAX': '1.5',
    'EMAILSVC_WEBHOOKS_LEASE_SECONDS': '5',
}


def pytest_configure(config):
    if MODE not in ('embedded', 'scaleout'):
        raise pytest.UsageError(f'EMAILSVC_TEST_MODE must be embedded or scaleout, got {MODE!r}')
    workdir = pathlib.Path(tempfile.mkdtemp(prefix=f'emailsvc-{MODE}-'))
    STATE['workdir'] = workdir
    env = dict(TEST_SETTINGS,
               EMAILSVC_CONFIG=str(workdir / 'absent.ini'),
               EMAILSVC_VAR=str(workdir / 'var'),
               EMAILSVC_SERVER_SECRET='test-secret-' + os.urandom(16).hex(),
               EMAILSVC_SECURITY_CREDENTIAL_KEYS=Fernet.generate_key().decode())
    # Every test session shares one private Dovecot; the consumer trusts its certificate.
    STATE['dovecot'] = services.start_dovecot(workdir / 'dovecot')
    STATE['smtp'] = services.start_smtp(workdir / 'smtp')
    env['EMAILSVC_MAIL_CA_FILES'] = f'{STATE["dovecot"].cert_path},{STATE["smtp"].cert_path}'
    env['EMAILSVC_MAIL_TIMEOUT'] = '5'
    if MODE == 'scaleout':
        STATE['redis'] = services.start_redis(workdir / 'redis')
        STATE['postgres'] = services.start_postgres(workdir / 'postgres')
        env.update(EMAILSVC_QUEUE_URL=STATE['redis'].url, EMAILSVC_DATABASE_URL=STATE['postgres'].url)
    else:
        env.update(EMAILSVC_QUEUE_URL=f'sqlite:///{workdir}/var/queue.db',
                   EMAILSVC_DATABASE_URL=f'sqlite:///{workdir}/var/emailsvc.db')
    os.environ.update(env)
    STATE['env'] = env


def pytest_unconfigure(config):
    for name in ('redis', 'postgres', 'dovecot', 'smtp'):
        if name in STATE:
            STATE[name].stop()
    if 'workdir' in STATE and not os.environ.get('EMAILSVC_TEST_KEEP'):  # keep logs for a post-mortem
        shutil.rmtree(STATE['workdir'], ignore_errors=True)


def pytest_report_header(config):
    return f'emailsvc test mode: {MODE}'


# ---------------------------------------------------------------- waiting

def wait_for(condition, timeout=10.0, interval=0.02, message='condition'):
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds.
    `message` may be a function, called at the timeout, to say how things stand then."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout}s waiting for '
                                 f'{message() if callable(message) else message}')
        time.sleep(interval)


def every_page(api, path, key, pages=10):
    """Follow next_cursor from `path` (which has a query string) and return every item's `key`, in order."""
    seen, cursor = [], ''
    for _ in range(pages):
        page = api.get(f'{path}{cursor}').json
        seen += [item[key] for item in page['items']]
        if not page['next_cursor']:
            break
        cursor = f'&cursor={page["next_cursor"]}'
    return seen


def record(task_id):
    import models
    with models.all_tenants():
        return models.TaskRecord.get_or_none(models.TaskRecord.id == task_id)


def wait_for_state(task_id, *states, timeout=10.0):
    """The task's ledger record once it is in one of `states`."""
    def reached():
        row = record(task_id)
        return row if row is not None and row.state in states else None
    def how_it_stands():
        row = record(task_id)
        now = f'{row.state}, attempt {row.attempts}, error {row.error!r}' if row else 'no record'
        return f'task {task_id} to reach {states} (at the timeout: {now})'
    return wait_for(reached, timeout, message=how_it_stands)


# ---------------------------------------------------------------- database

@pytest.fixture(scope='session', autouse=True)
def database():
    import models
    import tasks  # noqa: F401  (initialises the database from the environment)
    models.migrate()
    return models.database


@pytest.fixture(scope='session')
def db_url():
    return os.environ['EMAILSVC_DATABASE_URL']


# ---------------------------------------------------------------- processes

def lane_workers(count, only=None):
    """Environment giving each lane (or those in `only`; the others 0) `count` workers."""
    from mailkit import settings
    return {settings.env_name(key): str(count if only is None or key.split('.', 1)[1] in only else 0)
            for key, *_ in settings.SETTINGS if key.startswith('lanes.')}


def python_env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED='1')
    env.update(extra)
    return env


class Consumer:
    """`huey_consumer tests.probe_tasks.huey` as a real process tree."""

    def __init__(self, workdir):
        self.log = workdir / 'consumer.log'
        self.proc = None

    def start(self, workers=None):
        # Every lane's workers, not fewer: a SIGINT before Huey's consumer has forked them all and set its
        # signal handlers kills its main process alone, and the workers forked so far go on taking tasks.
        if workers is None:
            import tasks
            workers = sum(tasks.huey.lane_workers.values())
        # --no-periodic: at each five-minute mark periodic_sync would queue a sync of
        # every account the suite has made so far (hundreds, many on hosts that do
        # not exist), at the top priority, and a test's own tasks would wait behind
        # them for minutes. Tests run periodic_sync themselves.
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'huey.bin.huey_consumer', 'tests.probe_tasks.huey',
             '-k', 'process', '-c', '1', '--no-periodic'],
            cwd=ROOT, env=python_env(), stdout=self.log.open('ab'), stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group, so kill() can end the whole tree
        wait_for(lambda: self.alive_workers() >= workers, timeout=20, message='consumer workers to heartbeat')
        return self

    def alive_workers(self):
        import models
        if self.proc.poll() is not None:
            raise AssertionError(f'consumer exited with {self.proc.returncode}; see {self.log}')
        return models.ConsumerHeartbeat.select().where(
            models.ConsumerHeartbeat.consumer_pid == self.proc.pid).count()

    def worker_pids(self):
        import models
        return [hb.pid for hb in models.ConsumerHeartbeat.select().where(
            models.ConsumerHeartbeat.consumer_pid == self.proc.pid)]

    def kill(self):
        """SIGKILL the consumer and its workers at once, as an OOM killer or a power cut would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self, sig=signal.SIGINT, timeout=20):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:   # the whole group: a worker left behind would take later tests' tasks
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope='session')
def consumer_process():
    consumer = Consumer(STATE['workdir']).start()
    yield consumer
    consumer.stop()


@pytest.fixture
def consumer(consumer_process):
    """The session's consumer, (re)started if a test stopped it or it died."""
    if consumer_process.proc is not None and consumer_process.proc.poll() is not None:
        consumer_process.proc = None
    if consumer_process.proc is None:
        consumer_process.start()
    return consumer_process


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body
        self.text = body.decode('utf-8', 'replace')

    @property
    def json(self):
        return json.loads(self.body)


class Client:
    """A small HTTP client for the real web server."""

    def __init__(self, base, key=None):
        self.base, self.key = base, key

    def as_key(self, key):
        return Client(self.base, key)

    def request(self, method, path, body=None, headers=None, raw=None, timeout=15):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if self.key:
            request.add_header('Authorization', f'Bearer {self.key}')
        if body is not None:
            request.add_header('Content-Type', 'application/json')
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return Response(resp.status, resp.headers, resp.read())
        except urllib.error.HTTPError as err:
            return Response(err.code, err.headers, err.read())

    def get(self, path, **kw):
        return self.request('GET', path, **kw)

    def post(self, path, body=None, **kw):
        return self.request('POST', path, body, **kw)

    def patch(self, path, body=None, **kw):
        return self.request('PATCH', path, body, **kw)

    def delete(self, path, **kw):
        return self.request('DELETE', path, **kw)


class WebServer:
    def __init__(self, workdir, name='web', **env):
        self.port = services.free_port()
        self.log = workdir / f'{name}.log'
        self.proc = subprocess.Popen(
            [sys.executable, 'emailsvc.py', 'web'], cwd=ROOT,
            env=python_env(EMAILSVC_SERVER_PORT=str(self.port), **env),
            stdout=self.log.open('ab'), stderr=subprocess.STDOUT)
        self.client = Client(f'http://127.0.0.1:{self.port}')
        wait_for(self.answers, timeout=20, message='web server to answer /health')

    def answers(self):
        if self.proc.poll() is not None:
            raise AssertionError(f'web server exited with {self.proc.returncode}; see {self.log}')
        try:
            return self.client.get('/health').status == 200
        except OSError:
            return False

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


@pytest.fixture(scope='session')
def web():
    server = WebServer(STATE['workdir'])
    yield server
    server.stop()


@pytest.fixture
def client(web):
    return web.client


# ---------------------------------------------------------------- tenants and keys

@pytest.fixture
def make_key():
    """make_key(tenant, user) -> a fresh API key (tenant and user created when new)."""
    import models

    def make(tenant_name=None, user_name='alice', operator=False):
        if operator:
            return models.ApiKey.issue(operator=True)[1]
        tenant, _ = models.Tenant.get_or_create(name=tenant_name)
        with models.tenant_scope(tenant.id):
            user = models.User.get_or_none(models.User.name == user_name) or models.User.create(name=user_name)
        return models.ApiKey.issue(tenant_id=tenant.id, user_id=user.id)[1]
    return make


@pytest.fixture
def unique():
    """A short name no other test uses (tenants persist for the session)."""
    return f't{os.urandom(4).hex()}'


def assert_api_error(resp, status, code):
    assert resp.status == status, resp.text
    assert resp.headers['Content-Type'].startswith('application/json')
    assert resp.json['error'] == code and resp.json['message']
