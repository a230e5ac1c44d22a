"""The container, tested without a Docker engine: the Dockerfile's promises, and its command
(./run.sh) run as a non-root user in a fresh var/ directory, stopped as `docker stop` stops it."""
import os
import pathlib
import pwd
import re
import signal
import subprocess
import sys

import pytest

import tasks
from tests import services
from tests.conftest import ROOT, Client, wait_for


def instructions(path):
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r'\\\n', ' ', path.read_text())
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.strip().startswith('#')]


def test_dockerfile_runs_run_sh_as_a_non_root_user_with_a_health_check():
    found = instructions(ROOT / 'Dockerfile')
    last = {name.upper(): args for name, args in found}
    assert re.match(r'python:3\.\d+-slim', last['FROM'])
    assert last['USER'] not in ('root', '0') and 'useradd' in dict(found)['RUN'] or \
        any('useradd' in args for name, args in found if name == 'RUN')
    assert last['CMD'] == '["./run.sh"]'
    assert last['STOPSIGNAL'] == 'SIGINT'   # the consumer's graceful signal: running tasks finish
    assert 'tasks", "ping"' in last['HEALTHCHECK'] or '/health/detailed' in last['HEALTHCHECK']
    assert '/app/var' in last['VOLUME'] and last['WORKDIR'] == '/app'
    names = [name.upper() for name, _ in found]
    assert names.index('USER') > max(i for i, n in enumerate(names) if n == 'RUN')  # nothing runs as root after


def test_compose_scales_out_with_redis_appendonly_and_postgres():
    text = (ROOT / 'compose.yaml').read_text()
    for needle in ('web:', 'consumer:', 'watcher:', '"./run.sh", "watcher"', 'redis:', 'postgres:', 'replicas: 2',
                   '--appendonly, "yes"',
                   'redis://redis:6379/0', 'postgresql://', 'stop_signal: SIGINT', 'EMAILSVC_SERVER_SECRET',
                   'EMAILSVC_SECURITY_CREDENTIAL_KEYS', 'service_completed_successfully'):
        assert needle in text, needle
    assert text.count('replicas: 2') == 3   # web, consumer, watcher


NOBODY = pwd.getpwnam('nobody')


@pytest.fixture(scope='module')
def container(tmp_path_factory):
    """./run.sh as `nobody`, with var/ in a fresh directory only that user may write."""
    var = tmp_path_factory.mktemp('container') / 'var'
    var.mkdir()
    os.chown(var, NOBODY.pw_uid, NOBODY.pw_gid)
    os.chmod(var.parent, 0o755)
    port = services.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith('EMAILSVC_')}
    env.update(EMAILSVC_VAR=str(var), EMAILSVC_SERVER_PORT=str(port), HOME=str(var),
               EMAILSVC_DATABASE_URL=f'sqlite:///{var}/emailsvc.db', EMAILSVC_QUEUE_URL=f'sqlite:///{var}/queue.db',
               EMAILSVC_CONSUMER_HEARTBEAT_SECONDS='0.5', EMAILSVC_CONSUMER_ALIVE_SECONDS='3',
               EMAILSVC_CONFIG=str(var / 'absent.ini'), PYTHONDONTWRITEBYTECODE='1')
    # Non-root, with read access to everything: this machine's venv points into /root/.pyenv (mode 0700),
    # which an image has no reason to do. Writes still need the ownership of a non-root user.
    as_nobody = ['setpriv', f'--reuid={NOBODY.pw_uid}', f'--regid={NOBODY.pw_gid}', '--clear-groups',
                 '--inh-caps=+dac_read_search', '--ambient-caps=+dac_read_search']
    log = (var.parent / 'run.log').open('wb')
    proc = subprocess.Popen([*as_nobody, './run.sh'], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = Client(f'http://127.0.0.1:{port}')

    def healthy():
        if proc.poll() is not None:
            raise AssertionError(f'./run.sh exited with {proc.returncode}: {(var.parent / "run.log").read_text()}')
        try:
            return client.get('/health/detailed').json['consumers']['alive'] >= 1
        except (OSError, KeyError, ValueError):
            return False
    try:
        wait_for(healthy, timeout=60, interval=0.1, message='./run.sh as nobody to serve with a live consumer')
        yield proc, client, env, as_nobody, var
    finally:
        if proc.poll() is None:  # a failed test: stop it as docker stop would, then for good
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def emailsvc(container, *args):
    proc, client, env, as_nobody, var = container
    return subprocess.run([*as_nobody, sys.executable, 'emailsvc.py', *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_runs_as_non_root_in_a_fresh_directory(container):
    proc, client, env, as_nobody, var = container
    assert client.get('/health').json == {'status': 'ok'}
    workers = sum(tasks.huey.lane_workers.values())   # every lane's, 2 each
    wait_for(lambda: client.get('/health/detailed').json['consumers']['workers'] == workers, timeout=30,
             message="every lane's workers to beat")
    assert client.get('/health/detailed').json['status'] == 'ok'
    owners = {path.stat().st_uid for path in var.iterdir()}
    assert owners == {NOBODY.pw_uid} and (var / 'emailsvc.db').exists() and (var / 'secret.key').exists()
    ping = emailsvc(container, 'tasks', 'ping')
    assert ping.returncode == 0 and 'pong' in ping.stdout, ping.stderr


def test_docker_stop_lets_tasks_finish_and_loses_nothing_then_the_health_check_fails(container):
    proc, client, env, as_nobody, var = container
    queued = emailsvc(container, 'tasks', 'queues', '--json')
    assert queued.returncode == 0
    enqueue = subprocess.run([*as_nobody, sys.executable, '-c',
                              'import tasks; print(" ".join(tasks.noop().id for _ in range(300)))'],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    ids = enqueue.stdout.split()
    assert len(ids) == 300, enqueue.stderr
    proc.send_signal(signal.SIGTERM)   # docker stop signals PID 1 alone: run.sh, not its process group
    assert proc.wait(timeout=60) == 0
    states = subprocess.run([*as_nobody, sys.executable, '-c',
                             'import sys, models, tasks\n'
                             'with models.all_tenants():\n'
                             '    rows = models.TaskRecord.select().where(models.TaskRecord.id.in_(sys.argv[1:]))\n'
                             '    print(" ".join(r.state for r in rows))\n'
                             'print(tasks.huey.queue_depth()["depth"])', *ids],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    lines = states.stdout.split('\n')
    found, depth = lines[0].split(), int(lines[1])
    assert len(found) == 300, states.stderr
    assert set(found) <= {'succeeded', 'pending'}   # none cut off running, none lost
    assert found.count('pending') == depth            # every one not run yet is still in the queue
    ping = emailsvc(container, 'tasks', 'ping')
    assert ping.returncode != 0 and 'no consumer answers' in ping.stderr
