"""Exceptions that say what the caller should do next.

Every MailError may carry a stable `code` that a caller can branch on and an
API can show; its message says in words what happened and how to fix it.
Connection failures use the codes in CONNECTION_FAILURES (built by
`connection_failure`): a fixed set, so that a failed connection tells the
user what to change and tells a port scanner nothing about what answered.
"""


class MailError(Exception):
    """A mail server or message problem; `code` names its kind when it is a known one."""

    code: str | None = None

    def __init__(self, *args, code: str | None = None):
        super().__init__(*args)
        # An instance attribute, so that pickling (BaseException keeps __dict__) carries it.
        self.code = code if code is not None else type(self).code


class TemporaryMailError(MailError):
    """Worth retrying later: 4xx replies, timeouts, refused connections."""


class PermanentMailError(MailError):
    """Retrying cannot help: 5xx replies, rejected login, malformed message."""


class AuthenticationFailed(PermanentMailError):
    """The server rejected the account's credentials."""

    code = 'auth_rejected'


class InvalidSetting(PermanentMailError, ValueError):
    """An account setting we refuse to send (a control character in a username, say); fix the setting.

    Also a ValueError: it is bad input, found before anything was sent.
    """

    code = 'invalid_setting'


def check_setting(field: str, value) -> None:
    """Raise InvalidSetting when value (a username, password, host or folder name) holds a control character.

    imaplib and poplib send CR and LF inside arguments as they are, so a
    username "bob\r\nDELE 1" became a command of its own. The message names
    the field, never the value: it may be a password.
    """
    if not isinstance(value, str):
        raise InvalidSetting(f'the {field} must be a string, got {type(value).__name__}')
    if not value.isprintable() and any(char < ' ' or char == '\x7f' for char in value):
        raise InvalidSetting(f'the {field} contains a control character (a line break, tab or NUL, say); '
                             f'remove it and save the setting again')


class FailNow(Exception):
    """A task error that retrying cannot fix (unknown account, tenant mismatch)."""


# code: (class, what happened, what the user can do). Permanent where trying
# again with the same settings cannot succeed; temporary where the network
# or the server may be different next time.
CONNECTION_FAILURES = {
    'refused': (TemporaryMailError, 'refused the connection',
                'nothing listens on that port now; check the host name and port'),
    'timed_out': (TemporaryMailError, 'timed out',
                  'check the host name and port, and that no firewall drops the connection'),
    'host_not_found': (TemporaryMailError, 'cannot be found (the host name does not resolve)',
                       'check the spelling of the host name'),
    'unreachable': (TemporaryMailError, 'cannot be reached (no route to the host)',
                    'check the host name; the network may be down'),
    'connection_lost': (TemporaryMailError, 'closed the connection before it was ready',
                        'the server may be restarting or limiting connections; it is tried again later'),
    'server_busy': (TemporaryMailError, 'turned the connection away for now',
                    'the server says it is busy or unavailable; it is tried again later'),
    'turned_away': (PermanentMailError, 'refuses to serve this client',
                    'the server will not talk to us; ask its operator why'),
    'tls_on_plain_port': (PermanentMailError, 'does not speak TLS on this port',
                          'try security "starttls" or "none", or port 993 (IMAP), 995 (POP3) or 465 (SMTP)'),
    'plain_on_tls_port': (PermanentMailError, 'expects TLS from the first byte on this port',
                          'try security "tls", or port 143 (IMAP), 110 (POP3) or 587 (SMTP) with "starttls"'),
    'tls_failed': (PermanentMailError, 'could not agree on a TLS connection with us',
                   'the server may offer only outdated TLS versions or ciphers'),
    'certificate_untrusted': (PermanentMailError, 'presented a certificate we do not trust',
                              'the certificate must be valid for this host name and signed by a trusted authority'),
    'not_a_mail_server': (PermanentMailError, 'does not greet like a mail server of this protocol',
                          'check the port: it belongs to another service or another mail protocol'),
    'starttls_unavailable': (PermanentMailError, 'does not offer STARTTLS',
                             ('use security "tls" on the implicit-TLS port; we never log in without TLS '
                              'unless security is "none"')),
    'destination_not_allowed': (PermanentMailError, 'is not an address this service may connect to',
                                ('the egress policy refuses loopback, link-local, metadata and denied '
                                 'networks; use the mail server\'s public name')),
}


def connection_failure(code: str, where: str, detail: str = '') -> MailError:
    """The error for a failed connection to `where` ('host:port'): fixed text, a hint, and `.code`.

    `detail` is ours to add (a certificate check's verdict), never what the
    far end sent before it proved to be a mail server.
    """
    cls, happened, hint = CONNECTION_FAILURES[code]
    detail = f' ({detail})' if detail else ''
    return cls(f'{where} {happened}{detail}: {hint}', code=code)


def shown(value, limit: int = 80) -> str:
    """repr(value) cut to about `limit` characters: a megabyte of bad input must not make a megabyte of error."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f'{value[:limit]!r}... ({len(value)} long)'
    return repr(value)
