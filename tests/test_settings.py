"""Configuration: defaults, overrides, and one-line errors at start-up."""
import os
import stat
import subprocess
import sys

import pytest

from mailkit import settings
from tests.conftest import ROOT

EMBEDDED = {'EMAILSVC_DATABASE_URL': 'sqlite:///var/x.db', 'EMAILSVC_QUEUE_URL': 'sqlite:///var/q.db'}


def load(tmp_path, text='', **env):
    path = tmp_path / 'config.ini'
    path.write_text(text)
    return settings.load(path, dict({'EMAILSVC_VAR': str(tmp_path / 'var')}, **env))


def test_zero_configuration_works_and_generates_secrets_privately(tmp_path):
    values = load(tmp_path)
    assert values['server.port'] == 8080 and values['database.url'] == 'sqlite:///var/emailsvc.db'
    for name in ('secret.key', 'fernet.key'):
        assert stat.S_IMODE(os.stat(tmp_path / 'var' / name).st_mode) == 0o600
    assert load(tmp_path)['server.secret'] == values['server.secret']  # kept, not regenerated


def test_environment_overrides_the_file(tmp_path):
    values = load(tmp_path, '[server]\nport = 9000\n', EMAILSVC_SERVER_PORT='9100')
    assert values['server.port'] == 9100
    assert load(tmp_path, '[server]\nport = 9000\n')['server.port'] == 9000


def test_every_setting_is_documented_in_config_ini():
    text = (ROOT / 'config.ini').read_text()
    for key, _, default, meaning in settings.SETTINGS:
        section, name = key.split('.')
        assert f'[{section}]' in text and f'# {name} =' in text and meaning in text, key


@pytest.mark.parametrize('text, env, expected', [
    ('[server]\nport = eighty\n', {}, "[server] port must be an integer, got 'eighty'; fix it there or in EMAILSVC_SERVER_PORT"),
    ('', {'EMAILSVC_SERVER_PORT': 'x'}, "EMAILSVC_SERVER_PORT must be an integer, got 'x'"),
    ('[server]\nprot = 1\n', {}, '[server] prot is not a setting; remove it or fix the spelling'),
    ('[consumer]\nworker_type = fork\n', {}, '[consumer] worker_type must be one of process, thread'),
    ('[spam]\nthreshold = high\n', {}, "[spam] threshold must be 'model' or a number from 0 to 1"),
    ('[server\n', {}, 'cannot be read'),
    ('', {'EMAILSVC_QUEUE_URL': 'redis://127.0.0.1:1/0'}, '[server] secret is missing'),
    ('', {'EMAILSVC_DATABASE_URL': 'postgresql://u@h/d'}, '[security] credential_keys is missing'),
])
def test_bad_values_name_the_file_the_key_and_the_fix(tmp_path, text, env, expected):
    with pytest.raises(settings.ConfigError) as err:
        load(tmp_path, text, **env)
    assert expected in str(err.value)
    assert '\n' not in str(err.value)


def test_start_up_stops_with_one_line_not_a_traceback(tmp_path):
    env = dict(os.environ, EMAILSVC_SERVER_PORT='not-a-port')
    proc = subprocess.run([sys.executable, 'emailsvc.py', 'web'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "emailsvc: EMAILSVC_SERVER_PORT must be an integer, got 'not-a-port'; fix that variable"
