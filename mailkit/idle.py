"""IMAP IDLE (RFC 2177): hold one folder open and hear about changes as they happen.

Many accounts, one thread
-------------------------
A watcher holds one connection per account for hours, and nearly all that
time nothing is said on it. A thread per account would cost a stack each
and a scheduler for thousands of sleepers; instead every connection is an
asyncio coroutine (`watch`) on one event loop, which waits on all the
sockets at once (selectors: epoll on Linux). A coroutine is the state
machine below written top to bottom: each `await` is a state waiting for
the socket, and the code after it is the transition.

The states of one connection
----------------------------
::

    CONNECTING --TCP up (TLS handshake too for security 'tls')--> GREETING
    GREETING   --"* OK"--> [STARTTLS --"OK", TLS handshake-->] LOGIN
               --"* PREAUTH"--> SELECTING (already logged in, RFC 3501 7.1.4)
               --"* BYE" or not IMAP--> failed
    LOGIN      --"OK [CAPABILITY ... IDLE ...]"--> SELECTING
               --"NO"--> failed: AuthenticationFailed (the caller gives up
                         until the credentials change), or temporary with
                         [UNAVAILABLE] (the server's password backend is down)
               --no IDLE among the capabilities--> failed: IdleUnsupported
    SELECTING  --EXAMINE INBOX "OK"--> IDLE_STARTING    (read-only: watching
                         must not clear \\Recent or change anything)
    IDLE_STARTING --"+ idling"--> IDLING
    IDLING     --"* n EXISTS" | "* n EXPUNGE" | "* n FETCH" | "* VANISHED"-->
                         IDLING, after telling the caller (on_change)
               --"* OK Still here" and other status--> IDLING
               --the re-IDLE timer fires--> DONE_SENT
               --"* BYE", EOF, a socket error--> failed (temporary)
    DONE_SENT  --tagged "OK"--> IDLE_STARTING (a new IDLE at once)
               --no answer within the timeout--> failed (the link is dead)

Why re-issue IDLE: RFC 2177 lets a server drop a client idle for 30 minutes
(RFC 3501's inactivity timer, 5.4) and asks clients to end and restart IDLE
at least every 29 minutes. The DONE round trip doubles as a liveness probe:
a connection that died silently (a NAT forgot it) is found at the next one;
TCP keepalive finds it sooner where the kernel is told to probe.

A change is announced, not carried: the caller queues a sync, which reads
the folder over its own connection. The watch never leaves IDLE for it.
What the EXAMINE said (UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ, EXISTS) goes to
`on_idle` each time IDLE starts, so the caller can tell whether anything
changed while it was not watching (before the first IDLE, or across a
reconnect) and sync then too.

Failures end the coroutine with a MailError: AuthenticationFailed (wrong
password: retrying cannot help), IdleUnsupported, PermanentMailError (TLS or
certificate problems, a server that does not speak IMAP) and
TemporaryMailError (anything a reconnect may cure). Reconnecting, backoff and
giving up are the caller's. Connections go through mailkit.egress: its
policy is checked on every resolved address before a packet leaves.
"""
import asyncio
import base64
import dataclasses
import re
import socket
import ssl

from mailkit import egress
from mailkit.errors import (AuthenticationFailed, PermanentMailError, TemporaryMailError, check_setting,
                            connection_failure)

# RFC 2177: "clients ... should terminate the IDLE and re-issue it at least every 29 minutes".
MAX_IDLE_SECONDS = 29 * 60
# A response line of a folder's EXAMINE is short; a longer one is not a server we can follow.
MAX_LINE = 64 * 1024
# Untagged lines during IDLE that say the folder changed (RFC 3501 7.3.1, 7.4.1, 7.4.2; RFC 7162 3.2.10).
CHANGE = re.compile(rb'^\* (?:\d+ (?:EXISTS|EXPUNGE|FETCH)\b|VANISHED\b)', re.IGNORECASE)
STATUS_CODE = re.compile(rb'\[(UIDVALIDITY|UIDNEXT|HIGHESTMODSEQ) (\d+)\]', re.IGNORECASE)
EXISTS = re.compile(rb'^\* (\d+) EXISTS', re.IGNORECASE)
RESPONSE_CODE = re.compile(rb'^\[([A-Z-]+)')


class IdleUnsupported(PermanentMailError):
    """The server does not offer IDLE: the account stays on periodic sync."""

    code = 'idle_unsupported'


@dataclasses.dataclass(frozen=True)
class Server:
    """Where and as whom to watch; the password is never shown by repr()."""
    host: str
    port: int
    security: str                 # tls | starttls | none
    username: str
    password: str = dataclasses.field(repr=False)


@dataclasses.dataclass
class FolderStatus:
    """What EXAMINE told about the folder, handed to on_idle."""
    exists: int | None = None
    uidvalidity: int | None = None
    uidnext: int | None = None
    highestmodseq: int | None = None


async def watch(server: Server, on_change, *, on_idle=None, folder: str = 'INBOX',
                idle_seconds: float = 25 * 60, timeout: float = 30.0,
                ssl_context: ssl.SSLContext | None = None, policy: egress.Policy | None = None) -> None:
    """Hold IDLE on `folder` until cancelled: on_change() for each change line, and
    on_idle(FolderStatus of the EXAMINE, how many IDLEs this connection has begun) as each IDLE begins.

    Returns never; raises a MailError when the connection fails (see the module docstring).
    """
    idle_seconds = min(idle_seconds, MAX_IDLE_SECONDS)
    for field in ('host', 'username', 'password'):
        check_setting(field, getattr(server, field))
    context = ssl_context
    if context is None and server.security != 'none':   # building one reads the CA bundle: 50-190 ms measured
        context = ssl.create_default_context()
    connection = await _Connection.open(server, timeout, context, policy)
    try:
        await connection.log_in(server, context)
        status = await connection.examine(folder)
        while True:
            await connection.idle(on_change)
            if on_idle is not None:
                on_idle(status, connection.idles)
            await connection.idle_until(on_change, idle_seconds)
            await connection.done()
    finally:
        connection.close()


class _Connection:
    """One IMAP connection over asyncio streams: send a tagged command, read responses, IDLE."""

    def __init__(self, reader, writer, where, timeout):
        self.reader, self.writer, self.where, self.timeout = reader, writer, where, timeout
        self.tags = 0
        self.idles = 0
        self.idle_tag = None
        self.capabilities: set[str] = set()

    # -------------------------------------------------- connecting

    @classmethod
    async def open(cls, server, timeout, context, policy):
        where = f'{server.host}:{server.port}'
        sock = await _connect(server.host, server.port, timeout, policy)
        tls = server.security == 'tls'
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    sock=sock, limit=MAX_LINE, ssl=context if tls else None,
                    server_hostname=server.host if tls else None)
        except (OSError, TimeoutError) as exc:
            sock.close()
            raise egress.classify(exc, where) from exc
        connection = cls(reader, writer, where, timeout)
        try:
            await connection.greeting()
        except BaseException:
            connection.close()
            raise
        return connection

    async def greeting(self):
        try:
            line = await self.line()
        except TemporaryMailError:
            raise connection_failure('connection_lost', self.where) from None
        if line.startswith(b'* BYE'):
            raise connection_failure('server_busy', self.where)
        if not line.startswith((b'* OK', b'* PREAUTH')):   # never echoed: it may be anything but IMAP
            raise connection_failure('not_a_mail_server', self.where)
        self.preauth = line.startswith(b'* PREAUTH')
        self.note_capabilities(line)

    async def log_in(self, server, context):
        if server.security == 'starttls':
            await self.start_tls(server.host, context)
        if self.preauth:
            return await self.require_idle()
        if server.username.isascii() and server.password.isascii():
            if 'LOGINDISABLED' in self.capabilities:
                raise PermanentMailError(f'{self.where} refuses LOGIN on this connection; use TLS')
            # LOGIN with quoted strings (RFC 3501 6.2.3, 4.3); the line never reaches a log.
            status, text, _ = await self.command(b'LOGIN ' + _quoted(server.username) + b' ' + _quoted(server.password))
        else:
            status, text, _ = await self.authenticate_plain(server.username, server.password)
        if status != b'OK':
            code = RESPONSE_CODE.match(text)
            if code and code.group(1) == b'UNAVAILABLE':   # RFC 5530: the password backend is down, not the password
                raise TemporaryMailError(f'{self.where} cannot check logins now: {_shown(text)}')
            raise AuthenticationFailed(f'{self.where} rejected the login for {server.username!r}: {_shown(text)}; '
                                       f'check the username and password')
        self.note_capabilities(text)
        await self.require_idle()

    async def start_tls(self, host, context):
        if not self.capabilities:
            await self.command(b'CAPABILITY')
        if 'STARTTLS' not in self.capabilities:
            raise connection_failure('starttls_unavailable', self.where)
        status, text, _ = await self.command(b'STARTTLS')
        if status != b'OK':
            raise connection_failure('starttls_unavailable', self.where)
        try:
            async with asyncio.timeout(self.timeout):
                await self.writer.start_tls(context, server_hostname=host)
        except (OSError, TimeoutError) as exc:
            raise egress.classify(exc, self.where, starttls=True) from exc
        self.capabilities = set()   # RFC 3501 6.2.1: forget what was said before TLS

    async def authenticate_plain(self, username, password):
        """SASL PLAIN (RFC 4616) carries UTF-8 where LOGIN's strings are ASCII in practice."""
        tag = self.next_tag()
        self.send(tag + b' AUTHENTICATE PLAIN')
        line = await self.line()
        if not line.startswith(b'+'):
            return await self.finish(tag, line)
        self.send(base64.b64encode(b'\0' + username.encode() + b'\0' + password.encode()))
        return await self.finish(tag, await self.line())

    async def require_idle(self):
        if not self.capabilities:
            await self.command(b'CAPABILITY')
        if 'IDLE' not in self.capabilities:
            raise IdleUnsupported(f'{self.where} does not offer IDLE; the account is synced periodically')

    def note_capabilities(self, line):
        """Dovecot lists its capabilities in the greeting and again, grown, in the login reply."""
        match = re.search(rb'\[CAPABILITY ([^\]]*)\]', line, re.IGNORECASE)
        if match:
            self.capabilities = set(match.group(1).decode('ascii', 'replace').upper().split())

    # -------------------------------------------------- the folder

    async def examine(self, folder):
        status, text, untagged = await self.command(b'EXAMINE ' + _quoted(folder))
        if status != b'OK':
            raise TemporaryMailError(f'{self.where} answered {status.decode()} to EXAMINE {folder}: {_shown(text)}')
        found = FolderStatus()
        for line in untagged:
            if match := EXISTS.match(line):
                found.exists = int(match.group(1))
            for name, value in STATUS_CODE.findall(line):
                setattr(found, name.decode().lower(), int(value))
        return found

    async def idle(self, on_change):
        """Send IDLE and wait for its continuation ('+'): from there the server may speak at any time."""
        self.idle_tag = self.next_tag()
        self.send(self.idle_tag + b' IDLE')
        while True:
            line = await self.line()
            if line.startswith(b'+'):
                self.idles += 1
                return
            if line.startswith(self.idle_tag + b' '):
                raise TemporaryMailError(f'{self.where} refused IDLE: {_shown(line)}')
            self.untagged(line, on_change)

    async def idle_until(self, on_change, idle_seconds):
        """Read what the server says while idling, until it is time to re-issue IDLE."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + idle_seconds
        while (left := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(left):
                    line = await self.reader.readline()
            except TimeoutError:
                return
            except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
                raise TemporaryMailError(f'lost {self.where} while idling: {type(exc).__name__}') from exc
            self.untagged(self.checked(line), on_change)

    async def done(self):
        """End IDLE (RFC 2177: "DONE" on a line of its own) and wait for its tagged reply."""
        self.send(b'DONE')
        while True:
            line = await self.line()
            if line.startswith(self.idle_tag + b' '):
                if not line[len(self.idle_tag) + 1:].upper().startswith(b'OK'):
                    raise TemporaryMailError(f'{self.where} ended IDLE with {_shown(line)}')
                return
            self.untagged(line, lambda: None)   # changes in between are the next IDLE's to report

    def untagged(self, line, on_change):
        if line.startswith(b'* BYE'):
            raise TemporaryMailError(f'{self.where} closed the connection: {_shown(line)}')
        if CHANGE.match(line):
            on_change()

    # -------------------------------------------------- the wire

    def next_tag(self):
        self.tags += 1
        return b'W%d' % self.tags

    def send(self, line):
        self.writer.write(line + b'\r\n')

    async def command(self, command):
        """Send a tagged command; (status, text after it, untagged lines) once its tagged reply came."""
        tag = self.next_tag()
        self.send(tag + b' ' + command)
        untagged = []
        while True:
            line = await self.line()
            if line.startswith(tag + b' '):
                return await self.finish(tag, line, untagged)
            if line.startswith(b'* BYE'):
                raise TemporaryMailError(f'{self.where} closed the connection: {_shown(line)}')
            untagged.append(line)

    async def finish(self, tag, line, untagged=()):
        status, _, text = line[len(tag) + 1:].partition(b' ')
        status = status.upper()
        if status == b'BAD':
            raise PermanentMailError(f'{self.where} did not understand us: {_shown(text)}')
        return status, text, list(untagged)

    async def line(self):
        """The next response line, literals included, without its CRLF; a temporary error when the link fails."""
        try:
            async with asyncio.timeout(self.timeout):
                line = self.checked(await self.reader.readline())
                while (match := re.search(rb'\{(\d+)\+?\}$', line)) and int(match.group(1)) <= MAX_LINE:
                    line += await self.reader.readexactly(int(match.group(1)))
                    line += self.checked(await self.reader.readline())
        except TimeoutError:
            raise TemporaryMailError(f'{self.where} did not answer within {self.timeout:g} s') from None
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise TemporaryMailError(f'lost {self.where}: {type(exc).__name__}') from exc
        return line

    def checked(self, line):
        if not line.endswith(b'\n'):
            raise TemporaryMailError(f'{self.where} closed the connection')
        return line.rstrip(b'\r\n')

    def close(self):
        self.writer.close()   # no LOGOUT: the server reads a closed socket as the end of the session


async def _connect(host, port, timeout, policy):
    """A connected non-blocking socket to an address the policy allows, resolved without blocking the loop."""
    where = f'{host}:{port}'
    loop = asyncio.get_running_loop()
    try:
        addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise connection_failure('host_not_found', where) from exc
    failure = None
    for family, kind, protocol, _, sockaddr in egress.permitted(addresses, policy, where):
        sock = socket.socket(family, kind, protocol)
        sock.setblocking(False)
        _keep_alive(sock)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, sockaddr)
            return sock
        except (OSError, TimeoutError) as exc:   # the next address may answer; the last failure is reported
            sock.close()
            failure = exc
    raise egress.classify(failure, where) from failure


def _keep_alive(sock):
    """Probe a silent connection after 2 minutes, so one a NAT forgot fails in minutes, not at the next DONE."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (('TCP_KEEPIDLE', 120), ('TCP_KEEPINTVL', 30), ('TCP_KEEPCNT', 4)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _quoted(value: str) -> bytes:
    """An IMAP quoted string (RFC 3501 4.3); callers checked it holds no CR, LF or NUL."""
    return b'"' + value.replace('\\', '\\\\').replace('"', '\\"').encode() + b'"'


def _shown(text: bytes) -> str:
    """A server's reply text for a message: short, and never more than a line."""
    return text[:200].decode('utf-8', 'replace')

