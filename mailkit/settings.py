"""Settings: one table, read from config.ini and overridden by the environment.

Every row is `section.key`; `config.ini` documents each one with its default,
and `EMAILSVC_SECTION_KEY` in the environment wins over the file. Start-up
stops on the first bad value with one line that names where it came from, the
key and how to fix it. The embedded mode needs no configuration at all: the
signing secret and the credential key are generated into `var/` on first run.
"""
import configparser
import contextlib
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parent.parent
GENERATED = object()  # made on first run in the embedded mode, required otherwise

SETTINGS = (  # key, type, default, meaning
    ('server.host', str, '127.0.0.1', 'address the web server listens on'),
    ('server.port', int, 8080, 'port the web server listens on'),
    ('server.threads', int, 8, 'waitress worker threads'),
    ('server.max_body_kb', int, 10240, 'largest JSON request body accepted (413 beyond)'),
    ('server.max_request_body_mb', int, 30, 'largest request body waitress reads (413 before reading it); '
     'more than mail.max_attachment_mb'),
    ('server.connection_limit', int, 500, 'connections waitress keeps open at once (slow clients included); '
     'below the open-file limit, ulimit -n'),
    ('server.channel_timeout', int, 30, 'seconds a connection may send nothing, mid-request or idle, before it is closed'),
    ('server.secret', str, GENERATED, 'signs task payloads; 32+ random characters, the same on every host'),
    ('database.url', str, 'sqlite:///var/emailsvc.db', 'peewee db_url; postgresql://user:pw@host/db when scaled out'),
    ('queue.url', str, 'sqlite:///var/queue.db', 'huey storage; redis://host:6379/0 when scaled out'),
    ('queue.name', str, 'emailsvc', 'queue name (several services may share a Redis)'),
    ('queue.results_ttl', int, 3600, 'seconds a task result is kept in the broker'),
    ('queue.history_days', int, 30, 'days finished tasks stay in the ledger'),
    ('consumer.worker_type', str, 'process', 'process | thread'),
    ('consumer.heartbeat_seconds', float, 5.0, 'how often each worker reports it is alive'),
    ('consumer.alive_seconds', float, 20.0, 'a worker silent for longer counts as gone'),
    ('consumer.recovery_grace', float, 30.0, 'seconds a dead worker\'s tasks wait before they run again elsewhere'),
    ('consumer.startup_grace', float, 60.0, 'seconds after the web server starts during which no live consumer '
                                            'is not yet a health failure (the consumer may still be starting)'),
    ('consumer.max_tasks_per_worker', int, 1000, 'a worker process is replaced after this many tasks (0: never); '
                                                 "Huey's -M"),
    ('consumer.graceful_signal', str, 'INT', "INT | TERM: the signal that lets running tasks finish (the other one "
                                             "interrupts them and queues them again); Huey's -g"),
    ('consumer.shutdown_timeout', float, 60.0, 'seconds a graceful stop waits for running tasks before it '
                                               "interrupts them (0: wait for ever); Huey's -t"),
    # A lane is one row here: its worker processes in each consumer that serves it (0: none); tasks name
    # their lane (tasks.py), and a backlog in one lane never holds another.
    ('lanes.sync', int, 2, 'worker processes for sync_emails (user-requested syncs first, then periodic ones)'),
    ('lanes.send', int, 2, 'worker processes for send_email'),
    ('lanes.delete', int, 2, 'worker processes for delete_emails'),
    ('lanes.spam', int, 2, 'worker processes for check_spam and spam reports'),
    ('lanes.periodic', int, 2, 'worker processes for periodic_sync, cleanup and noop; its consumers run the '
                               'periodic schedule'),
    ('lanes.webhooks', int, 2, 'worker processes for webhook deliveries'),
    ('watcher.idle_seconds', float, 1500.0, 'seconds after which a watcher ends IDLE and begins it again, before '
                                            'the server drops an idle client (RFC 2177: at most 1740, 29 minutes)'),
    ('watcher.heartbeat_seconds', float, 5.0, 'how often a watcher renews its leases and reads accounts again '
                                              '(new, changed, deleted ones and new passwords)'),
    ('watcher.recovery_grace', float, 30.0, "seconds a dead watcher's accounts wait before another watcher "
                                            'takes them over'),
    ('watcher.max_backoff', float, 300.0, 'longest pause, in seconds, before a watcher reconnects to a failing '
                                          'server (doubling from 1 s, with jitter)'),
    ('health.max_wait_seconds', float, 900.0, '/health/detailed is degraded when the oldest waiting task has '
                                              'waited longer (0: no limit)'),
    ('metrics.allowed_networks', str, '', 'CIDR list (comma-separated) that may read /metrics without a key; '
                                          'empty: an operator key is always needed'),
    ('metrics.settle_seconds', float, 30.0, 'finished tasks older than this are rolled up into the stored '
                                            'counters; newer ones are counted live (covers clock skew between hosts)'),
    ('retry.base_delay', float, 5.0, 'seconds before the first retry; doubles each attempt'),
    ('retry.max_delay', float, 600.0, 'cap of the retry delay in seconds'),
    ('retry.jitter', float, 0.2, 'fraction of the delay drawn at random, so retries spread out'),
    ('limits.sync_emails_soft', int, 1800, 'seconds before sync_emails is told to stop'),
    ('limits.sync_emails_hard', int, 1860, 'seconds before the sync_emails worker is killed'),
    ('limits.send_email_soft', int, 120, 'seconds before send_email is told to stop'),
    ('limits.send_email_hard', int, 150, 'seconds before the send_email worker is killed'),
    ('limits.delete_emails_soft', int, 300, 'seconds before delete_emails is told to stop'),
    ('limits.delete_emails_hard', int, 330, 'seconds before the delete_emails worker is killed'),
    ('limits.check_spam_soft', int, 60, 'seconds before check_spam is told to stop'),
    ('limits.check_spam_hard', int, 75, 'seconds before the check_spam worker is killed'),
    ('limits.deliver_webhook_soft', int, 60, 'seconds before deliver_webhook is told to stop'),
    ('limits.deliver_webhook_hard', int, 90, 'seconds before the deliver_webhook worker is killed'),
    ('limits.default_soft', int, 300, 'soft limit of every other task'),
    ('limits.default_hard', int, 330, 'hard limit of every other task'),
    ('security.credential_keys', str, GENERATED, 'Fernet keys, comma-separated, newest first; the first encrypts'),
    ('security.allowed_networks', str, '', 'CIDR list (comma-separated) mail servers may be in although the '
                                           'defaults refuse it (loopback, link-local, metadata); 127.0.0.0/8 '
                                           'for a mail server on this machine'),
    ('security.denied_networks', str, '', 'CIDR list (comma-separated) mail servers may never be in (e.g. your '
                                          'private ranges: 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)'),
    ('mail.timeout', float, 30.0, 'seconds a mail server may take to answer before the attempt is retried'),
    ('mail.ca_files', str, '', 'extra CA certificates (PEM files, comma-separated) trusted for mail servers'),
    ('mail.sync_batch', int, 500, 'messages fetched and committed together during a sync'),
    ('mail.max_attachment_mb', int, 25, 'largest file POST /api/v1/attachments accepts (413 beyond)'),
    ('mail.max_message_mb', int, 35, 'largest message send accepts: bodies plus attachments'),
    ('mail.upload_quota_mb', int, 200, 'megabytes of uploads (POST /api/v1/attachments) one user may hold (413 beyond)'),
    ('mail.upload_ttl_hours', float, 24.0, 'hours after which an upload no queued send refers to is deleted'),
    ('sync.max_backoff', float, 21600.0, 'longest pause, in seconds, before periodic sync retries a failing account'),
    ('accounts.max_per_user', int, 100, 'mail accounts one user may add (409 account_limit beyond)'),
    ('api.idempotency_hours', float, 24.0, 'hours an Idempotency-Key of a send is remembered'),
    ('spam.model_path', str, 'data/spam_base.json', 'base spam model (python -m mailkit.spam_train makes it)'),
    ('spam.threshold', str, 'model', "spam_score from which a message is spam; 'model': the base model's own, "
                                     "chosen for <= 0.5 % false positives"),
    ('spam.auto_check', str, 'on', 'on | off: score newly synced inbox mail in the background'),
    ('events.retention_hours', float, 168.0, 'hours the change feed keeps events; an older cursor answers 410; '
                                             'keep it above webhooks.disable_after_hours, or a failing endpoint '
                                             'misses what it could still have been sent'),
    ('events.max_waiters', int, 4, 'long-polls (GET /api/v1/events?wait=N) one web process holds at once, each on '
                                   'a web thread; beyond it a request answers at once; below server.threads'),
    ('events.max_wait', float, 25.0, 'longest wait=N honoured, in seconds; below server.channel_timeout'),
    ('events.poll_interval', float, 0.2, 'seconds between the web process\'s checks for new events while '
                                         'long-polls wait (one query per check, whatever the number waiting)'),
    ('webhooks.timeout', float, 10.0, 'seconds a webhook target may take to answer before the attempt failed'),
    ('webhooks.retry_base', float, 5.0, 'seconds before the first retry of a failed delivery; doubles each time'),
    ('webhooks.retry_max', float, 3600.0, 'longest pause between retries of a failing endpoint, in seconds'),
    ('webhooks.disable_after_hours', float, 72.0, 'an endpoint failing this long is disabled (retries go on '
                                                  'until then)'),
    ('webhooks.log_hours', float, 72.0, 'hours the delivery log (GET /api/v1/webhooks/<id>/deliveries) keeps '
                                        'an attempt'),
    ('webhooks.batch', int, 200, 'events one delivery run reads at a time'),
    ('webhooks.run_seconds', float, 10.0, 'a delivery run hands its endpoint over to a fresh task after this '
                                          'long, so a backlog does not hold a worker'),
    ('webhooks.lease_seconds', float, 30.0, 'a delivery run whose worker died loses its endpoint after this long'),
    ('log.level', str, 'INFO', 'DEBUG | INFO | WARNING | ERROR'),
)
CHOICES = {
    'consumer.worker_type': ('process', 'thread'),
    'consumer.graceful_signal': ('INT', 'TERM'),
    'log.level': ('DEBUG', 'INFO', 'WARNING', 'ERROR'),
    'spam.auto_check': ('on', 'off'),
}


class ConfigError(Exception):
    """A setting is missing or malformed; the message says where and how to fix it."""


def env_name(key):
    return 'EMAILSVC_' + key.replace('.', '_').upper()


def config_path(environ=os.environ):
    return Path(environ.get('EMAILSVC_CONFIG') or ROOT / 'config.ini')


def load(path=None, environ=os.environ):
    """Read every setting: the file, then the environment, then defaults."""
    path = Path(path) if path else config_path(environ)
    file_values = read_file(path)
    values = {}
    for key, kind, default, _ in SETTINGS:
        source, raw = pick_source(key, path, file_values, environ)
        values[key] = default if raw is None else convert(key, kind, raw, source)
        check_choice(key, values[key], source)
    values['paths.var'] = Path(environ.get('EMAILSVC_VAR') or ROOT / 'var')
    fill_generated(values, path)
    return values


def read_file(path):
    if not path.exists():
        return {}
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path, encoding='utf-8')
    except configparser.Error as exc:
        raise ConfigError(f'{path}: cannot be read ({exc.message.splitlines()[0]}); fix the syntax') from exc
    known = {key for key, *_ in SETTINGS}
    values = {}
    for section in parser.sections():
        for name, raw in parser.items(section):
            key = f'{section}.{name}'
            if key not in known:
                raise ConfigError(f'{path}: [{section}] {name} is not a setting; remove it or fix the spelling')
            values[key] = raw
    return values


def pick_source(key, path, file_values, environ):
    section, name = key.split('.', 1)
    if env_name(key) in environ:
        return env_name(key), environ[env_name(key)]
    if key in file_values:
        return f'{path}: [{section}] {name}', file_values[key]
    return f'{path}: [{section}] {name}', None


def how_to_fix(key, source):
    return 'fix that variable' if source == env_name(key) else f'fix it there or in {env_name(key)}'


def convert(key, kind, raw, source):
    raw = raw.strip()
    if kind is str:
        return raw
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f'{source} must be {"an integer" if kind is int else "a number"}, '
                          f'got {raw!r}; {how_to_fix(key, source)}') from None


def is_threshold(value):
    try:
        return value == 'model' or 0 <= float(value) <= 1
    except ValueError:
        return False


def check_choice(key, value, source):
    if key == 'spam.threshold' and not is_threshold(value):
        raise ConfigError(f"{source} must be 'model' or a number from 0 to 1, got {value!r}; "
                          f'{how_to_fix(key, source)}')
    if key in ('metrics.allowed_networks', 'security.allowed_networks', 'security.denied_networks'):
        for item in listed(value):
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ConfigError(f'{source}: {item!r} is not a network (like 10.0.0.0/8 or 127.0.0.1); '
                                  f'{how_to_fix(key, source)}') from None
    if key.startswith('lanes.') and value < 0:
        raise ConfigError(f'{source} must be 0 or more worker processes, got {value}; {how_to_fix(key, source)}')
    if key == 'watcher.idle_seconds' and not 0 < value <= 1740:
        raise ConfigError(f'{source} must be more than 0 and at most 1740 seconds (RFC 2177 asks for a new IDLE '
                          f'at least every 29 minutes), got {value!r}; {how_to_fix(key, source)}')
    choices = CHOICES.get(key)
    if choices and value not in choices:
        raise ConfigError(f'{source} must be one of {", ".join(choices)}, got {value!r}; '
                          f'{how_to_fix(key, source)}')


def lanes(values):
    """{lane: worker processes} from the [lanes] rows, in the table's order."""
    return {key.split('.', 1)[1]: values[key] for key, *_ in SETTINGS if key.startswith('lanes.')}


def is_embedded(url):
    return url.startswith('sqlite:')


def fill_generated(values, path):
    """Generate the secrets of the embedded mode; require them when scaled out."""
    generators = {
        'server.secret': (values['queue.url'], 'secret.key', lambda: secrets.token_urlsafe(48)),
        'security.credential_keys': (values['database.url'], 'fernet.key', lambda: Fernet.generate_key().decode()),
    }
    for key, (url, filename, make) in generators.items():
        if values[key] is not GENERATED and values[key]:
            continue
        section, name = key.split('.', 1)
        if not is_embedded(url):
            raise ConfigError(f'{path}: [{section}] {name} is missing; with a shared '
                              f'{"queue" if key == "server.secret" else "database"} every host needs '
                              f'the same value: set it there or in {env_name(key)}')
        values[key] = read_or_create_secret(values['paths.var'] / filename, make)


def make_private_dir(path):
    """Create `path` (var/, say) readable by this user only; an existing one is left as it is."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def make_private_file(path):
    """Create an empty `path` with mode 0600 (and its directory 0700) unless it exists.

    SQLite makes a new database file, and its -wal and -shm beside it, with the
    umask's mode (0644: readable by every local user); made here first, they
    all get 0600, since SQLite gives its journals the database file's mode.
    """
    make_private_dir(path.parent)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def read_or_create_secret(path, make):
    """Return the secret in `path`, creating it (mode 0600) on first run."""
    make_private_dir(path.parent)
    if not path.exists():
        # Written aside and linked into place, so a web server and a consumer
        # starting together never read a half-written file or make two keys.
        temp = path.with_name(f'.{path.name}.{os.getpid()}')
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, 'w') as handle:
            handle.write(make() + '\n')
        with contextlib.suppress(FileExistsError):  # the other process won: use its key
            os.link(temp, path)
        temp.unlink()
    return path.read_text().strip()


def listed(value):
    """The items of a comma-separated setting, blanks dropped: 'a, b,' -> ['a', 'b']."""
    return [item.strip() for item in value.split(',') if item.strip()]


def sqlite_path(url):
    """The file of a sqlite:/// URL, relative paths taken from the project root."""
    path = url.split(':///', 1)[1]
    return Path(path) if path.startswith('/') else ROOT / path


def describe():
    """config.ini's text: every setting with its default and meaning."""
    lines, section = [], None
    for key, _, default, meaning in SETTINGS:
        sec, name = key.split('.', 1)
        if sec != section:
            lines.append(f'\n[{sec}]')
            section = sec
        lines.append(f'# {meaning} ({env_name(key)})')
        shown = '' if default is GENERATED else default
        lines.append(f'# {name} = {shown}')
    return '\n'.join(lines).lstrip() + '\n'
