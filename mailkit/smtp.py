"""Compose a message and hand it to a submission server (RFC 5321, RFC 6409).

The transaction
---------------
An SMTP session is a dialogue of commands and three-digit replies. A reply
starting with 2 means done, 3 go on, 4 not now (try again later), 5 never.

1. Connect. With security 'tls' the connection is TLS from the first byte
   (port 465, RFC 8314); the server greets with 220.
2. EHLO: the server lists its extensions (STARTTLS, AUTH, SIZE, 8BITMIME).
3. STARTTLS (security 'starttls', port 587, RFC 3207): upgrade the plain
   connection, then EHLO again, because what the server said before TLS
   may have been forged (RFC 3207, 4.2). A server that does not offer
   STARTTLS gets no password and no message from us.
4. AUTH PLAIN or LOGIN (RFC 4954) when we have credentials.
5. MAIL FROM, then one RCPT TO per recipient. Each RCPT has its own reply:
   some recipients may be refused while others are accepted; we send to
   the accepted ones and report the refused ones.
6. DATA: the server answers 354, we send the message with lines that start
   with "." doubled (RFC 5321, 4.5.2) and end it with a line holding a
   single "." (the end-of-data mark). The reply to that mark is the
   server's verdict: a 250 means it has taken responsibility for delivery
   (RFC 5321, 6.1).
7. QUIT.

Why the phase matters: never sending twice
------------------------------------------
Until the end-of-data mark has gone out, the server has nothing it may
deliver: a server must not deliver a message whose data it did not see
complete (RFC 5321, 4.1.1.4). Any failure up to then (a refused
connection, a timeout, a 4xx reply, a drop in the middle of the message) is
safe to retry from scratch. After the mark, a lost connection or a timeout
before the reply is ambiguous: the server may have queued the message and
failed only to tell us. Retrying then may deliver the message twice
(RFC 1047 describes exactly this window). So send() drives smtplib one
command at a time, knows which side of the mark a failure is on, and
raises DeliveryUnknown (a TemporaryMailError) only for that window; the
caller's outbox decides whether to retry. RFC 5321, 4.5.3.2.6 gives a
server up to 10 minutes to answer the mark: `verdict_timeout` lets the
caller wait longer there than for other replies, since giving up early
turns a delivery into an unknown.

The Message-ID is the caller's, made once per outbox entry: a retried
message carries the same id, so a receiver (or a person) can recognise a
duplicate.

Errors
------
Every foreign exception is translated once, where it enters: a 4xx reply
is TemporaryMailError, a 5xx reply PermanentMailError (by_reply), a
rejected login AuthenticationFailed, a dropped connection
TemporaryMailError. Connecting goes through mailkit.egress (its policy, when
given, checks the resolved address); a failure to connect, greet or start
TLS carries one of the fixed codes of errors.CONNECTION_FAILURES and never
repeats what the far end sent before a reply-shaped greeting.

Composing
---------
compose() writes the top-level headers itself. CPython 3.11's email
policies fold a long non-ASCII header into encoded words and lose a space
at the folds (NOTES.md), and headers are what a recipient sees. Here a
header with non-ASCII text is encoded whole as UTF-8 base64 encoded words
(RFC 2047) of whole characters, spaces inside the words, so whitespace
between the words (which decoders drop, RFC 2047 6.2) carries nothing. The
MIME body parts come from email.message.MIMEPart with a 7bit policy,
whose output (RFC 2231 file names included) round-trips; only its header
folding of free text is broken, and we never give it free text.

A display name too long for one encoded word takes several. CPython 3.11's
own parser (policy.default) reads the whitespace between them as a space
(CPython gh-128110); email.header.decode_header, mailkit.mime and mail
clients follow RFC 2047 and read the name exactly.
"""

import base64
import contextlib
import email.policy
import email.utils
import re
import select
import smtplib
import socket
import ssl
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import MIMEPart

from mailkit.egress import Policy, Route, classify
from mailkit.errors import (AuthenticationFailed, MailError, PermanentMailError, TemporaryMailError, check_setting,
                            connection_failure, shown)

__all__ = ['DeliveryUnknown', 'SendResult', 'by_reply', 'compose', 'envelope_recipients',
           'make_message_id', 'parse_address', 'send']

SECURITY = ('tls', 'starttls', 'none')
AUTH_MECHANISMS = ('PLAIN', 'LOGIN')

# RFC 5322, 2.1.1: lines SHOULD be at most 78 characters.
MAX_LINE = 78
# An encoded word is at most 75 characters and a line holding one at most 76
# (RFC 2047, 2). 36 UTF-8 bytes make 48 base64 characters, a 60-character
# word: it fits on the first line after "Subject: " and on any folded line.
WORD_BYTES = 36
# Plain ASCII words longer than this are encoded instead, so no line of ours
# gets near the 998-character limit (RFC 5322, 2.1.1).
MAX_PLAIN_WORD = 60
# RFC 5321, 4.5.3.1.3: a path is at most 256 octets with its angle brackets.
MAX_ADDRESS = 254
# Exchange Online takes at most 1,000 recipients per message and Gmail 500;
# a longer list is a mistake or an attack, and each entry costs a parse.
MAX_RECIPIENTS = 1000
# File systems keep names to 255 bytes, so no real file has a longer one; the
# stdlib's RFC 2231 folding takes seconds on a megabyte of name.
MAX_FILENAME = 255

# Not 8bit: a server without 8BITMIME (RFC 6152) may mangle 8-bit bodies, and
# policy.SMTP would choose 8bit for non-ASCII text. Text gets quoted-printable
# or base64, whichever is shorter; attachments base64.
_MIME_POLICY = email.policy.SMTP.clone(cte_type='7bit')

# RFC 5322, 3.2.3.
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
_DOT_ATOM = re.compile(rf'{_ATEXT}+(?:\.{_ATEXT}+)*')
_QUOTED_LOCAL = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_PHRASE_ATOMS = re.compile(rf'{_ATEXT}+(?: {_ATEXT}+)*')
# Words of printable ASCII separated by single spaces, none longer than MAX_PLAIN_WORD.
_PLAIN_WORDS = re.compile(rf'[\x21-\x7e]{{1,{MAX_PLAIN_WORD}}}+(?: [\x21-\x7e]{{1,{MAX_PLAIN_WORD}}}+)*+')
# One entry of an address list: text and quoted strings up to a comma outside
# quotes, starting at something other than a blank (blank entries are no
# entries); an unclosed quote runs to the end. Possessive, so a failed
# attempt gives nothing back to try again: linear in the length of the list.
_QUOTED = r'"(?:[^"\\]++|\\.)*+"?'
_ADDRESS_LIST_ENTRY = re.compile(rf'\s*+(?:[^",\s]|{_QUOTED})(?:[^",]++|{_QUOTED})*+', re.DOTALL)
_HOST_LABEL = re.compile(r'[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?')
_ADDRESS_LITERAL = re.compile(r'\[(?:\d{1,3}(?:\.\d{1,3}){3}|IPv6:[0-9A-Fa-f:.]+)\]')
_NAME_AND_ADDRESS = re.compile(r'(?P<name>.*?)\s*<(?P<address>[^<>]*)>', re.DOTALL)
_HEADER_NAME = re.compile(r'[\x21-\x39\x3b-\x7e]+')   # printable ASCII but ":" (RFC 5322, 2.2)
_MESSAGE_ID = re.compile(r'<[^<>\s@]+@[^<>\s@]+>')
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+")
_LINE_ENDS = re.compile(rb'\r\n|\r|\n')
_LEADING_DOT = re.compile(rb'^\.', re.MULTILINE)

# Set by compose(); extra_headers must not repeat them.
_OWN_HEADERS = {'from', 'to', 'cc', 'bcc', 'subject', 'date', 'message-id', 'mime-version'}
# Extra headers whose values are address lists, rendered like To.
_ADDRESS_HEADERS = {'reply-to', 'sender'}


class DeliveryUnknown(TemporaryMailError):
    """The connection failed after the end of the message went out: the server may have accepted it."""


@dataclass
class SendResult:
    """What the server accepted: its recipients, the ones it refused and its reply to the message."""
    accepted: list[str]
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)   # address -> (code, reply text)
    reply: str = ''   # the answer to the end of the message; often names the server's queue id


def by_reply(code: int) -> type[MailError]:
    """The error class for an SMTP reply code: 5xx Permanent, anything else Temporary."""
    # A reply that is neither 4xx nor 5xx here is garbled or out of place
    # (smtplib reports an unreadable code as -1); another attempt may go better.
    return PermanentMailError if 500 <= code <= 599 else TemporaryMailError


def make_message_id(domain: str) -> str:
    """A new globally unique Message-ID, '<uuid@domain>' (RFC 5322, 3.6.4)."""
    return f'<{uuid.uuid4().hex}@{_domain(domain)}>'


# ---------------------------------------------------------------- addresses

def parse_address(text: str) -> tuple[str, str]:
    """('display name', 'local@domain') from 'Name <local@domain>', '"Name" <...>' or 'local@domain'."""
    if not isinstance(text, str):
        raise ValueError(f'an email address must be a string, got {type(text).__name__}')
    if '\r' in text or '\n' in text:
        raise ValueError(f'{shown(text)} is not an email address: it contains a line break')
    stripped = text.strip()
    if not stripped:
        raise ValueError('an email address cannot be empty')
    # 'Name <address>': the address runs from the last "<" to the closing ">".
    # Found with rfind, not a regular expression: '(.*?)\s*<' tried a run of
    # spaces from each of its characters, and 100,000 spaces took 8 s.
    if stripped.endswith('>'):
        opening = stripped.rfind('<')
        address = stripped[opening + 1:-1]
        if opening >= 0 and '>' not in address:
            return _display_name(stripped[:opening]), _addr_spec(address.strip(), text)
    if '<' in stripped or '>' in stripped:
        raise ValueError(f'{shown(text)} is not an email address: use "Name <local@domain>", '
                         f'with one "<" and a ">" at the end')
    return '', _addr_spec(stripped, text)


def envelope_recipients(to, cc=(), bcc=()) -> list[str]:
    """The addresses to give RCPT TO: to, cc and bcc, names dropped, each mailbox once, in order."""
    seen, addresses = set(), []
    entries = [*to, *cc, *bcc]
    _check_count('to, cc and bcc together', entries)
    for entry in entries:
        address = parse_address(entry)[1]
        # Local parts are case-sensitive in theory (RFC 5321, 2.4) and never in
        # practice; one mailbox getting the message twice is the worse outcome.
        if address.lower() not in seen:
            seen.add(address.lower())
            addresses.append(address)
    return addresses


def _display_name(raw: str) -> str:
    name = raw.strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':   # a quoted-string: undo its escapes (RFC 5322, 3.2.4)
        name = re.sub(r'\\(.)', r'\1', name[1:-1])
    return name


def _addr_spec(address: str, original: str) -> str:
    """address checked against RFC 5321's Mailbox syntax, its domain in ASCII (IDNA)."""
    def invalid(reason: str) -> ValueError:
        return ValueError(f'{shown(original)} is not an email address: {reason}')

    if not address:
        raise invalid('the part in <...> is empty')
    if len(address) > MAX_ADDRESS:
        raise invalid(f'it is longer than {MAX_ADDRESS} characters (RFC 5321, 4.5.3.1.3)')
    if '@' not in address:
        raise invalid('it has no "@"')
    local, domain = address.rsplit('@', 1)
    if not local:
        raise invalid('nothing before the "@"')
    if not local.isascii():
        # A non-ASCII local part needs SMTPUTF8 (RFC 6531) end to end; we send plain SMTP.
        raise invalid(f'the part before "@" ({shown(local)}) must be ASCII')
    if not (_DOT_ATOM.fullmatch(local) or _QUOTED_LOCAL.fullmatch(local)):
        if ',' in address or ' ' in address:
            raise invalid('give one address per entry, with no spaces in it')
        raise invalid(f'{shown(local)} before the "@" has a character that needs quoting, or a stray "."')
    try:
        return f'{local}@{_domain(domain)}'
    except ValueError as exc:
        raise invalid(str(exc)) from None


def _domain(domain: str) -> str:
    """domain in ASCII: an internationalised name becomes its IDNA (punycode) form."""
    if _ADDRESS_LITERAL.fullmatch(domain):
        return domain
    # Checked before IDNA: an encoded name is never shorter than the Unicode
    # one, and punycode takes time quadratic in a label's length.
    if not domain or len(domain) > 253:
        raise ValueError(f'{shown(domain)} after the "@" is not a host name: it must be 1 to 253 characters')
    if not domain.isascii():
        try:
            domain = domain.encode('idna').decode('ascii')
        except UnicodeError:
            raise ValueError(f'{shown(domain)} is not a valid international domain name') from None
    labels = domain.split('.')
    if len(domain) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f'{shown(domain)} after the "@" is not a host name '
                         f'(letters, digits and "-" in labels separated by single dots)')
    return domain


# ---------------------------------------------------------------- headers

def _encoded_words(text: str) -> list[str]:
    """text as UTF-8 base64 encoded words (RFC 2047, 4.1), each holding whole characters."""
    data = text.encode('utf-8')
    words, start = [], 0
    while start < len(data):
        end = min(start + WORD_BYTES, len(data))
        while end < len(data) and 0x80 <= data[end] < 0xC0:   # a continuation byte: cut before its character
            end -= 1
        words.append(data[start:end])
        start = end
    return [f'=?utf-8?b?{base64.b64encode(word).decode("ascii")}?=' for word in words or [b'']]


def _is_plain(text: str) -> bool:
    """True when text can go into a header as it is, split only at its single spaces."""
    # No leading, trailing or double spaces, no control or 8-bit characters,
    # no "=?" (it would read as the start of an encoded word).
    return _PLAIN_WORDS.fullmatch(text) is not None and '=?' not in text


def _check_one_line(what: str, text: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f'{what} must be a string, got {type(text).__name__}')
    if '\r' in text or '\n' in text:
        raise ValueError(f'{what} must be one line, got {shown(text)}')


def _text_tokens(text: str) -> list[str]:
    """Unstructured text (Subject) as the tokens of a header, folded only between tokens."""
    if not text:
        return []
    # Partly-ASCII text is encoded whole: mixing plain and encoded words puts
    # meaning into the whitespace between them, which is where folding goes wrong.
    return text.split(' ') if _is_plain(text) else _encoded_words(text)


def _mailbox_tokens(name: str, address: str) -> list[str]:
    """'Name <addr>' as header tokens; the name plain, quoted or encoded, as its characters require."""
    if not name:
        return [address]
    if _is_plain(name) and _PHRASE_ATOMS.fullmatch(name):
        words = name.split(' ')
    elif _is_plain(name):
        # A quoted-string may be folded at its spaces like any other text (RFC 5322, 3.2.4).
        words = ('"' + name.replace('\\', '\\\\').replace('"', '\\"') + '"').split(' ')
    else:
        words = _encoded_words(name)
    return [*words, f'<{address}>']


def _split_address_list(value: str) -> list[str]:
    """'a@x, "Doe, John" <j@y>' -> its entries; commas inside quotes (RFC 5322, 3.2.4) do not split.

    Stops after MAX_RECIPIENTS + 1 entries: a longer list is refused anyway.
    """
    entries = []
    for match in _ADDRESS_LIST_ENTRY.finditer(value):
        entries.append(match.group())
        if len(entries) > MAX_RECIPIENTS:
            break
    return entries


def _check_count(what: str, entries) -> None:
    if len(entries) > MAX_RECIPIENTS:
        raise ValueError(f'{what}: at most {MAX_RECIPIENTS} addresses, got {len(entries)}')


def _address_list_tokens(what: str, entries) -> list[str]:
    _check_count(what, entries)
    tokens = []
    for entry in entries:
        try:
            mailbox = _mailbox_tokens(*parse_address(entry))
        except ValueError as exc:
            raise ValueError(f'{what}: {exc}') from None
        if tokens:
            tokens[-1] += ','
        tokens.extend(mailbox)
    return tokens


def _header(name: str, tokens: list[str]) -> bytes:
    """'Name: tokens' joined by single spaces, folded before a token that would pass MAX_LINE."""
    lines, line = [], f'{name}:'
    for token in tokens:
        if len(line) + 1 + len(token) > MAX_LINE and line.strip() != f'{name}:':
            lines.append(line)
            line = ''
        line += ' ' + token
    lines.append(line)
    return ('\r\n'.join(lines) + '\r\n').encode('ascii')


def _extra_header(name: str, value: str) -> bytes:
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        raise ValueError(f'{name!r} is not a header name (printable ASCII without ":" or spaces)')
    if name.lower() in _OWN_HEADERS or name.lower().startswith('content-'):
        raise ValueError(f'{name} is written by compose(); pass it as an argument, not in extra_headers')
    _check_one_line(f'the {name} header', value)
    if name.lower() in _ADDRESS_HEADERS:
        return _header(name, _address_list_tokens(f'the {name} header', _split_address_list(value)))
    return _header(name, _text_tokens(value))


def _date(date: datetime | None) -> str:
    if date is None:
        date = datetime.now(timezone.utc)
    elif date.tzinfo is None:
        date = date.replace(tzinfo=timezone.utc)   # a naive time is taken as UTC, as stored timestamps are
    return email.utils.format_datetime(date)


# ---------------------------------------------------------------- body

def _text_part(text: str, subtype: str) -> MIMEPart:
    part = MIMEPart(policy=_MIME_POLICY)
    part.set_content(text, subtype=subtype, charset='utf-8')
    return part


def _multipart(subtype: str, parts: list[MIMEPart]) -> MIMEPart:
    container = MIMEPart(policy=_MIME_POLICY)
    container['Content-Type'] = f'multipart/{subtype}'
    container.set_payload(parts)   # the generator picks a boundary found in none of the parts
    return container


def _attachment_part(filename: str, content_type: str, data: bytes) -> MIMEPart:
    _check_one_line('an attachment file name', filename)
    if len(filename) > MAX_FILENAME:
        raise ValueError(f'attachment {shown(filename)}: a file name is at most {MAX_FILENAME} characters')
    if not isinstance(content_type, str) or not _CONTENT_TYPE.fullmatch(content_type):
        raise ValueError(f'attachment {filename!r}: content type must be "type/subtype", got {content_type!r}')
    maintype, subtype = content_type.lower().split('/')
    if maintype in ('multipart', 'message'):
        # message/* may not be base64-encoded (RFC 2046, 5.2.1), and the stdlib
        # writes its body with bare LFs; multipart is a structure, not a file.
        raise ValueError(f'attachment {filename!r}: {content_type} cannot be attached as a file; '
                         f'use application/octet-stream')
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f'attachment {filename!r}: data must be bytes, got {type(data).__name__}')
    part = MIMEPart(policy=_MIME_POLICY)
    # A non-ASCII name goes out as RFC 2231 filename*=utf-8''..., split into
    # filename*0*, *1* ... sections when long.
    part.set_content(bytes(data), maintype, subtype, disposition='attachment', filename=filename)
    return part


def _body(body_text: str, body_html: str | None, attachments) -> MIMEPart:
    if body_html is None:
        body = _text_part(body_text, 'plain')
    elif not body_text:
        body = _text_part(body_html, 'html')   # an empty text alternative would show as a blank message
    else:
        # The last alternative is the preferred one (RFC 2046, 5.1.4).
        body = _multipart('alternative', [_text_part(body_text, 'plain'), _text_part(body_html, 'html')])
    if attachments:
        body = _multipart('mixed', [body, *(_attachment_part(*attachment) for attachment in attachments)])
    return body


def compose(*, sender: tuple[str, str], to, cc=(), bcc=(), subject: str = '', body_text: str = '',
            body_html: str | None = None, attachments=(), message_id: str, date: datetime | None = None,
            extra_headers: dict | None = None) -> bytes:
    """The message as RFC 5322 bytes with CRLF line ends; bcc is checked but never written."""
    sender_name, sender_address = sender
    _check_one_line('the sender name', sender_name)
    _check_one_line('the subject', subject)
    if not isinstance(message_id, str) or not _MESSAGE_ID.fullmatch(message_id):
        raise ValueError(f'message_id must look like <unique@domain>, got {message_id!r}')
    for entry in bcc:
        parse_address(entry)   # a bad Bcc must fail here too, not at RCPT time
    headers = [_header('From', _mailbox_tokens(sender_name, parse_address(sender_address)[1]))]
    if to:
        headers.append(_header('To', _address_list_tokens('a To address', to)))
    if cc:
        headers.append(_header('Cc', _address_list_tokens('a Cc address', cc)))
    headers += [_header('Subject', _text_tokens(subject)),
                _header('Date', [_date(date)]),
                _header('Message-ID', [message_id])]
    headers += [_extra_header(name, value) for name, value in (extra_headers or {}).items()]
    headers.append(b'MIME-Version: 1.0\r\n')
    # The body's own bytes start with its Content-* headers, then the blank line.
    return b''.join(headers) + _body(body_text, body_html, attachments).as_bytes()


# ---------------------------------------------------------------- sending

def _reply_text(reply) -> str:
    text = reply.decode('utf-8', 'replace') if isinstance(reply, bytes) else str(reply)
    return ' '.join(text.split())   # multi-line replies arrive joined by newlines


@contextlib.contextmanager
def _step(where: str, doing: str):
    """Turn the smtplib, ssl and socket exceptions raised while `doing` into MailErrors."""
    try:
        yield
    except smtplib.SMTPResponseException as exc:   # one reply that refuses the step
        raise by_reply(exc.smtp_code)(f'{where} answered {exc.smtp_code} '
                                      f'{_reply_text(exc.smtp_error)!r} to {doing}') from exc
    except smtplib.SMTPServerDisconnected as exc:   # also what smtplib makes of timeouts while reading
        raise TemporaryMailError(f'connection failure: {where} went away while {doing}: {exc}') from exc
    except smtplib.SMTPException as exc:   # smtplib's own verdicts, such as "STARTTLS extension not supported"
        raise PermanentMailError(f'{where}: {exc} (while {doing})') from exc
    except ssl.SSLCertVerificationError as exc:   # before OSError: the SSL errors subclass it
        raise PermanentMailError(f'{where} presented a certificate we do not trust: {exc.verify_message}') from exc
    except OSError as exc:   # last: refused, reset, timed out, other TLS failures; the SMTP errors subclass it
        raise TemporaryMailError(f'connection failure: cannot reach {where} while {doing}: {exc}') from exc


def _expect(where: str, doing: str, reply: tuple[int, bytes], *ok: int) -> None:
    code, text = reply
    if code not in ok:
        raise by_reply(code)(f'{where} answered {code} {_reply_text(text)!r} to {doing}')


class _NotSmtp(smtplib.SMTPException):
    """The first bytes from the server are not an SMTP reply."""


class _Greeted:
    """smtplib.SMTP with its socket from egress.Route, and a first line checked before smtplib reads on.

    smtplib reads "SSH-2.0-OpenSSH_9.2 ..." as a reply with code -1 whose
    fourth character "-" announces more lines, and waits for them until the
    timeout. Checking the first bytes ends such a connection at once.
    """

    def _get_socket(self, host, port, timeout):
        return self._route.connect(host, port, timeout, self.source_address)

    def connect(self, host='localhost', port=0, source_address=None):
        try:
            return super().connect(host, port, source_address)
        except BaseException:
            self.close()   # smtplib leaves the socket open when the greeting cannot be read
            raise

    def getreply(self):
        if not self._greeted:
            self._greeted = True
            if self.file is None:
                self.file = self.sock.makefile('rb')
            head = self.file.peek(4)[:4]   # one read at most; smtplib reads the same bytes next
            if not head:
                raise smtplib.SMTPServerDisconnected('the server closed the connection before its greeting')
            if not (head[:3].isdigit() and head[3:4] in (b'', b' ', b'-', b'\r', b'\n')):
                raise _NotSmtp('the first line is not an SMTP reply')
        return super().getreply()


class _SMTP(_Greeted, smtplib.SMTP):
    def __init__(self, host, port, local_hostname, timeout, route: Route):
        self._route, self._greeted = route, False
        super().__init__(host, port, local_hostname, timeout=timeout)


class _SMTP_SSL(_Greeted, smtplib.SMTP_SSL):
    def __init__(self, host, port, local_hostname, timeout, route: Route, context: ssl.SSLContext):
        self._route, self._greeted = route, False
        super().__init__(host, port, local_hostname, timeout=timeout, context=context)

    def _get_socket(self, host, port, timeout):
        # The certificate is checked against the host name given, not the address reached.
        return self.context.wrap_socket(super()._get_socket(host, port, timeout), server_hostname=self._host)


def _connect(host: str, port: int, security: str, timeout: float, context: ssl.SSLContext,
             local_hostname: str | None, egress: Policy | None = None) -> smtplib.SMTP:
    """A connection that has been greeted with 220 (over TLS for 'tls'); a failure is one of
    errors.CONNECTION_FAILURES, and echoes nothing the far end sent."""
    where = f'{host}:{port}'
    route = Route(egress)
    # The host goes to the constructor, not to a later connect(): smtplib names
    # the server for TLS certificate checks from the constructor's host only.
    try:
        if security == 'tls':
            conn = _SMTP_SSL(host, port, local_hostname, timeout, route, context)
        else:
            conn = _SMTP(host, port, local_hostname, timeout, route)
    except _NotSmtp:   # not chained, here and below: what the far end sent stays out of tracebacks too
        raise connection_failure('not_a_mail_server', where) from None
    except smtplib.SMTPConnectError as exc:   # a greeting other than 220 (RFC 5321, 3.1: 554 means no service)
        code = 'server_busy' if 400 <= exc.smtp_code <= 499 else 'turned_away'
        raise connection_failure(code, where, f'greeting {exc.smtp_code}') from None
    except smtplib.SMTPServerDisconnected as exc:   # smtplib's name for EOF and for a timeout while reading
        cause = exc.__context__ if isinstance(exc.__context__, OSError) else ConnectionAbortedError()
        probe = route.peer if security != 'tls' else None   # silent in clear text: does it want TLS?
        raise classify(cause, where, probe=probe, timeout=timeout) from exc
    except OSError as exc:   # refused, timed out, TLS failed; MailErrors from the route pass as they are
        probe = route.peer if security != 'tls' else None
        raise classify(exc, where, probe=probe, timeout=timeout) from exc
    # SMTP is a dialogue of short lines; with Nagle's algorithm a line written
    # right after another waits for the peer's delayed ACK (40 ms on Linux).
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _greet(conn: smtplib.SMTP, where: str, security: str, context: ssl.SSLContext) -> None:
    """EHLO and, for 'starttls', the upgrade to TLS and a second EHLO."""
    with _step(where, 'saying EHLO'):
        conn.ehlo_or_helo_if_needed()
    if security != 'starttls':
        return
    if not conn.has_extn('starttls'):
        raise connection_failure('starttls_unavailable', where)
    with _step(where, 'starting TLS'):
        try:
            conn.starttls(context=context)   # forgets the first EHLO's answer (RFC 3207, 4.2)
        except ssl.SSLError as exc:   # the handshake failed: an untrusted certificate, say
            raise classify(exc, where, starttls=True) from exc
        conn.ehlo_or_helo_if_needed()


def _offered_mechanisms(conn: smtplib.SMTP, where: str) -> list[str]:
    if not conn.has_extn('auth'):
        # aiosmtpd, Postfix and others hide AUTH until the connection is encrypted.
        raise PermanentMailError(f'{where} does not offer AUTH on this connection; '
                                 f'use security "starttls" or "tls", or no username')
    return conn.esmtp_features['auth'].upper().split()


def _authenticate(conn: smtplib.SMTP, where: str, username: str, password: str, mechanism: str | None) -> None:
    """AUTH PLAIN or LOGIN with UTF-8 credentials; a rejection is AuthenticationFailed."""
    offered = _offered_mechanisms(conn, where)
    if mechanism is None:
        mechanism = next((name for name in AUTH_MECHANISMS if name in offered), None)
        if mechanism is None:
            raise PermanentMailError(f'{where} offers AUTH {" ".join(offered)}; we speak PLAIN and LOGIN')
    elif mechanism not in offered:
        raise PermanentMailError(f'{where} does not offer AUTH {mechanism} (it offers {" ".join(offered)})')
    # Our own AUTH, not smtplib.login(): smtplib 3.11 encodes credentials as
    # ASCII and raises UnicodeEncodeError on a password like "pässword".
    with _step(where, f'logging in (AUTH {mechanism})'):
        reply = _auth_plain(conn, username, password) if mechanism == 'PLAIN' else \
            _auth_login(conn, username, password)
    code, text = reply
    if code == 235:
        return
    message = f'{where} answered {code} {_reply_text(text)!r} to the login of {username!r} (AUTH {mechanism})'
    if 400 <= code <= 499:   # 454: a temporary authentication failure (RFC 4954, 6)
        raise TemporaryMailError(message)
    if 500 <= code <= 599:
        raise AuthenticationFailed(f"{message}; check the username and password")
    raise PermanentMailError(message)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode('utf-8')).decode('ascii')


def _auth_plain(conn: smtplib.SMTP, username: str, password: str) -> tuple[int, bytes]:
    # RFC 4616: authorization id (empty: the same as the login), login, password, NUL-separated,
    # sent as the initial response of RFC 4954.
    return conn.docmd('AUTH', 'PLAIN ' + _b64(f'\0{username}\0{password}'))


def _auth_login(conn: smtplib.SMTP, username: str, password: str) -> tuple[int, bytes]:
    # LOGIN (draft-murchison-sasl-login): the server asks for the name, then the
    # password. Without an initial response, which some old servers reject.
    reply = conn.docmd('AUTH', 'LOGIN')
    for answer in (username, password):
        if reply[0] != 334:
            return reply
        reply = conn.docmd(_b64(answer))
    return reply


def _envelope(conn: smtplib.SMTP, where: str, mail_from: str, rcpt_to: list[str],
              size: int, eight_bit: bool) -> tuple[list[str], dict[str, tuple[int, str]]]:
    """MAIL FROM and one RCPT TO each; returns (accepted, refused). Raises when nobody is accepted."""
    options = []
    if conn.has_extn('size'):
        options.append(f'SIZE={size}')   # a server can refuse a message too big now, before we send it
    if eight_bit and conn.has_extn('8bitmime'):
        options.append('BODY=8BITMIME')   # RFC 6152; compose() output is 7-bit and needs none
    with _step(where, 'MAIL FROM'):
        reply = conn.mail(mail_from, options)
    _expect(where, 'MAIL FROM', reply, 250)
    accepted, refused = [], {}
    for address in rcpt_to:
        with _step(where, f'RCPT TO:<{address}>'):
            code, text = conn.rcpt(address)
        if code in (250, 251):   # 251: not local, will forward (RFC 5321, 3.4)
            accepted.append(address)
        else:
            refused[address] = (code, _reply_text(text))
    if not accepted:
        best = min(code for code, _ in refused.values())   # one 4xx makes a later attempt worth it
        replies = '; '.join(f'{address}: {code} {text}' for address, (code, text) in refused.items())
        raise by_reply(best)(f'{where} refused every recipient (best reply {best}): {replies}')
    return accepted, refused


END_OF_DATA = b'.\r\n'


def _for_data(data: bytes) -> bytes:
    """data with CRLF line ends and leading dots doubled, ready for the end-of-data mark (RFC 5321, 4.5.2)."""
    data = _LINE_ENDS.sub(b'\r\n', bytes(data))
    if not data.endswith(b'\r\n'):
        data += b'\r\n'
    return _LEADING_DOT.sub(b'..', data)


def _transfer(conn: smtplib.SMTP, where: str, data: bytes, verdict_timeout: float, before_commit) -> str:
    """DATA, the message and the end-of-data mark; returns the server's 2xx reply to the mark."""
    with _step(where, 'DATA'):
        reply = conn.docmd('DATA')
    _expect(where, 'DATA', reply, 354)
    # Until the end-of-data mark goes out the server cannot deliver, and a
    # retry is safe; `before_commit` lets the caller record the point after
    # which it no longer is, as late as it can be.
    with _step(where, 'sending the message (before its end-of-data mark)'):
        conn.send(_for_data(data))
    if before_commit is not None:
        before_commit()
    with _step(where, 'sending the end-of-data mark'):
        conn.send(END_OF_DATA)
    return _verdict(conn, where, verdict_timeout)


def _verdict(conn: smtplib.SMTP, where: str, timeout: float) -> str:
    """The reply to the end-of-data mark: the one place where a failure leaves delivery unknown."""
    try:
        conn.sock.settimeout(timeout)
        code, text = conn.getreply()
    except OSError as exc:   # smtplib turns a timeout or EOF into SMTPServerDisconnected, an OSError
        raise DeliveryUnknown(f'connection failure: {where} took the whole message but sent no reply '
                              f'({exc}); it may have been delivered') from exc
    if 200 <= code <= 299:
        return _reply_text(text)
    if 400 <= code <= 599:
        raise by_reply(code)(f'{where} answered {code} {_reply_text(text)!r} to the end of the message; '
                             f'it was not accepted')
    raise DeliveryUnknown(f'{where} answered the end of the message with {code} {_reply_text(text)!r}, '
                          f'which says neither yes nor no')


def _quit(conn: smtplib.SMTP) -> None:
    """Say QUIT and close; a failure here cannot change what the server has already decided."""
    try:
        with contextlib.suppress(smtplib.SMTPException, OSError):   # the server went first; the outcome is known
            if conn.sock is not None:
                conn.quit()
    finally:
        conn.close()


def _check_send_arguments(host, security, username, password, auth_mechanism, local_hostname) -> None:
    if security not in SECURITY:
        raise ValueError(f'security must be one of {SECURITY}, got {security!r}')
    if username is not None and password is None:
        raise ValueError('a username needs a password')
    # AUTH sends credentials in base64, but a NUL would end them early in
    # PLAIN (RFC 4616), and the EHLO name goes out as it is.
    for name, value in (('host', host), ('username', username), ('password', password),
                        ('local host name', local_hostname)):
        if value is not None:
            check_setting(name, value)
    if auth_mechanism is not None and auth_mechanism not in AUTH_MECHANISMS:
        raise ValueError(f'auth_mechanism must be one of {AUTH_MECHANISMS} or None, got {auth_mechanism!r}')


def _envelope_addresses(mail_from: str, rcpt_to: list[str]) -> tuple[str, list[str]]:
    """Bare, checked addresses for MAIL FROM and RCPT TO: no name, space or line break reaches a command."""
    if not rcpt_to:
        raise ValueError('rcpt_to is empty: a message needs at least one recipient')
    _check_count('rcpt_to', rcpt_to)
    # "" is the null reverse-path, MAIL FROM:<> (RFC 5321, 4.5.5).
    return (parse_address(mail_from)[1] if mail_from else '',
            [parse_address(address)[1] for address in rcpt_to])


class SmtpConnection:
    """A greeted (and logged-in) SMTP session that carries one transaction after another.

    RFC 5321, 3.3: after the reply to the end-of-data mark the session is
    ready for the next MAIL FROM, so a sender with many messages for one
    server pays connect, TLS and AUTH once. A transaction that fails leaves
    the session in a state we do not know: the caller drops it (``__exit__``
    with an exception, or ``abort()``).
    """

    # Servers cap messages per connection (Exchange and Gmail near 100) and answer 4xx past it.
    MAX_TRANSACTIONS = 100

    def __init__(self, host: str, port: int, security: str, username: str | None, password: str | None,
                 timeout: float = 30, ssl_context: ssl.SSLContext | None = None,
                 local_hostname: str | None = None, auth_mechanism: str | None = None,
                 egress: Policy | None = None) -> None:
        """`egress`: the policy the server's resolved address must pass (None: no check)."""
        _check_send_arguments(host, security, username, password, auth_mechanism, local_hostname)
        self.where, self.timeout, self.transactions = f'{host}:{port}', timeout, 0
        # smtplib's own default context verifies nothing: always pass ours.
        context = ssl_context if ssl_context is not None else ssl.create_default_context()
        self.conn = _connect(host, port, security, timeout, context, local_hostname, egress)
        try:
            _greet(self.conn, self.where, security, context)
            if username is not None:
                _authenticate(self.conn, self.where, username, password, auth_mechanism)
        except BaseException:
            self.abort()
            raise

    def send(self, mail_from: str, rcpt_to: list[str], data: bytes, verdict_timeout: float | None = None,
             before_commit=None) -> SendResult:
        """One transaction; raises a MailError unless someone accepted the message.

        `before_commit()` is called after the message and before its end-of-data
        mark: if it raises, nothing is delivered."""
        mail_from, rcpt_to = _envelope_addresses(mail_from, rcpt_to)
        self.conn.sock.settimeout(self.timeout)   # the last verdict may have set its own
        accepted, refused = _envelope(self.conn, self.where, mail_from, rcpt_to, len(data), not data.isascii())
        reply = _transfer(self.conn, self.where, data, verdict_timeout if verdict_timeout is not None
                          else self.timeout, before_commit)
        self.transactions += 1
        return SendResult(accepted, refused, reply)

    def usable(self, probe: bool) -> bool:
        """Whether another transaction may start here; `probe` asks the server with NOOP."""
        if self.conn.sock is None or self.transactions >= self.MAX_TRANSACTIONS:
            return False
        # An idle session has nothing to read unless the server said 421 or hung up.
        if select.select([self.conn.sock], [], [], 0)[0]:
            return False
        if probe:
            with contextlib.suppress(smtplib.SMTPException, OSError):   # any failure: not usable
                return self.conn.noop()[0] == 250
            return False
        return True

    def close(self) -> None:
        _quit(self.conn)

    def abort(self) -> None:
        """Close without QUIT: after a failure the server may not be listening for commands."""
        self.conn.close()

    def __enter__(self) -> 'SmtpConnection':
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:   # a QUIT to a server that stopped answering would wait out the timeout again
            self.abort()


def send(host: str, port: int, security: str, username: str | None, password: str | None, mail_from: str,
         rcpt_to: list[str], data: bytes, timeout: float = 30, ssl_context: ssl.SSLContext | None = None,
         local_hostname: str | None = None, auth_mechanism: str | None = None,
         verdict_timeout: float | None = None, before_commit=None, egress: Policy | None = None) -> SendResult:
    """Send data to rcpt_to on a connection of its own; see SmtpConnection.send."""
    _envelope_addresses(mail_from, rcpt_to)   # bad addresses fail before connecting, as the rest do in __init__
    with SmtpConnection(host, port, security, username, password, timeout, ssl_context, local_hostname,
                        auth_mechanism, egress) as conn:
        return conn.send(mail_from, rcpt_to, data, verdict_timeout, before_commit)
