"""POP3 (RFC 1939) for sync, on top of poplib, with the extensions we rely on.

States
------
A session starts in AUTHORIZATION: with security 'starttls' the plain
connection is upgraded by STLS first (RFC 2595), with 'tls' it is TLS from the
first byte (port 995). USER and PASS move it to TRANSACTION, where the
maildrop is fixed for the whole session: messages are numbered 1..n as they
were at login, and nothing that arrives meanwhile is seen until the next
session. DELE only marks a message; the deletions happen in the UPDATE state,
which only a QUIT enters. A session that ends any other way (a dropped
connection, an error on our side) deletes nothing, which is what we want after
an error: `close()` sends QUIT, leaving the `with` block on an exception does
not.

What identifies a message
-------------------------
Message numbers are only good for one session. UIDL (RFC 1939, section 7)
gives each message a unique id that stays the same across sessions and is
never reused for another message in that maildrop. So a sync stores, per
account, the set of unique ids it has already fetched; on the next run it
fetches the ids it does not know (by this session's numbers) and forgets the
stored ids the server no longer lists. There is no folder, no flag and no
change counter: POP3 sees one inbox, and only additions and removals.

Errors
------
poplib, ssl and socket exceptions are translated where they enter.
Connecting goes through mailkit.egress (its policy, when given, checks the
resolved address); a failure to connect, greet or start TLS carries one of
the fixed codes of errors.CONNECTION_FAILURES and never repeats what the far
end sent before "+OK". Control characters in the username, password or host
are refused before anything is sent: poplib sends "USER " + the name as it is.
A rejected PASS is AuthenticationFailed; dropped connections are
TemporaryMailError. Other -ERR replies are judged by their RFC 2449/3206
response code: IN-USE (another session holds the maildrop lock), LOGIN-DELAY
and SYS/TEMP are temporary; a -ERR without a code answers a command the
server will refuse again (RETR of a deleted message, an unknown command), so
it is permanent.
"""

import contextlib
import poplib
import re
import ssl
from typing import Iterable

from mailkit.egress import Policy, Route, classify
from mailkit.errors import (AuthenticationFailed, MailError, PermanentMailError, TemporaryMailError, check_setting,
                            connection_failure)

SECURITY = ('tls', 'starttls', 'none')
TEMPORARY_CODES = {'IN-USE', 'LOGIN-DELAY', 'SYS/TEMP'}
# poplib refuses lines over 2,048 bytes (poplib._MAXLINE). RFC 5322 caps lines
# at 998, but HTML mailers send far longer ones; a single message must not
# stop a sync. This bounds memory per line, as poplib's limit meant to.
MAX_LINE = 10 * 1024 * 1024


class _LongLines:
    """poplib.POP3's line reader with a larger limit; the rest of poplib is unchanged."""

    def _getline(self):
        line = self.file.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise poplib.error_proto(f'a line of more than {MAX_LINE} bytes')
        if not line:
            # poplib raises error_proto('-ERR EOF'), which reads like a server reply.
            raise ConnectionAbortedError('the server closed the connection')
        octets = len(line)
        if line[-2:] == b'\r\n':
            return line[:-2], octets
        return line[:-1], octets   # a bare LF: the line ends there all the same


class _POP3(_LongLines, poplib.POP3):
    """poplib.POP3 whose socket comes from egress.Route: resolved, checked, then connected."""

    def __init__(self, host: str, port: int, timeout: float, route: Route):
        self._route = route
        try:
            super().__init__(host, port, timeout)
        except BaseException:
            _close_socket(self)   # poplib leaves the socket open when the greeting fails
            raise

    def _create_socket(self, timeout):
        return self._route.connect(self.host, self.port, timeout)


class _POP3_SSL(_LongLines, poplib.POP3_SSL):
    """poplib.POP3_SSL the same way; the certificate is checked against the host name, not the address."""

    def __init__(self, host: str, port: int, timeout: float, route: Route, context: ssl.SSLContext):
        self._route = route
        try:
            super().__init__(host, port, timeout=timeout, context=context)
        except BaseException:
            _close_socket(self)
            raise

    def _create_socket(self, timeout):
        return self.context.wrap_socket(self._route.connect(self.host, self.port, timeout),
                                        server_hostname=self.host)


def _text(exc: Exception) -> str:
    reply = exc.args[0] if exc.args else ''
    return reply.decode('utf-8', 'replace') if isinstance(reply, bytes) else str(reply)


def _greeting_failure(exc: poplib.error_proto, where: str) -> MailError:
    """The error for a first line that is not "+OK"; what the far end sent is not repeated.

    A port scan by proxy must learn nothing: a banner ("SSH-2.0-OpenSSH_9.2")
    would name the service and its version.
    """
    if _text(exc).startswith('-ERR'):   # a POP3 server that will not serve now (too many sessions, say)
        return connection_failure('server_busy', where)
    return connection_failure('not_a_mail_server', where)


def _response_code(text: str) -> str | None:
    match = re.match(r'-ERR \[([A-Z0-9/-]+)\]', text)
    return match.group(1) if match else None


def _close_socket(conn: poplib.POP3) -> None:
    with contextlib.suppress(OSError, AttributeError):   # the peer closed first, or there was no socket yet;
        conn.close()                                     # an error may be on its way out and must not be masked


class Pop3Session:
    """One logged-in POP3 connection; a context manager that QUITs (and so deletes) only on success."""

    def __init__(self, host: str, port: int, security: str, username: str, password: str,
                 timeout: float = 30, ssl_context: ssl.SSLContext | None = None, egress: Policy | None = None):
        """`egress`: the policy the server's resolved address must pass (None: no check)."""
        if security not in SECURITY:
            raise ValueError(f'security must be one of {SECURITY}, got {security!r}')
        # poplib sends "USER " + username as it is: a CR LF in it would start a command of our caller's choosing.
        for field, value in (('host', host), ('username', username), ('password', password)):
            check_setting(field, value)
        self.where = f'{host}:{port}'
        self.conn: poplib.POP3 | None = None
        context = ssl_context if ssl_context is not None else ssl.create_default_context()
        try:
            self._connect(host, port, security, timeout, context, egress)
            self._login(username, password)
        except BaseException:
            self._drop()
            raise

    def _connect(self, host, port, security, timeout, context, egress) -> None:
        """Connect and read the greeting; a failure is one of errors.CONNECTION_FAILURES, echoing nothing."""
        route = Route(egress)
        try:
            if security == 'tls':
                # poplib's own default context verifies nothing: always pass ours.
                self.conn = _POP3_SSL(host, port, timeout, route, context)
            else:
                self.conn = _POP3(host, port, timeout, route)
        except poplib.error_proto as exc:   # a first line that is not "+OK": not repeated, see _greeting_failure
            # Not chained: poplib's exception holds the line, and a logged traceback would repeat it.
            raise _greeting_failure(exc, self.where) from None
        except OSError as exc:   # refused, timed out, TLS failed; MailErrors from the route pass as they are
            probe = route.peer if security != 'tls' else None   # silent in clear text: does it want TLS?
            raise classify(exc, self.where, probe=probe, timeout=timeout) from exc
        if not self.conn.welcome.startswith(b'+OK'):   # poplib takes any line starting with "+"
            raise connection_failure('not_a_mail_server', self.where)
        if security == 'starttls':
            if 'STLS' not in self._call('asking capabilities', self.conn.capa):
                raise connection_failure('starttls_unavailable', self.where)
            try:
                self._call('starting TLS', self.conn.stls, context)
            except MailError as exc:
                if isinstance(exc.__cause__, ssl.SSLError):
                    raise classify(exc.__cause__, self.where, starttls=True) from exc.__cause__
                raise

    def _login(self, username: str, password: str) -> None:
        try:
            self.conn.user(username)   # some servers already refuse an unknown user here (RFC 1939, 7)
            self.conn.pass_(password)
        except poplib.error_proto as exc:   # the text is the server's reply, never our password
            text = _text(exc)
            if _response_code(text) in TEMPORARY_CODES:
                raise TemporaryMailError(f'{self.where} cannot open the mailbox now: {text}') from exc
            raise AuthenticationFailed(f'{self.where} rejected the login for {username!r}: {text}; '
                                       f'check the username and password') from exc
        except OSError as exc:
            raise TemporaryMailError(f'lost {self.where} during login: {exc}') from exc

    def _call(self, doing: str, send, *args, **kwargs):
        """send(*args) with poplib, ssl and socket exceptions turned into MailErrors."""
        try:
            return send(*args, **kwargs)
        except poplib.error_proto as exc:
            text = _text(exc)
            message = f'{self.where} refused {doing}: {text}'
            if _response_code(text) in TEMPORARY_CODES:
                raise TemporaryMailError(message) from exc
            raise PermanentMailError(message) from exc
        except ssl.SSLCertVerificationError as exc:   # before OSError: the SSL errors subclass it
            raise PermanentMailError(f'{self.where} presented a certificate we do not trust: '
                                     f'{exc.verify_message}') from exc
        except OSError as exc:   # refused, timed out, reset, closed, other TLS failures
            raise TemporaryMailError(f'cannot reach {self.where} while {doing}: {exc}') from exc

    def _connected(self) -> poplib.POP3:
        if self.conn is None:
            raise TemporaryMailError(f'the session with {self.where} is closed; open a new one')
        return self.conn

    @staticmethod
    def _check_number(number) -> None:
        # A unique id in place of a number would go out as "DELE 00000002..." and be refused.
        if not isinstance(number, int):
            raise TypeError(f'POP3 commands take message numbers (the values of uidl()), got {number!r}')

    def uidl(self) -> dict[str, int]:
        """{unique id: message number} for every message in the maildrop."""
        _, lines, _ = self._call('listing unique ids (UIDL)', self._connected().uidl)
        ids = {}
        for line in lines:
            number, unique_id = line.split(None, 1)
            ids[unique_id.strip().decode('ascii', 'replace')] = int(number)
        return ids

    def fetch(self, number: int) -> bytes:
        """The raw message `number` with CRLF line ends, dot-unstuffed (RFC 1939, 3)."""
        self._check_number(number)
        _, lines, _ = self._call(f'fetching message {number}', self._connected().retr, number)
        return b'\r\n'.join(lines) + b'\r\n' if lines else b''

    def delete(self, numbers: Iterable[int]) -> None:
        """Mark messages deleted; they go when close() sends QUIT."""
        conn = self._connected()
        for number in numbers:
            self._check_number(number)
            self._call(f'deleting message {number}', conn.dele, number)

    def close(self) -> None:
        """QUIT, which deletes the marked messages; a no-op when already closed."""
        if self.conn is None:
            return
        conn, self.conn = self.conn, None
        try:
            self._call('committing deletions (QUIT)', conn.quit)
        finally:
            _close_socket(conn)   # quit() closes only on success

    def _drop(self) -> None:
        """Close the socket without QUIT: the server then deletes nothing (RFC 1939, 6)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            _close_socket(conn)

    def __enter__(self) -> 'Pop3Session':
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self._drop()
