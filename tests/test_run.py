"""./run.sh on a fresh copy of the repository: installs, starts both processes, stops on Ctrl-C."""
import os
import shutil
import signal
import subprocess

import pytest

import tasks
from tests import services
from tests.conftest import ROOT, Client, wait_for


def fresh_copy(target):
    listed = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard'], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split('\n')
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope='module')
def started(tmp_path_factory):
    repo = fresh_copy(tmp_path_factory.mktemp('fresh') / 'emailsvc')
    port = services.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith('EMAILSVC_')}
    env['EMAILSVC_SERVER_PORT'] = str(port)
    log = (repo.parent / 'run.log').open('wb')
    proc = subprocess.Popen(['./run.sh'], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    client = Client(f'http://127.0.0.1:{port}')

    def healthy():
        if proc.poll() is not None:
            raise AssertionError(f'./run.sh exited with {proc.returncode}: {(repo.parent / "run.log").read_text()}')
        try:
            return client.get('/health/detailed').json['consumers']['alive'] >= 1
        except (OSError, KeyError, ValueError):
            return False
    try:
        wait_for(healthy, timeout=240, interval=0.2, message='./run.sh to serve /health with a live consumer')
        yield proc, client, repo
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_run_sh_serves_on_the_embedded_default(started):
    proc, client, repo = started
    assert client.get('/health').json == {'status': 'ok'}
    workers = sum(tasks.huey.lane_workers.values())   # every lane's, 2 each
    wait_for(lambda: client.get('/health/detailed').json['consumers']['workers'] == workers, timeout=60,
             message="every lane's workers to beat")
    assert client.get('/health/detailed').json['status'] == 'ok'
    assert (repo / 'var' / 'emailsvc.db').exists() and (repo / 'var' / 'queue.db').exists()
    output = (repo.parent / 'run.log').read_text()
    assert f'http://127.0.0.1:{client.base.rsplit(":", 1)[1]}/' in output and 'create-key' in output


def test_ctrl_c_stops_both(started):
    proc, client, repo = started
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    assert proc.wait(timeout=30) == 0
    def group_gone():
        return subprocess.run(['pgrep', '-g', str(proc.pid)], capture_output=True).returncode != 0
    wait_for(group_gone, timeout=10, interval=0.1, message='every process of ./run.sh to end after Ctrl-C')
