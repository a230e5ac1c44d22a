"""`admin backup` while the service runs, a restore from it, and `admin generate-secrets`.

The backup is taken from a live `./run.sh` (its own embedded var/, in both test
modes: SQLite's online backup is what is tested) and restored into a fresh
var/ of a second service, which must answer the same key, list the same
account and decrypt its stored password (a sync succeeds).
"""
import configparser
import os
import shutil
import stat
import subprocess
import sys

from cryptography.fernet import Fernet

from mailkit import settings as settings_mod
from tests.conftest import MODE, ROOT, STATE
from tests.test_stop import Service
from tests.test_sync import PASSWORD, Mailbox


def ca_files():
    return f'{STATE["dovecot"].cert_path},{STATE["smtp"].cert_path}'


def run(env, *args):
    return subprocess.run([sys.executable, 'emailsvc.py', *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_backup_while_running_restores_into_a_fresh_service(tmp_path):
    mailbox = Mailbox(STATE['dovecot'], f'bk{os.urandom(3).hex()}')
    mailbox.append(b'From: a@example.com\r\nSubject: kept in the backup\r\n\r\nhello\r\n')
    original = Service(tmp_path, 'original', ca_files())
    restored = Service(tmp_path, 'restored', ca_files())
    try:
        original.command('admin', 'create-tenant', 'acme')
        key = original.command('admin', 'create-key', '--tenant', 'acme', '--user', 'alice').splitlines()[-1]
        original.start()
        api = original.api.as_key(key)
        account = api.post('/api/v1/accounts', {
            'email': 'alice@example.com', 'sync_enabled': False,
            'incoming': {'protocol': 'imap', 'host': '127.0.0.1', 'port': STATE['dovecot'].imaps_port,
                         'security': 'tls', 'username': mailbox.user, 'password': PASSWORD}})
        assert account.status == 201, account.text

        backup = tmp_path / 'backups' / 'today'
        out = original.command('admin', 'backup', str(backup))   # while it runs
        assert 'backed up while running' in out
        assert stat.S_IMODE(backup.stat().st_mode) == 0o700
        files = sorted(p.name for p in backup.iterdir())
        assert files == ['emailsvc.db', 'fernet.key', 'queue.db', 'secret.key'], files
        assert all(stat.S_IMODE((backup / name).stat().st_mode) == 0o600 for name in files)
        refused = subprocess.run([sys.executable, 'emailsvc.py', 'admin', 'backup', str(backup)], cwd=ROOT,
                                 env=original.env, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and 'not an empty directory' in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1

        var = restored.workdir / 'var'
        var.mkdir()
        for name in files:
            shutil.copy2(backup / name, var / name)
        restored.start()
        again = restored.api.as_key(key)
        listed = again.get('/api/v1/accounts').json['items']
        assert [a['email'] for a in listed] == ['alice@example.com']
        sync = again.post(f'/api/v1/accounts/{listed[0]["id"]}/sync', {})
        assert sync.status == 202, sync.text
        record = Service.wait_task(again, sync.json['task_id'], 'succeeded')   # the restored key decrypts
        assert record['result']['messages_synced'] == 1
    finally:
        original.kill()
        restored.kill()


def test_backup_of_postgres_and_redis_says_what_to_use(tmp_path):
    env = dict(os.environ)
    if MODE != 'scaleout':   # settings only: nothing connects to these
        env.update(EMAILSVC_DATABASE_URL='postgresql://u:p@127.0.0.1:1/db', EMAILSVC_QUEUE_URL='redis://127.0.0.1:1/0')
    proc = run(env, 'admin', 'backup', str(tmp_path / 'b'))
    assert proc.returncode == 1 and 'pg_dump' in proc.stderr and 'Redis' in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / 'b').exists()


def test_generate_secrets_prints_a_working_secret_and_key(tmp_path):
    first, second = (run(dict(os.environ), 'admin', 'generate-secrets') for _ in range(2))
    assert first.returncode == 0, first.stderr
    values = dict(line.split('=', 1) for line in first.stdout.splitlines() if not line.startswith('#'))
    assert set(values) == {'EMAILSVC_SERVER_SECRET', 'EMAILSVC_SECURITY_CREDENTIAL_KEYS'}
    assert len(values['EMAILSVC_SERVER_SECRET']) >= 32
    Fernet(values['EMAILSVC_SECURITY_CREDENTIAL_KEYS'])   # a valid key
    assert first.stdout != second.stdout

    ini = run(dict(os.environ), 'admin', 'generate-secrets', '--ini').stdout
    config = tmp_path / 'config.ini'
    config.write_text(ini)
    parsed = configparser.ConfigParser()
    parsed.read_string(ini)
    loaded = settings_mod.load(config, environ={
        'EMAILSVC_VAR': str(tmp_path / 'var'), 'EMAILSVC_DATABASE_URL': 'postgresql://u:p@h/db',
        'EMAILSVC_QUEUE_URL': 'redis://h:6379/0'})   # scaled out: nothing generated, both required
    assert loaded['server.secret'] == parsed['server']['secret']
    assert loaded['security.credential_keys'] == parsed['security']['credential_keys']
