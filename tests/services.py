"""Real servers for the tests and benchmarks: Redis, PostgreSQL, Dovecot, SMTP.

Each start_*(workdir) picks free ports on 127.0.0.1, keeps all its state
under workdir, waits until the server answers and returns a handle with its
address, its PID, stop() and restart(). stop() signals that PID and waits for
the process to exit. Servers run in the foreground as our children, so we can
reap them; one left running when the interpreter exits is stopped then.

A missing server is a ServiceError that says what to install, never a skip.
Nothing here is a pytest fixture: conftest.py and bench/ wrap these.
"""

import atexit
import contextlib
import ctypes
import datetime
import glob
import importlib.util
import ipaddress
import json
import os
import pathlib
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import stat
import string
import subprocess
import sys
import tempfile
import time

import psycopg2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests import smtp_server

HOST = '127.0.0.1'
READY_TIMEOUT = 30   # seconds; PostgreSQL's initdb on a slow disk is the slowest
STOP_TIMEOUT = 15
REPO = pathlib.Path(__file__).resolve().parents[1]
PR_SET_CHILD_SUBREAPER = 36   # <linux/prctl.h>


class ServiceError(RuntimeError):
    """A server is missing or will not start; the message says what to do."""


# ---------------------------------------------------------------- helpers

_ports_handed_out: set[int] = set()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on and that this process has not handed out yet."""
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port not in _ports_handed_out:   # the kernel may offer a just-closed port again
            _ports_handed_out.add(port)
            return port


def _require(program: str, package: str, *dirs: str) -> str:
    """The path of program, or a ServiceError that says how to install it."""
    search = os.pathsep.join([*dirs, os.environ.get('PATH', ''), '/usr/sbin', '/sbin'])
    path = shutil.which(program, path=search)
    if not path:
        raise ServiceError(f'{program} not found: apt-get install {package} (./run.sh test installs it)')
    return path


def _tail(log: pathlib.Path, lines: int = 6) -> str:
    """The end of a server's log on one line, for error messages."""
    text = log.read_text(errors='replace') if log.exists() else ''
    return ' | '.join(line for line in text.splitlines()[-lines:] if line.strip()) or f'{log} is empty'


def _system_user(name: str, package: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise ServiceError(f'system user {name} is missing: apt-get install {package}') from None


def _let_others_traverse(path: pathlib.Path) -> None:
    """Let service users (postgres, the mail user) reach files under path.

    pytest and mkdtemp create their directories 0700 and root owns them; add
    search permission (x, not read) for others where it is missing. pytest
    resets its own base directory to 0700 on the next run.
    """
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(directory, mode | stat.S_IXOTH)


def _chown(path: pathlib.Path, user: pwd.struct_passwd) -> None:
    os.chown(path, user.pw_uid, user.pw_gid)


def _as_user(user: pwd.struct_passwd | None) -> dict:
    """Popen arguments that run the child as user (and none of root's groups)."""
    return dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[]) if user else {}


def _answers(port: int, expect: bytes, send: bytes = b'') -> bool:
    """True once the server on port sends what starts with expect (after we send `send`)."""
    try:
        with socket.create_connection((HOST, port), timeout=2) as sock:
            sock.sendall(send)
            return sock.recv(len(expect)) == expect
    except OSError:   # not listening yet
        return False


def make_cert(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A self-signed certificate for 127.0.0.1 and localhost; returns (cert_path, key_path)."""
    key = ec.generate_private_key(ec.SECP256R1())   # milliseconds, where RSA takes a noticeable fraction of a second
    # A distinct subject per certificate: OpenSSL finds a trusted certificate by
    # subject, so two test servers trusted at once must not share one.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f'{directory.name}-{os.urandom(4).hex()}')])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName('localhost')]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / 'cert.pem', directory / 'key.pem'
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def trusting(cert_path) -> ssl.SSLContext:
    """A client context that trusts cert_path and nothing else, hostname checks on."""
    return ssl.create_default_context(cafile=str(cert_path))


# ---------------------------------------------------------------- processes

def _live_members(pgid: int) -> dict[int, str]:
    """{pid: command name} of the processes in group pgid that are not zombies."""
    members = {}
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            stat_line = (pathlib.Path('/proc', entry) / 'stat').read_text()
        except (FileNotFoundError, ProcessLookupError):   # exited while we looked
            continue
        command, rest = stat_line[stat_line.index('(') + 1:].rsplit(')', 1)
        state, _ppid, group = rest.split()[:3]
        if group == str(pgid) and state != 'Z':
            members[int(entry)] = command
    return members


def _end_group(pgid: int, sig: signal.Signals, only: set[str] | None = None) -> None:
    """Send sig to the live processes in group pgid (those whose command is in `only`, if given)
    and wait until they have exited."""
    deadline = time.monotonic() + STOP_TIMEOUT
    signalled = set()
    while members := {pid for pid, command in _live_members(pgid).items() if only is None or command in only}:
        if time.monotonic() > deadline:
            raise ServiceError(f'processes {sorted(members)} of group {pgid} survive {sig.name}')
        for pid in members - signalled:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:   # exited since we looked: what we wanted
                continue
            signalled.add(pid)
        time.sleep(0.01)


@contextlib.contextmanager
def _adopting_orphans():
    """Inside, processes orphaned below us become our children (Linux PR_SET_CHILD_SUBREAPER)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    if prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), 'prctl(PR_SET_CHILD_SUBREAPER) failed')
    try:
        yield
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _reap(pid: int) -> None:
    """Collect the exit status of pid if it is our (adopted) child; its old parent may have done so already."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:   # not ours: the server's master reaped it before exiting
        return


_running: set['_Server'] = set()


class _Server:
    """A server process we started and stop by PID."""

    name = 'server'
    stop_signal = signal.SIGTERM
    proc: subprocess.Popen | None = None
    pid = 0
    log: pathlib.Path

    def _start(self) -> None:
        raise NotImplementedError

    def _launch(self, cmd: list[str], ready, *, cwd=None, user=None) -> None:
        """Run cmd with output to self.log and return once ready() is true."""
        with open(self.log, 'ab') as out:   # a file, not a pipe: nobody would read a pipe after start-up
            self.proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         # A session of its own: a Ctrl-C in the terminal reaches only
                                         # pytest, whose teardown then stops the servers in order.
                                         start_new_session=True, **_as_user(user))
        self.pid = self.proc.pid
        _running.add(self)
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready():
            problem = (f'exited with status {self.proc.returncode}' if self.proc.poll() is not None
                       else f'not ready after {READY_TIMEOUT} s' if time.monotonic() > deadline else None)
            if problem:
                self.proc.kill()
                self.proc.wait()
                self._after_exit()
                _running.discard(self)
                raise ServiceError(f'{self.name} {problem}: {_tail(self.log)}')
            time.sleep(0.02)

    def _check_pid_file(self, path: pathlib.Path) -> None:
        """The server's own record of its PID must be the process we started, or stop() would miss."""
        pid = int(path.read_text().split()[0])
        if pid != self.proc.pid:
            raise ServiceError(f'{self.name}: {path} says PID {pid}, but we started {self.proc.pid}')
        self.pid = pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Signal the server's PID and wait until it has exited; a no-op when it is not running."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        _running.discard(self)
        try:
            if proc.poll() is None:   # not already dead (a fault test may have killed it)
                self._signal(self.stop_signal)
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise ServiceError(f'{self.name} (PID {self.pid}) ignored {self.stop_signal.name} '
                               f'for {STOP_TIMEOUT} s and was killed: {_tail(self.log)}') from None
        finally:
            self._after_exit()

    def _signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def _after_exit(self) -> None:
        """Clean up what the server may leave behind once its main process has exited."""

    def restart(self) -> None:
        """Stop by PID and start again with the same ports and data."""
        self.stop()
        self._start()


def stop_all(services) -> None:
    """Stop each service, the later ones first; raise the first failure after trying them all."""
    errors = []
    for service in reversed(list(services)):
        try:
            service.stop()
        except ServiceError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@atexit.register
def _stop_leftovers() -> None:
    """A benchmark that crashed, or a session that never ran its teardown, must not leave servers behind."""
    stop_all(list(_running))


# ---------------------------------------------------------------- Redis

class Redis(_Server):
    name = 'redis-server'

    def __init__(self, workdir: pathlib.Path):
        self.port = free_port()
        self.url = f'redis://{HOST}:{self.port}/0'
        self.dir = workdir / 'redis'
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / 'redis.log'
        self.program = _require('redis-server', 'redis-server')

    def _start(self) -> None:
        self._launch([self.program, '--bind', HOST, '--port', str(self.port), '--dir', str(self.dir),
                      '--daemonize', 'no', '--logfile', '', '--save', '',
                      # The append-only file is what restart() keeps: fault tests kill and restart Redis.
                      '--appendonly', 'yes', '--appendfsync', 'everysec'],
                     # A Redis still loading its append-only file answers -LOADING.
                     lambda: _answers(self.port, b'+PONG', send=b'PING\r\n'))


def start_redis(workdir: pathlib.Path) -> Redis:
    redis = Redis(workdir)
    redis._start()
    return redis


# ---------------------------------------------------------------- PostgreSQL

def _postgres_bin_dirs() -> list[str]:
    """Debian keeps the server programs out of PATH, one directory per major version; newest first."""
    dirs = glob.glob('/usr/lib/postgresql/*/bin')
    return sorted(dirs, key=lambda d: int(re.sub(r'\D', '', d) or 0), reverse=True)


class Postgres(_Server):
    name = 'postgres'
    stop_signal = signal.SIGINT   # fast shutdown: roll back open transactions, disconnect, exit
    user = 'emailsvc'
    database = 'emailsvc_test'

    def __init__(self, workdir: pathlib.Path):
        dirs = _postgres_bin_dirs()
        self.program = _require('postgres', 'postgresql', *dirs)
        self.initdb = _require('initdb', 'postgresql', *dirs)
        # initdb and postgres refuse to run as root; as root we use the package's system user.
        self.os_user = _system_user('postgres', 'postgresql') if os.geteuid() == 0 else None
        self.port = free_port()
        self.password = secrets.token_hex(16)   # hex: needs no escaping in a URL
        self.home = workdir / 'postgres'
        self.data = self.home / 'data'
        self.log = self.home / 'postgres.log'
        self.url = self._url(self.database)

    def _url(self, database: str) -> str:
        return f'postgresql://{self.user}:{self.password}@{HOST}:{self.port}/{database}'

    def _init_cluster(self) -> None:
        self.home.mkdir(parents=True, mode=0o700)
        if self.os_user:
            _let_others_traverse(self.home.parent)
            _chown(self.home, self.os_user)
        pwfile = self.home / 'pwfile'
        pwfile.touch(mode=0o600)
        pwfile.write_text(self.password)
        if self.os_user:
            _chown(pwfile, self.os_user)
        done = subprocess.run([self.initdb, '-D', str(self.data), '-U', self.user, f'--pwfile={pwfile}',
                               '--auth=scram-sha-256', '--encoding=UTF8', '--locale=C',
                               '--no-sync', '--no-instructions'],   # a test cluster need not survive a power cut
                              cwd=self.home, capture_output=True, text=True, **_as_user(self.os_user))
        pwfile.unlink()
        if done.returncode:
            raise ServiceError(f'initdb failed: {" | ".join((done.stderr or done.stdout).splitlines()[-4:])}')

    def _start(self) -> None:
        self._launch([self.program, '-D', str(self.data),
                      '-c', f'listen_addresses={HOST}', '-c', f'port={self.port}',
                      '-c', f'unix_socket_directories={self.home}',
                      # Speed, for a cluster that lives as long as one test run:
                      # a crash of the machine may lose or corrupt it, nothing else does.
                      '-c', 'fsync=off', '-c', 'full_page_writes=off'],
                     self._accepts_login, cwd=self.home, user=self.os_user)
        self._check_pid_file(self.data / 'postmaster.pid')

    def _accepts_login(self) -> bool:
        try:
            psycopg2.connect(self._url('postgres'), connect_timeout=2).close()
            return True
        except psycopg2.OperationalError:   # not listening yet, or "the database system is starting up"
            return False

    def create_database(self, name: str) -> str:
        """Create an empty database and return its URL."""
        if not re.fullmatch(r'[a-z_][a-z0-9_]{0,62}', name):
            raise ValueError(f'database name must be a lower-case identifier, got {name!r}')
        conn = psycopg2.connect(self._url('postgres'))
        try:
            conn.autocommit = True   # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE {name}')
        finally:
            conn.close()
        return self._url(name)


def start_postgres(workdir: pathlib.Path) -> Postgres:
    postgres = Postgres(workdir)
    postgres._init_cluster()
    postgres._start()
    postgres.create_database(postgres.database)
    return postgres


@contextlib.contextmanager
def benchmark_servers(name: str):
    """(work directory, Redis, PostgreSQL) for a benchmark: both servers stopped at the end; the
    directory (a PostgreSQL cluster and ledgers, tens of MB) removed after a success, kept and
    named on stderr after a failure."""
    workdir = pathlib.Path(tempfile.mkdtemp(prefix=f'{name}-'))
    redis, postgres = start_redis(workdir / 'redis'), start_postgres(workdir / 'postgres')
    try:
        yield workdir, redis, postgres
    except BaseException:
        print(f'{name}: the logs are kept in {workdir}', file=sys.stderr)
        raise
    finally:
        redis.stop()
        postgres.stop()
    shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------- Dovecot

MAIL_USER = 'emailsvc-mail'

DOVECOT_CONF = string.Template(r'''# A private Dovecot for emailsvc's tests, written by tests/services.py.
# Nothing is read from /etc/dovecot. base_dir, instance_name and state_dir
# are this instance's own, so concurrent test runs do not meet.
base_dir = $home/run
instance_name = $instance
state_dir = $home/state
log_path = $log
protocols = imap pop3
listen = 127.0.0.1

ssl = yes
ssl_cert = <$cert
ssl_key = <$key
$ssl_dh

# Clients log in with passwords over plain TCP too, on loopback only.
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
# Brute-force defences that would make tests slow and their timing depend on
# earlier tests: the delay before a failure reply (default 2 s; failures still
# go out on a 0.5 s timer), and the penalty that delays every later login from
# an address after a failure (2 to 15 s; only disabled by hiding its socket).
auth_failure_delay = 0
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}

# One passwd-file per user: Dovecot stats a passwd-file at most once a second,
# so a user appended to a shared file could stay unknown for up to a second.
passdb {
  driver = passwd-file
  args = scheme=PLAIN $home/users/%u
}
userdb {
  driver = passwd-file
  args = $home/users/%u
}

# All mail belongs to one unprivileged user, never root.
first_valid_uid = $uid
last_valid_uid = $uid
mail_location = maildir:~/Maildir
# Tests open many connections as one user from one address; the default is 10.
mail_max_userip_connections = 200
pop3_uidl_format = %08Xu%08Xv

namespace inbox {
  inbox = yes
  mailbox Sent {
    special_use = \Sent
    auto = subscribe
  }
  mailbox Trash {
    special_use = \Trash
    auto = subscribe
  }
  mailbox Junk {
    special_use = \Junk
    auto = subscribe
  }
  mailbox Drafts {
    special_use = \Drafts
    auto = subscribe
  }
  mailbox Archive {
    special_use = \Archive
    auto = subscribe
  }
}

service imap-login {
  inet_listener imap {
    port = $imap_port
  }
  inet_listener imaps {
    port = $imaps_port
    ssl = yes
  }
}
service pop3-login {
  inet_listener pop3 {
    port = $pop3_port
  }
  inet_listener pop3s {
    port = $pop3s_port
    ssl = yes
  }
}
''')


def _mail_user() -> pwd.struct_passwd:
    """The system user that owns all test mail, created on first use."""
    try:
        return pwd.getpwnam(MAIL_USER)
    except KeyError:
        done = subprocess.run(['useradd', '--system', '--no-create-home', '--home-dir', '/nonexistent',
                               '--shell', '/usr/sbin/nologin', MAIL_USER], capture_output=True, text=True)
        try:
            return pwd.getpwnam(MAIL_USER)   # a concurrent run may have created it first
        except KeyError:
            raise ServiceError(f'cannot create system user {MAIL_USER}: {done.stderr.strip()}; '
                               f'run: useradd --system --no-create-home {MAIL_USER}') from None


class Dovecot(_Server):
    name = 'dovecot'
    host = HOST

    def __init__(self, workdir: pathlib.Path):
        self.program = _require('dovecot', 'dovecot-imapd dovecot-pop3d')
        self.doveadm = _require('doveadm', 'dovecot-core')
        for protocol, package in (('imap', 'dovecot-imapd'), ('pop3', 'dovecot-pop3d')):
            if not os.path.exists(f'/usr/lib/dovecot/{protocol}'):
                raise ServiceError(f'Dovecot cannot serve {protocol}: apt-get install {package} '
                                   f'(./run.sh test installs it)')
        if os.geteuid() != 0:
            raise ServiceError('Dovecot needs root to switch to the mail user: run the tests as root (./run.sh test)')
        self.mail_user = _mail_user()
        self.imap_port, self.imaps_port, self.pop3_port, self.pop3s_port = (free_port() for _ in range(4))
        self.home = workdir / 'dovecot'
        self.log = self.home / 'dovecot.log'
        self.config = self.home / 'dovecot.conf'
        self.users = self.home / 'users'
        self.mail_root = self.home / 'mail'
        self._make_dirs()
        cert, key = make_cert(self.home)
        self.cert_path = str(cert)
        self._write_config(cert, key)

    def _make_dirs(self) -> None:
        for directory in (self.home, self.users, self.mail_root, self.home / 'state'):
            directory.mkdir(parents=True, mode=0o700)
        _let_others_traverse(self.home)   # the mail user's processes must reach mail_root
        _chown(self.mail_root, self.mail_user)
        # The auth process runs as the dovecot user and reads the passwd-files.
        os.chown(self.users, 0, _system_user('dovecot', 'dovecot-core').pw_gid)
        self.users.chmod(0o750)

    def _write_config(self, cert: pathlib.Path, key: pathlib.Path) -> None:
        base_dir = self.home / 'run'
        if len(str(base_dir)) > 70:   # its sockets' paths add up to 30 bytes, and the limit is 107
            raise ServiceError(f'workdir path too long for Dovecot sockets: {base_dir}; use a shorter workdir')
        dh = '/usr/share/dovecot/dh.pem'   # Debian's; only DHE ciphers need it
        self.config.write_text(DOVECOT_CONF.substitute(
            home=self.home, instance=f'emailsvc-test-{secrets.token_hex(4)}', log=self.log,
            cert=cert, key=key, ssl_dh=f'ssl_dh = <{dh}' if os.path.exists(dh) else '',
            uid=self.mail_user.pw_uid, imap_port=self.imap_port, imaps_port=self.imaps_port,
            pop3_port=self.pop3_port, pop3s_port=self.pop3s_port))

    def _signal(self, sig: signal.Signals) -> None:
        # The master exits after about a second even while imap/pop3 processes
        # still serve clients, and those would live on as orphans. End them
        # first, while the master is there to reap them.
        _end_group(self.pid, signal.SIGTERM, only={'imap', 'pop3', 'imap-login', 'pop3-login'})
        os.kill(self.pid, sig)

    def _after_exit(self) -> None:
        _end_group(self.pid, signal.SIGKILL)   # the same process group: we started the master in a new session

    def stop(self) -> None:
        # The master does not wait for its log process, which exits just after
        # it. Adopt such orphans and reap them, rather than leave zombies to a
        # PID 1 that may never reap them (a container's often does not).
        members = _live_members(self.pid) if self.running() else {}
        with _adopting_orphans():
            super().stop()
            for pid in members:
                _reap(pid)

    def _start(self) -> None:
        # -F: stay in the foreground as our child, so stop() can wait for it to exit.
        self._launch([self.program, '-F', '-c', str(self.config)],
                     lambda: _answers(self.imap_port, b'* OK') and _answers(self.pop3_port, b'+OK'))
        self._check_pid_file(self.home / 'run' / 'master.pid')

    def ssl_context(self) -> ssl.SSLContext:
        return trusting(self.cert_path)

    def maildir(self, username: str) -> pathlib.Path:
        return self.mail_root / username / 'Maildir'

    def add_user(self, username: str, password: str) -> None:
        """Add a user (or set a new password); returns once Dovecot accepts the login."""
        if not re.fullmatch(r'[A-Za-z0-9_+-][A-Za-z0-9._@+-]*', username):
            raise ValueError(f'username must be letters, digits and ._@+- (no leading dot), got {username!r}')
        if any(c in password for c in ':\r\n\0'):
            raise ValueError('a passwd-file password cannot contain ":", a line break or NUL')
        uid, gid = self.mail_user.pw_uid, self.mail_user.pw_gid
        line = f'{username}:{{PLAIN}}{password}:{uid}:{gid}::{self.mail_root / username}::\n'
        path = self.users / username
        before = int(path.stat().st_mtime) if path.exists() else None
        smtp_server.write_atomically(path, line.encode())
        if before is not None:
            self._make_dovecot_reread(path, before)
        self._wait_for_login(username, password)

    @staticmethod
    def _make_dovecot_reread(path: pathlib.Path, mtime_before: int) -> None:
        """Dovecot stats a passwd-file at most once per wall-clock second and rereads it
        only when its mtime in whole seconds or its size changed."""
        if int(path.stat().st_mtime) <= mtime_before:   # a same-length password set within the second
            os.utime(path, (mtime_before + 1, mtime_before + 1))
        second = int(time.time())
        while int(time.time()) == second:   # a lookup this second may already have stat'ed the old file
            time.sleep(0.01)

    def _wait_for_login(self, username: str, password: str) -> None:
        deadline = time.monotonic() + 5
        while True:
            done = subprocess.run([self.doveadm, '-c', str(self.config), 'auth', 'test', '-x', 'service=imap',
                                   username, password], capture_output=True, text=True)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise ServiceError(f'Dovecot does not accept the new login {username}: '
                                   f'{(done.stderr or done.stdout).strip()} | {_tail(self.log)}')
            time.sleep(0.05)


def start_dovecot(workdir: pathlib.Path) -> Dovecot:
    dovecot = Dovecot(workdir)
    dovecot._start()
    return dovecot


# ---------------------------------------------------------------- SMTP (aiosmtpd in a subprocess)

class SmtpServer(_Server):
    name = 'smtp server'
    host = HOST

    def __init__(self, workdir: pathlib.Path, *, auth_require_tls: bool = True, auth_required: bool = True):
        if importlib.util.find_spec('aiosmtpd') is None:
            raise ServiceError('aiosmtpd not installed: .venv/bin/pip install aiosmtpd (./run.sh test installs it)')
        self.auth_require_tls, self.auth_required = auth_require_tls, auth_required
        self.port, self.tls_port = free_port(), free_port()
        self.home = workdir / 'smtp'
        self.spool = self.home / 'spool'
        self.spool.mkdir(parents=True)
        self.users = self.home / 'users.json'
        self.users.write_text('{}')
        self.log = self.home / 'smtp.log'
        cert, self.key_path = make_cert(self.home)
        self.cert_path = str(cert)

    def _start(self) -> None:
        self._launch([sys.executable, '-m', 'tests.smtp_server', '--port', str(self.port),
                      '--tls-port', str(self.tls_port), '--spool', str(self.spool), '--users', str(self.users),
                      '--cert', self.cert_path, '--key', str(self.key_path),
                      '--auth-require-tls', str(int(self.auth_require_tls)),
                      '--auth-required', str(int(self.auth_required))],
                     lambda: _answers(self.port, b'220') and _answers_tls(self.tls_port, self.ssl_context()),
                     cwd=REPO)

    def ssl_context(self) -> ssl.SSLContext:
        return trusting(self.cert_path)

    def add_user(self, username: str, password: str) -> None:
        """Accept AUTH PLAIN and LOGIN for username from the next AUTH on."""
        users = json.loads(self.users.read_bytes())
        users[username] = password
        smtp_server.write_atomically(self.users, json.dumps(users).encode())

    def received(self) -> list[dict]:
        """Every message answered 250 so far, oldest first:
        {'mail_from', 'rcpt_tos', 'data' (bytes), 'peer', 'tls' (bool), 'login' (str or None)}."""
        return smtp_server.read_messages(self.spool)

    def clear(self) -> None:
        """Forget received messages and any scripted replies not used yet."""
        smtp_server.clear(self.spool)

    def script_replies(self, *, data: str | None = None, rcpt: dict[str, str] | None = None, times: int = 1) -> None:
        """Make each of the next `times` transactions answer DATA with `data` (a 2xx reply still
        delivers) and/or refuse the recipients in `rcpt` ({address: reply}, any case)."""
        for reply in [data, *(rcpt or {}).values()]:
            if reply is not None and not re.fullmatch(r'[2-5]\d\d .+', reply):
                raise ValueError(f'an SMTP reply is a code, a space and text, got {reply!r}')
        script = {'data': data, 'rcpt': {address.lower(): reply for address, reply in (rcpt or {}).items()}}
        smtp_server.add_scripts(self.spool, [script] * times)

    def reply_to_data(self, reply: str, times: int = 1) -> None:
        """Shorthand for script_replies(data=reply, times=times)."""
        self.script_replies(data=reply, times=times)

    def delay_data_reply(self, seconds: float, times: int = 1) -> None:
        """The next `times` transactions are delivered, then their 250 reply waits `seconds`."""
        smtp_server.add_scripts(self.spool, [{'delay': seconds}] * times)

    def freeze_after_data(self, pids) -> None:
        """The next transaction is delivered, then `pids` get SIGSTOP before the 250 reply goes out."""
        smtp_server.add_scripts(self.spool, [{'freeze': list(pids)}])

    def cut_during_data(self, where: str) -> None:
        """The next transaction's connection is reset at DATA ('at_data': before the 354 reply) or after
        the first line of the message ('in_message'): before its end, so the server delivers nothing."""
        if where not in ('at_data', 'in_message'):
            raise ValueError(f"where must be 'at_data' or 'in_message', got {where!r}")
        smtp_server.add_scripts(self.spool, [{'cut': where}])

    def drop_after_data(self) -> None:
        """The next transaction receives the whole message, then the connection closes with no reply."""
        smtp_server.add_scripts(self.spool, [{'drop': True}])


def _answers_tls(port: int, context: ssl.SSLContext) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=2) as sock:
            with context.wrap_socket(sock, server_hostname=HOST) as tls:
                return tls.recv(3) == b'220'
    except OSError:   # ssl.SSLError is an OSError
        return False


def start_smtp(workdir: pathlib.Path, *, auth_require_tls: bool = True, auth_required: bool = True) -> SmtpServer:
    """auth_require_tls=False also offers AUTH on the plain port before STARTTLS (loopback tests of security 'none')."""
    server = SmtpServer(workdir, auth_require_tls=auth_require_tls, auth_required=auth_required)
    server._start()
    return server


# ---------------------------------------------------------------- our own processes

class PythonChild:
    """`python ARGS` from the project root in a session of its own, its output in `log`."""

    def __init__(self, log: pathlib.Path, args: list[str], **env: str):
        self.log = log
        environment = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED='1', **env)
        self.proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=environment,
                                     stdout=log.open('ab'), stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise ServiceError(f'{self.log.stem} exited with {self.proc.returncode}; see {self.log}')
        return True

    def kill(self) -> None:
        """SIGKILL to its whole group, as an OOM killer or a power cut would."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 30) -> None:
        """SIGINT, its clean stop; SIGKILL if it is still there after `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
