"""IMAP4rev1 (RFC 3501) for sync, on top of imaplib, with the extensions we rely on.

States and how a session walks them
-----------------------------------
A connection starts *not authenticated*. With security 'starttls' the plain
connection is upgraded by STARTTLS first; with 'tls' it is TLS from the first
byte (port 993). LOGIN (or AUTHENTICATE PLAIN for non-ASCII credentials)
moves it to *authenticated*, where LIST, CREATE, APPEND and ENABLE work.
SELECT (read-write) or EXAMINE (read-only) a folder moves it to *selected*,
where the UID commands work on that folder. A SELECT that fails leaves the
session authenticated, with no folder selected (RFC 3501, 6.3.1). LOGOUT ends
it. Writes (flags, move, expunge) need `select(readonly=False)`; the session
refuses them on a read-only selection itself, because Dovecot answers a STORE
there with OK and ignores it, yet carries out a UID MOVE. Servers change what they advertise as the state changes: Dovecot lists
CONDSTORE, QRESYNC, MOVE, UIDPLUS, ESEARCH only after login, so the session
takes the capabilities the server sends with the login reply (or asks again).

UIDs and the invariants a sync builds on
----------------------------------------
- A UID names one message in one folder and never changes or moves to another
  message while the folder's UIDVALIDITY stays the same (2.3.1.1). If
  UIDVALIDITY changes, every UID stored for that folder is meaningless, but
  the messages often are the same ones (a rebuilt index, a restored
  mailbox): `identities()` fetches each message's size, Message-ID and Date
  (a few hundred bytes each) so the caller can match what it stored instead
  of dropping and downloading the folder again.
- UIDs only grow. Every message that arrives after a SELECT gets a UID of at
  least that SELECT's UIDNEXT, so "what is new" is `uids_since(stored uidnext)`.
  Beware: the set `n:*` always includes the last message even when its UID is
  below n (6.4.8: `*` is the largest UID in use), so `uids_since` filters.
- With CONDSTORE (RFC 7162) every change of a message's flags, and every
  expunge, raises the folder's HIGHESTMODSEQ, and each message carries the
  MODSEQ of its last change. `UID FETCH 1:* (FLAGS) (CHANGEDSINCE m)` returns
  exactly the messages changed after m: `changed_flags(m)`.
- With QRESYNC (RFC 7162, section 3.2.5), `SELECT f (QRESYNC (uidvalidity m))`
  also answers in the same round trip with the UIDs expunged since m
  (`VANISHED (EARLIER)`) and the flags of messages changed since m. The server
  honours it only after `ENABLE QRESYNC`, which we send right after login.
  If the uidvalidity we pass is not the folder's, the server ignores it: the
  caller still has to compare UIDVALIDITY first.
- A message expunged by another session while we fetch comes back as
  `BODY[] NIL` with a tagged `OK [EXPUNGEISSUED]` (Dovecot); other servers may
  answer `NO [EXPUNGEISSUED]`. `fetch` leaves such messages out.

What a caller stores to survive a restart
-----------------------------------------
Per folder: its raw name, UIDVALIDITY, and the UIDNEXT and HIGHESTMODSEQ that
the SELECT returned, saved only once steps 2 to 4 below have been applied.
Not the largest MODSEQ among the fetched messages: a message changed while we
fetch comes back with a MODSEQ above changes to other messages that we have
not read yet, and those would be skipped forever. Per message: its UID (and
the folder's UIDVALIDITY with it). A message that arrives during a run may be
fetched again by the next one, so store messages by UID idempotently. On the
next run:

1. `select(raw_name, qresync=(uidvalidity, highestmodseq))`. If UIDVALIDITY
   changed, match the stored messages by `identities()` and take their new
   UIDs; the unmatched are gone. If UIDNEXT and HIGHESTMODSEQ are unchanged,
   nothing happened: done in one round trip.
2. New messages: `fetch(uids_since(stored uidnext))`.
3. Flag changes: `changed` from the QRESYNC select, or `changed_flags(modseq)`
   (CONDSTORE), or `all_flags()` without CONDSTORE.
4. Expunges: `vanished` from the QRESYNC select; without QRESYNC, the stored
   UIDs missing from `uids()`.

A first sync of a big folder goes the other way: `uids(since=day)` lists what
is wanted (SEARCH SINCE: mail older than a chosen day is never fetched) and
`fetch(..., newest_first=True)` brings the most recent mail first. No UIDNEXT
bound holds while it runs, so a caller resumes it by comparing UID sets.

Flags are stored as the server names them, minus \\Recent: that one belongs to
a single session (RFC 3501, 2.3.2), changes without a MODSEQ and would make
stored flags flap between runs.

Without UIDPLUS, expunging by UID is impossible: plain EXPUNGE removes every
message flagged \\Deleted in the folder, including ones the user flagged in
another client and has not expunged yet. `expunge_uids`, and `move` on a
server without MOVE, use it only when the server lacks UIDPLUS.

Names on the wire
-----------------
Folder names travel in modified UTF-7 (RFC 3501, 5.1.3): printable ASCII
stands for itself except "&", written "&-"; any other run of characters is
"&" + base64 of its UTF-16BE with "," for "/" and no padding + "-".
`Folder.raw_name` is that encoded form, unquoted; the session quotes it when
it sends it. Sequence sets (`1:5,9,12:20`, RFC 3501 section 9) keep commands
on many UIDs to one short line.

Errors
------
Everything imaplib, ssl and the socket raise is translated where it enters.
Connecting goes through mailkit.egress (its policy, when given, checks the
resolved address), and a failure to connect, greet or start TLS carries one
of the fixed codes of errors.CONNECTION_FAILURES with a hint, and never
repeats what the far end sent before a valid greeting: refused, timed out and
host not found are temporary; TLS on a clear-text port and the reverse, an
untrusted certificate and a server that does not greet like IMAP are
permanent. Usernames, passwords, hosts and folder names with control
characters are refused before anything is sent (InvalidSetting). A rejected
login is AuthenticationFailed; a dropped connection and BYE are
TemporaryMailError (the session is unusable afterwards); NO replies are judged by their response code (RFC 5530, see
`_reply_error`), BAD replies are PermanentMailError (we sent something the
server cannot parse: resending it will not help). What a server sends is
checked as it is read: a number of more than 20 digits or a malformed
sequence set is a ProtocolError (permanent), never a ValueError from deep
inside; a sequence set from the server stays a list of ranges (UidSet), so
`VANISHED 1:4294967295` costs two numbers, not four billion.
"""

import base64
import bisect
import contextlib
import dataclasses
import datetime
import imaplib
import re
import select
import ssl
from typing import Iterable, Iterator, NamedTuple

from mailkit.egress import Policy, Route, classify
from mailkit.errors import (AuthenticationFailed, MailError, PermanentMailError, TemporaryMailError, check_setting,
                            connection_failure, shown)

SECURITY = ('tls', 'starttls', 'none')
ROLES = ('inbox', 'sent', 'trash', 'junk', 'archive', 'drafts')
# RFC 7162, 3.2.5 recommends clients keep command lines under 8,192 octets;
# a set of this length leaves room for the command around it.
MAX_SET_LENGTH = 4000
# fetch() holds one batch in memory: 500 messages of 20 MB would be 10 GB.
BATCH_BYTES = 64 * 1024 * 1024
# identities() asks for this many messages a command: ~200 bytes of reply each.
IDENTITY_BATCH = 5000
# Real folder names are far shorter; the bound keeps a server's megabyte name
# (imaplib reads lines of up to 1 MB) from costing more than a normal LIST.
MAX_FOLDER_NAME = 4096
# A LIST reply carries a handful of attributes (RFC 3501, 7.2.2; RFC 6154).
MAX_LIST_FLAGS = 64


class FolderGone(MailError):
    """The folder no longer exists on the server: forget it, or find it again with folders()."""


class ProtocolError(PermanentMailError):
    """The server sent something IMAP does not allow (a number of thousands of digits, a malformed
    sequence set); asking again gets the same answer."""

    code = 'protocol_error'


# ---------------------------------------------------------------- values

@dataclasses.dataclass(frozen=True, slots=True)
class Folder:
    name: str                     # decoded from modified UTF-7, with the server's delimiter
    raw_name: str                 # modified UTF-7 as on the wire, unquoted: what select() takes
    role: str | None              # one of ROLES, or None
    flags: tuple[str, ...]        # LIST attributes as sent, e.g. ('\\HasNoChildren', '\\Sent')
    delimiter: str | None         # hierarchy delimiter, None for a flat namespace
    selectable: bool              # False for \Noselect and \NonExistent


@dataclasses.dataclass(frozen=True, slots=True)
class FolderState:
    exists: int
    uidvalidity: int
    uidnext: int | None           # RFC 3501 servers must send it; a few old ones do not
    highestmodseq: int | None     # None without CONDSTORE, or for a folder with NOMODSEQ
    writable: bool                # False after EXAMINE, or when the server granted READ-ONLY
    vanished: 'UidSet' = dataclasses.field(default_factory=lambda: UidSet())       # QRESYNC only
    changed: dict[int, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # QRESYNC only


class FetchedMessage(NamedTuple):   # a tuple: cheapest to build 10,000 times a second
    uid: int
    flags: tuple[str, ...]
    size: int
    internaldate: datetime.datetime | None
    modseq: int | None
    raw: bytes


# ---------------------------------------------------------------- modified UTF-7 (RFC 3501, 5.1.3)

def encode_mutf7(name: str) -> str:
    """Folder name -> modified UTF-7, as IMAP wants it on the wire."""
    if len(name) > MAX_FOLDER_NAME:
        raise ValueError(f'a folder name is at most {MAX_FOLDER_NAME} characters, got {len(name)}')
    out, pending = [], []

    def flush():
        if pending:
            utf16 = ''.join(pending).encode('utf-16-be')   # astral characters become surrogate pairs
            out.append('&' + base64.b64encode(utf16).decode('ascii').rstrip('=').replace('/', ',') + '-')
            pending.clear()

    for char in name:
        if '\x20' <= char <= '\x7e':
            flush()
            out.append('&-' if char == '&' else char)
        else:
            pending.append(char)
    flush()
    return ''.join(out)


def decode_mutf7(name: str) -> str:
    """Modified UTF-7 -> folder name; ValueError when name is not valid modified UTF-7."""
    # Scanned with str.find: a regex '&([^-]*)-' searched from every "&" of a
    # name with no "-" in it, and a server's 40,000 "&"s took 17 s.
    if len(name) > MAX_FOLDER_NAME:
        raise ValueError(f'folder name {shown(name)} is longer than {MAX_FOLDER_NAME} characters')
    pieces, pos = [], 0
    while (amp := name.find('&', pos)) >= 0:
        dash = name.find('-', amp + 1)
        if dash < 0:
            raise ValueError(f'unterminated "&" in folder name {shown(name)}')
        pieces += [name[pos:amp], _decode_mutf7_run(name, name[amp + 1:dash])]
        pos = dash + 1
    return ''.join(pieces) + name[pos:] if pieces else name


def _decode_mutf7_run(name: str, encoded: str) -> str:
    if not encoded:
        return '&'   # "&-"
    padded = encoded.replace(',', '/') + '=' * (-len(encoded) % 4)
    try:
        return base64.b64decode(padded, validate=True).decode('utf-16-be')
    except (ValueError, UnicodeDecodeError) as exc:   # binascii.Error is a ValueError
        raise ValueError(f'invalid modified UTF-7 in folder name {shown(name)}: {exc}') from exc


# ---------------------------------------------------------------- numbers and sequence sets (RFC 3501, section 9)

# RFC 3501's numbers are 32-bit and RFC 7162's mod-sequences 63-bit: 20 digits hold both. Checked
# before int(), which refuses strings of more than 4,300 digits with a ValueError (CPython's guard
# against quadratic conversion) that would otherwise escape from the middle of a sync.
_NUMBER = re.compile(r'[0-9]{1,20}')
_SEQUENCE_SET = re.compile(r'[0-9]{1,20}(?::[0-9]{1,20})?(?:,[0-9]{1,20}(?::[0-9]{1,20})?)*+')
# A set from the server expanded into a list (UID SEARCH / ESEARCH ALL) has at most one member
# per message in the folder; past this many, it is a hostile or broken server, not a mailbox.
MAX_SET_MEMBERS = 2_000_000


def number(token: str | bytes, what: str = 'a number') -> int:
    """A number the server sent; ProtocolError for anything that is not 1 to 20 ASCII digits."""
    text = token.decode('ascii', 'replace') if isinstance(token, (bytes, bytearray)) else str(token)
    if not _NUMBER.fullmatch(text):
        raise ProtocolError(f'the server sent {shown(text, 40)} where {what} belongs')
    return int(text)


class UidSet:
    """A sequence set from the server as sorted, merged (low, high) ranges: membership and length
    without expanding it. RFC 7162 (3.2.10) lets VANISHED name UIDs that never existed, so a range
    of four billion is legal there, and must cost what its text costs."""

    __slots__ = ('ranges', '_lows')

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()):
        merged: list[list[int]] = []
        for low, high in sorted((min(a, b), max(a, b)) for a, b in ranges):
            if merged and low <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], high)
            else:
                merged.append([low, high])
        self.ranges = tuple((low, high) for low, high in merged)
        self._lows = [low for low, _ in self.ranges]

    @classmethod
    def parse(cls, text: str | bytes) -> 'UidSet':
        """'1:3,7,9:8' (a range may be written high:low); ProtocolError for anything else."""
        if isinstance(text, (bytes, bytearray)):
            text = text.decode('ascii', 'replace')
        if not _SEQUENCE_SET.fullmatch(text):   # one check of the whole text: every int() below is safe
            raise ProtocolError(f'the server sent {shown(text, 40)} where a sequence set belongs')
        ranges = []
        for part in text.split(','):
            low, _, high = part.partition(':')
            ranges.append((int(low), int(high or low)))
        return cls(ranges)

    def __contains__(self, uid) -> bool:
        at = bisect.bisect_right(self._lows, uid) - 1
        return at >= 0 and uid <= self.ranges[at][1]

    def __len__(self) -> int:
        return sum(high - low + 1 for low, high in self.ranges)

    def __iter__(self) -> Iterator[int]:
        for low, high in self.ranges:
            yield from range(low, high + 1)

    def __or__(self, other: 'UidSet') -> 'UidSet':
        return UidSet(self.ranges + other.ranges)

    def __eq__(self, other) -> bool:
        if isinstance(other, UidSet):
            return self.ranges == other.ranges
        if isinstance(other, (list, tuple)):   # the length first: never expand a huge set to compare
            return len(self) == len(other) and list(self) == sorted(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f'UidSet({uid_set_text(self.ranges)!r})'


def uid_set_text(ranges: Iterable[tuple[int, int]]) -> str:
    return ','.join(_range_text(low, high) for low, high in ranges)


def _ranges(uids: Iterable[int]) -> list[tuple[int, int]]:
    ranges: list[list[int]] = []
    for uid in sorted(set(uids)):
        if ranges and uid == ranges[-1][1] + 1:
            ranges[-1][1] = uid
        else:
            ranges.append([uid, uid])
    return [(low, high) for low, high in ranges]


def _range_text(low: int, high: int) -> str:
    return str(low) if low == high else f'{low}:{high}'


def uid_set(uids: Iterable[int]) -> str:
    """The shortest sequence set for uids: [1, 2, 3, 5] -> '1:3,5'."""
    return uid_set_text(_ranges(uids))


def uid_sets(uids: Iterable[int], max_length: int = MAX_SET_LENGTH) -> list[str]:
    """uid_set split into sets of at most max_length characters, so no command line grows unbounded."""
    sets, parts, length = [], [], 0
    for low, high in _ranges(uids):
        text = _range_text(low, high)
        if parts and length + 1 + len(text) > max_length:
            sets.append(','.join(parts))
            parts, length = [], 0
        parts.append(text)
        length += len(text) + (1 if length else 0)
    if parts:
        sets.append(','.join(parts))
    return sets


def parse_sequence_set(text: str | bytes, limit: int = MAX_SET_MEMBERS) -> list[int]:
    """'1:3,7,9:8' -> [1, 2, 3, 7, 8, 9] (a range may be written high:low); ProtocolError for a
    malformed set or one of more than `limit` members."""
    members = UidSet.parse(text)
    if len(members) > limit:
        raise ProtocolError(f'the server sent a set of {len(members)} UIDs, more than a folder holds '
                            f'(at most {limit})')
    return list(members)


# ---------------------------------------------------------------- folder roles

# RFC 6154 attributes; \All (Gmail's "All Mail") is an archive only where no
# folder says \Archive.
ROLE_ATTRIBUTES = {'\\sent': 'sent', '\\trash': 'trash', '\\junk': 'junk', '\\drafts': 'drafts',
                   '\\archive': 'archive'}
# Names that clients without SPECIAL-USE have used, best first; matched on the
# last path segment so "INBOX.Sent" (Courier-style namespaces) and
# "[Gmail]/Sent Mail" count too.
ROLE_NAMES = {
    'sent': ('sent', 'sent items', 'sent messages', 'sent mail'),
    'trash': ('trash', 'deleted items', 'deleted messages', 'deleted', 'bin'),
    'junk': ('junk', 'spam', 'junk e-mail', 'junk email', 'bulk mail'),
    'archive': ('archive', 'archives', 'all mail'),
    'drafts': ('drafts', 'draft'),
}
_NAME_ROLES = {name: (role, rank) for role, names in ROLE_NAMES.items() for rank, name in enumerate(names)}


def _role_and_rank(name: str, delimiter: str | None) -> tuple[str | None, int]:
    last = name.rsplit(delimiter, 1)[-1] if delimiter else name
    return _NAME_ROLES.get(last.strip().casefold(), (None, 0))


def role_by_name(name: str, delimiter: str | None) -> str | None:
    """The role a folder's decoded name suggests: 'Sent Items' -> 'sent', 'INBOX' -> 'inbox', 'Work' -> None."""
    return 'inbox' if name.upper() == 'INBOX' else _role_and_rank(name, delimiter)[0]


def _assign_roles(folders: list[Folder]) -> list[Folder]:
    """Give each role to one folder: SPECIAL-USE attributes first, names only for roles no attribute claims."""
    roles: dict[int, str] = {}
    for i, folder in enumerate(folders):
        if folder.name.upper() == 'INBOX':
            roles[i] = 'inbox'
    for attribute_set in (ROLE_ATTRIBUTES, {'\\all': 'archive'}):
        claimed = set(roles.values())
        for i, folder in enumerate(folders):
            for flag in folder.flags:
                role = attribute_set.get(flag.lower())
                if role and role not in claimed and i not in roles and folder.selectable:
                    roles[i] = role
                    claimed.add(role)   # the first folder listed with an attribute keeps the role
    claimed = set(roles.values())
    best: dict[str, tuple[tuple, int]] = {}
    for i, folder in enumerate(folders):
        if i in roles or not folder.selectable:
            continue
        role, rank = _role_and_rank(folder.name, folder.delimiter)
        if role is None or role in claimed:
            continue
        depth = folder.name.count(folder.delimiter) if folder.delimiter else 0
        key = (rank, depth, folder.name)   # the most usual name, then the shallowest folder
        if role not in best or key < best[role][0]:
            best[role] = (key, i)
    roles.update({i: role for role, (_, i) in best.items()})
    return [dataclasses.replace(folder, role=roles.get(i)) for i, folder in enumerate(folders)]


# ---------------------------------------------------------------- response parsing (pure)

_LIST_LINE = re.compile(rb'\((?P<flags>[^)]*+)\) (?P<delimiter>NIL|"(?:[^"\\]++|\\.)*+") ?(?P<name>.*)$', re.S)
_QUOTED_ESCAPE = re.compile(rb'\\(.)')


def _unquote(value: bytes) -> bytes:
    if value[:1] == b'"' and value[-1:] == b'"':
        return _QUOTED_ESCAPE.sub(rb'\1', value[1:-1])
    return value


def parse_list(data: list) -> list[Folder]:
    """imaplib's LIST data -> Folders with roles. Names sent as literals arrive as (line, name) tuples."""
    folders = []
    for item in data:
        if not item:   # None for an empty reply; b'' is the rest of a line after a literal name
            continue
        line, name = (item[0], item[1]) if isinstance(item, tuple) else (item, None)
        match = _LIST_LINE.match(line)
        if not match:
            raise PermanentMailError(f'cannot parse LIST reply {line[:200]!r}')
        raw = name if name is not None else _unquote(match.group('name').strip())
        delimiter = _unquote(match.group('delimiter'))
        flags = tuple(match.group('flags').decode('ascii', 'replace').split()[:MAX_LIST_FLAGS])
        raw_name = raw.decode('utf-8', 'surrogateescape')
        try:
            decoded = decode_mutf7(raw_name)
        except ValueError:   # a server that sends 8-bit names: show them as they are
            decoded = raw_name
        lowered = {flag.lower() for flag in flags}
        folders.append(Folder(
            name=decoded, raw_name=raw_name, role=None, flags=flags,
            delimiter=None if delimiter == b'NIL' else delimiter.decode('ascii', 'replace'),
            selectable=not lowered & {'\\noselect', '\\nonexistent'}))
    return _assign_roles(folders)


_MONTHS = {name: number for number, name in enumerate(
    (b'Jan', b'Feb', b'Mar', b'Apr', b'May', b'Jun', b'Jul', b'Aug', b'Sep', b'Oct', b'Nov', b'Dec'), 1)}
_zones: dict[bytes, datetime.timezone] = {}


def parse_internaldate(value: bytes) -> datetime.datetime | None:
    """b'21-Nov-2026 23:52:22 +0100' (or b' 1-Nov-...') -> an aware datetime; None when malformed.

    Sliced by hand: strptime costs more than the rest of parsing a fetched message.
    """
    if len(value) != 26:
        return None
    try:
        zone = _zones.get(value[21:])
        if zone is None:
            offset = datetime.timedelta(hours=int(value[22:24]), minutes=int(value[24:26]))
            zone = _zones[value[21:]] = datetime.timezone(-offset if value[21:22] == b'-' else offset)
        return datetime.datetime(int(value[7:11]), _MONTHS[value[3:6]], int(value[0:2]),
                                 int(value[12:14]), int(value[15:17]), int(value[18:20]), tzinfo=zone)
    except (ValueError, KeyError):   # a server's malformed date is not worth failing a sync over
        return None


# One FETCH item and its value: a number, a parenthesised list or a quoted string.
# A list stops at the next "(" too (flags hold no parentheses): with [^)]* a
# server line of "FLAGS (" repeated was read to its end once per repeat.
_FETCH_ITEM = re.compile(rb'(UID|RFC822\.SIZE|MODSEQ|FLAGS|INTERNALDATE) (\d++|\([^()]*+\)|"[^"]*+")')


def _flag_tuple(flags: bytes) -> tuple[str, ...]:
    """b'(\\Seen \\Recent $Work)' -> ('\\Seen', '$Work').

    \\Recent is dropped: it belongs to one session (RFC 3501, 2.3.2; IMAP4rev2
    removed it), changes without a MODSEQ, and would make stored flags flap.
    """
    return tuple(flag for flag in flags[1:-1].decode('utf-8', 'replace').split() if flag.lower() != '\\recent')


def parse_fetch(data: list) -> Iterator[FetchedMessage]:
    """imaplib's FETCH data for (UID FLAGS RFC822.SIZE INTERNALDATE BODY.PEEK[] [MODSEQ]) -> messages.

    imaplib stores a response with a literal as (text up to the literal, literal)
    followed by the rest of the line (b')' when BODY[] came last). A response
    without a literal is a message expunged meanwhile (BODY[] NIL) or an
    unsolicited flag update: neither is a message to yield.
    """
    flag_tuples: dict[bytes, tuple[str, ...]] = {}   # few distinct flag sets: decode each once
    count = len(data)
    i = 0
    while i < count:
        item = data[i]
        i += 1
        if type(item) is not tuple:
            continue
        meta, raw = item
        if i < count and type(data[i]) is bytes:
            tail = data[i]
            i += 1
            if tail != b')':
                meta += tail
        fields = dict(_FETCH_ITEM.findall(meta))
        uid = fields.get(b'UID')
        if uid is None:
            continue
        flags = fields.get(b'FLAGS', b'()')
        flag_tuple = flag_tuples.get(flags)
        if flag_tuple is None:
            flag_tuple = flag_tuples[flags] = _flag_tuple(flags)
        size = fields.get(b'RFC822.SIZE')
        date = fields.get(b'INTERNALDATE')
        modseq = fields.get(b'MODSEQ')
        yield FetchedMessage(number(uid, 'a UID'), flag_tuple, number(size, 'a size') if size else len(raw),
                             parse_internaldate(date[1:-1]) if date else None,
                             number(modseq[1:-1], 'a MODSEQ') if modseq else None, raw)


def parse_flag_updates(data: list) -> dict[int, tuple[str, ...]]:
    """imaplib's FETCH data for (UID FLAGS) -> {uid: flags}; later responses win."""
    changes = {}
    for item in data:
        line = item[0] if isinstance(item, tuple) else item
        if not line:
            continue
        fields = dict(_FETCH_ITEM.findall(line))
        if b'UID' in fields and b'FLAGS' in fields:
            changes[number(fields[b'UID'], 'a UID')] = _flag_tuple(fields[b'FLAGS'])
    return changes


def parse_sizes(data: list) -> dict[int, int]:
    """imaplib's FETCH data for (UID RFC822.SIZE) -> {uid: size}."""
    sizes = {}
    for item in data:
        fields = dict(_FETCH_ITEM.findall(item[0] if isinstance(item, tuple) else item or b''))
        if b'UID' in fields and b'RFC822.SIZE' in fields:
            sizes[number(fields[b'UID'], 'a UID')] = number(fields[b'RFC822.SIZE'], 'a size')
    return sizes


def batches(sizes: dict[int, int], count: int, max_bytes: int, descending: bool = False) -> Iterator[list[int]]:
    """UIDs in ascending (or descending) order, cut into batches of at most count messages and max_bytes
    (a message larger than max_bytes goes alone)."""
    batch: list[int] = []
    total = 0
    for uid in sorted(sizes, reverse=descending):
        if batch and (len(batch) == count or total + sizes[uid] > max_bytes):
            yield batch
            batch, total = [], 0
        batch.append(uid)
        total += sizes[uid]
    if batch:
        yield batch


def search_date(day: datetime.date) -> str:
    """RFC 3501's date for SEARCH: 2026-01-05 -> '5-Jan-2026' (English month names whatever the locale)."""
    month = next(name for name, number in _MONTHS.items() if number == day.month).decode()
    return f'{day.day}-{month}-{day.year:04d}'


def _since(day: datetime.date | None) -> tuple[str, ...]:
    return ('SINCE', search_date(day)) if day else ()


def parse_esearch(data: list) -> list[int]:
    """ESEARCH replies (RFC 4731) -> sorted UIDs: b'(TAG "A5") UID ALL 1:3,7' -> [1, 2, 3, 7]."""
    uids: list[int] = []
    for line in data:
        match = re.search(rb'\bALL ([0-9:,]+)', line or b'')
        if match:
            uids.extend(parse_sequence_set(match.group(1), MAX_SET_MEMBERS - len(uids)))
    return sorted(uids)


def vanished_uids(lines: list) -> UidSet:
    """The UIDs of VANISHED responses ('(EARLIER) 1:3,7'), as ranges: never expanded."""
    uids = UidSet()
    for line in lines:
        uids |= UidSet.parse(_text(line).replace('(EARLIER)', '').strip())
    return uids


def _quote(value: str, field: str = 'folder name') -> str:
    """A quoted string (RFC 3501, 4.3): values may hold spaces, quotes and backslashes, never CR or LF."""
    # A quoted string cannot carry CR, LF or NUL, and imaplib would send them
    # as they are: the rest of the line would be a command of its own.
    check_setting(field, value)
    return '"' + value.replace('\\', '\\\\').replace('"', '\\"') + '"'


def copied_uids(responses) -> dict[int, int]:
    """{source UID: destination UID} from COPYUID responses ('uidvalidity src-set dst-set', or a whole
    reply text holding '[COPYUID uidvalidity src-set dst-set]'); the sets pair up in the order written."""
    pairs: dict[int, int] = {}
    for response in responses:
        text = response.decode('ascii', 'replace') if isinstance(response, bytes) else str(response)
        match = COPYUID.search(text)
        if match:
            source, target = _in_order(match.group(1)), _in_order(match.group(2))
            if len(source) == len(target):   # a malformed reply maps nothing rather than the wrong messages
                pairs.update(zip(source, target))
    return pairs


COPYUID = re.compile(r'(?:\[COPYUID |^)\d+ ([\d:,]+) ([\d:,]+)')


def _in_order(text: str) -> list[int]:
    """'5:3,9' -> [5, 4, 3, 9]: a UID set as written, where the order pairs source and destination."""
    numbers: list[int] = []
    for part in text.split(','):
        low, _, high = part.partition(':')
        first = number(low, 'a UID')
        last = number(high, 'a UID') if high else first
        step = 1 if last >= first else -1
        if abs(last - first) > MAX_COPIED:   # a hostile range must not allocate billions of ints
            return []
        numbers.extend(range(first, last + step, step))
    return numbers


MAX_COPIED = 100_000


def _text(data) -> str:
    """The human text of a reply for error messages; imaplib hands over bytes, lists of bytes or str."""
    if isinstance(data, (list, tuple)):
        data = data[-1] if data else b''
    if isinstance(data, bytes):
        data = data.decode('utf-8', 'replace')
    return str(data)


def _response_code(text: str) -> str | None:
    match = re.match(r'\[([A-Z0-9/-]+)', text)
    return match.group(1) if match else None


# RFC 5530 codes under which trying again cannot succeed. A NO without a code,
# or with UNAVAILABLE, INUSE, SERVERBUG, LIMIT or a code we do not know, counts
# as temporary: NO is an "operational error" (RFC 3501, 7.1.2), most often a
# lock or a busy backend, and the task's retries are bounded.
PERMANENT_CODES = {'NOPERM', 'CANNOT', 'ALREADYEXISTS', 'AUTHENTICATIONFAILED', 'AUTHORIZATIONFAILED',
                   'EXPIRED', 'PRIVACYREQUIRED', 'CONTACTADMIN', 'OVERQUOTA', 'PARSE', 'CLIENTBUG',
                   'TOOBIG', 'BADCHARSET', 'CORRUPTION', 'READ-ONLY'}
# The folder is not there: NONEXISTENT (RFC 5530), TRYCREATE for APPEND/COPY targets (RFC 3501, 6.3.11).
GONE_CODES = {'NONEXISTENT', 'TRYCREATE'}


def _reply_error(where: str, doing: str, data) -> MailError:
    """The exception for a NO reply to `doing`, judged by its response code."""
    text = _text(data)
    code = _response_code(text)
    message = f'{where} answered NO to {doing}: {text}'
    if code in GONE_CODES:
        return FolderGone(message)
    if code in PERMANENT_CODES:
        return PermanentMailError(message)
    return TemporaryMailError(message)


# ---------------------------------------------------------------- connecting

class _IMAP4(imaplib.IMAP4):
    """imaplib.IMAP4 whose socket comes from egress.Route: resolved, checked, then connected."""

    def __init__(self, host: str, port: int, timeout: float, route: Route):
        self._route = route
        super().__init__(host, port, timeout)

    def _create_socket(self, timeout):
        return self._route.connect(self.host, self.port, timeout)


class _IMAP4_SSL(imaplib.IMAP4_SSL):
    """imaplib.IMAP4_SSL the same way; the certificate is checked against the host name, not the address."""

    def __init__(self, host: str, port: int, timeout: float, route: Route, context: ssl.SSLContext):
        self._route = route
        super().__init__(host, port, ssl_context=context, timeout=timeout)

    def _create_socket(self, timeout):
        return self.ssl_context.wrap_socket(self._route.connect(self.host, self.port, timeout),
                                            server_hostname=self.host)


def _greeting_failure(exc: imaplib.IMAP4.error, where: str) -> MailError:
    """The error for a greeting imaplib refused; what the far end sent is not repeated.

    A port scan by proxy must learn nothing: a banner ("SSH-2.0-OpenSSH_9.2")
    would name the service and its version.
    """
    text = str(exc)
    if isinstance(exc, imaplib.IMAP4.abort) and text.startswith('socket error: EOF'):   # closed before a word
        return connection_failure('connection_lost', where)
    if not isinstance(exc, imaplib.IMAP4.abort) and text.startswith("b'* BYE"):
        return connection_failure('server_busy', where)   # a BYE greeting: too busy now (RFC 3501, 7.1.5)
    return connection_failure('not_a_mail_server', where)


# ---------------------------------------------------------------- the session

class ImapSession:
    """One logged-in IMAP connection; a context manager that logs out at the end."""

    def __init__(self, host: str, port: int, security: str, username: str, password: str,
                 timeout: float = 30, ssl_context: ssl.SSLContext | None = None, egress: Policy | None = None):
        """`egress`: the policy the server's resolved address must pass (None: no check)."""
        if security not in SECURITY:
            raise ValueError(f'security must be one of {SECURITY}, got {security!r}')
        for field, value in (('host', host), ('username', username), ('password', password)):
            check_setting(field, value)   # before anything is sent
        self.where = f'{host}:{port}'
        self.capabilities: set[str] = set()
        self.enabled: set[str] = set()     # what ENABLE switched on (QRESYNC)
        self.selected: str | None = None   # raw name of the selected folder
        self.writable = False              # the selection was SELECT and the server granted READ-WRITE
        self._lost = False                 # the connection broke mid-command: nothing more can be said on it
        self._delimiter: str | None = None
        self.conn: imaplib.IMAP4 | None = None
        try:
            self._connect(host, port, security, timeout,
                          ssl_context if ssl_context is not None else ssl.create_default_context(), egress)
            self._login(username, password)
            if 'QRESYNC' in self.capabilities:
                # Only now, authenticated and before any SELECT (RFC 5161); it also enables CONDSTORE.
                self._run('enabling QRESYNC', 'ENABLE', 'QRESYNC')
                self.enabled = {name.upper() for line in self.conn.untagged_responses.get('ENABLED', [])
                                for name in _text(line).split()}
        except BaseException:
            self._drop()
            raise

    # -------------------------------------------------- connecting

    def _connect(self, host, port, security, timeout, context, egress) -> None:
        """Connect and read the greeting; a failure is one of errors.CONNECTION_FAILURES, echoing nothing."""
        route = Route(egress)
        try:
            if security == 'tls':
                # imaplib's own default context verifies nothing: always pass ours.
                self.conn = _IMAP4_SSL(host, port, timeout, route, context)
            else:
                self.conn = _IMAP4(host, port, timeout, route)
        except imaplib.IMAP4.error as exc:   # the greeting, or the CAPABILITY after it, was not IMAP
            # Not chained: imaplib's text quotes the far end, and a logged traceback would repeat it.
            raise _greeting_failure(exc, self.where) from None
        except OSError as exc:   # refused, timed out, TLS failed; MailErrors from the route pass as they are
            probe = route.peer if security != 'tls' else None   # silent in clear text: does it want TLS?
            raise classify(exc, self.where, probe=probe, timeout=timeout) from exc
        if security == 'starttls':
            if 'STARTTLS' not in self.conn.capabilities:
                raise connection_failure('starttls_unavailable', self.where)
            try:
                with self._translated('starting TLS'):   # a NO to STARTTLS, or a lost connection
                    self.conn.starttls(ssl_context=context)
            except MailError as exc:
                if isinstance(exc.__cause__, ssl.SSLError):
                    raise classify(exc.__cause__, self.where, starttls=True) from exc.__cause__
                raise

    def _login(self, username: str, password: str) -> None:
        conn = self.conn
        conn.untagged_responses.clear()   # so the capabilities found below are the post-login ones
        try:
            if username.isascii() and password.isascii():
                if 'LOGINDISABLED' in conn.capabilities:
                    raise PermanentMailError(f'{self.where} refuses LOGIN on this connection; use TLS')
                # Both arguments quoted (RFC 3501, 6.2.3): imaplib's login() quotes
                # only the password, and a username with a space is a BAD command.
                typ, data = conn._simple_command('LOGIN', _quote(username, 'username'),
                                                 _quote(password, 'password'))
                if typ != 'OK':
                    raise conn.error(data[-1])
                conn.state = 'AUTH'
            else:
                # LOGIN's arguments are ASCII strings in imaplib; SASL PLAIN carries UTF-8 (RFC 4616).
                credentials = b'\0' + username.encode() + b'\0' + password.encode()
                conn.authenticate('PLAIN', lambda _challenge: credentials)
        except imaplib.IMAP4.abort as exc:
            self._lost = True
            raise TemporaryMailError(f'{self.where} dropped the connection during login: {_text(exc.args)}') from exc
        except imaplib.IMAP4.error as exc:   # a NO or BAD to LOGIN; its text is the server's, not our password
            text = _text(exc.args)
            if _response_code(text) == 'UNAVAILABLE':   # the server's authentication backend is down
                raise TemporaryMailError(f'{self.where} cannot check logins now: {text}') from exc
            raise AuthenticationFailed(f'{self.where} rejected the login for {username!r}: {text}; '
                                       f'check the username and password') from exc
        except OSError as exc:
            self._lost = True
            raise TemporaryMailError(f'lost {self.where} during login: {exc}') from exc
        if hasattr(conn, '_cmd_log'):
            conn._cmd_log.clear()   # imaplib keeps its last 10 command lines, LOGIN and its password among them
        # Dovecot sends the post-login capabilities with the login reply; ask only if it did not.
        lines = conn.untagged_responses.pop('CAPABILITY', None)
        if not lines:
            self._run('reading capabilities', 'CAPABILITY')
            lines = self._untagged('CAPABILITY') or [b'']
        self.capabilities = set(_text(lines[-1]).upper().split())

    # -------------------------------------------------- running commands

    @contextlib.contextmanager
    def _translated(self, doing: str):
        """Turn imaplib, ssl and socket exceptions into MailErrors, once, here."""
        try:
            yield
        except imaplib.IMAP4.abort as exc:   # before .error, which it subclasses: EOF, BYE, a socket error
            self._lost = True
            raise TemporaryMailError(f'{self.where} dropped the connection while {doing}: {_text(exc.args)}') \
                from exc
        except imaplib.IMAP4.error as exc:   # a BAD reply, or a reply imaplib cannot parse
            raise PermanentMailError(f'{self.where} rejected {doing}: {_text(exc.args)}') from exc
        except ValueError as exc:   # imaplib's int() of a literal's size of 4,301+ digits: the stream is lost
            self._lost = True
            raise ProtocolError(f'{self.where} sent a reply that is not IMAP while {doing}') from exc
        except ssl.SSLCertVerificationError as exc:   # before OSError: the SSL errors subclass it
            self._lost = True
            raise PermanentMailError(f'{self.where} presented a certificate we do not trust: '
                                     f'{exc.verify_message}') from exc
        except OSError as exc:   # refused, timed out, reset, other TLS failures
            self._lost = True
            raise TemporaryMailError(f'cannot reach {self.where} while {doing}: {exc}') from exc

    def _run(self, doing: str, name: str, *args: str, ok_codes: frozenset = frozenset()) -> list:
        """Send one command and return its tagged reply's data; a NO becomes the fitting MailError."""
        return self._call(doing, self.conn._simple_command, name, *args, ok_codes=ok_codes)

    def _call(self, doing: str, send, *args, ok_codes: frozenset = frozenset()) -> list:
        """send(*args) (an imaplib method that returns (typ, data)) with errors translated.

        Untagged responses from earlier commands are dropped first, so what the
        caller reads from untagged_responses afterwards belongs to this command.
        """
        if self._lost or self.conn is None:
            raise TemporaryMailError(f'the connection to {self.where} is closed or broke earlier; '
                                     f'open a new session')
        self.conn.untagged_responses.clear()
        with self._translated(doing):
            typ, data = send(*args)
        if typ != 'OK' and _response_code(_text(data)) not in ok_codes:
            raise _reply_error(self.where, doing, data)
        return data

    def _untagged(self, name: str) -> list:
        return self.conn.untagged_responses.pop(name, [])

    def _require_selected(self, doing: str) -> None:
        if self.selected is None:
            raise PermanentMailError(f'{doing} needs a selected folder: call select() first')

    def _require_writable(self, doing: str) -> None:
        """Refuse writes to a read-only selection ourselves: Dovecot answers a STORE
        there with OK and ignores it, and carries out a UID MOVE anyway."""
        self._require_selected(doing)
        if not self.writable:
            raise PermanentMailError(f'{doing} needs {self.selected!r} selected read-write: '
                                     f'select(readonly=False)')

    # -------------------------------------------------- folders

    def folders(self) -> list[Folder]:
        """Every folder, with its decoded name and role."""
        self._run('listing folders', 'LIST', '""', '"*"')
        folders = parse_list(self._untagged('LIST'))
        if folders and self._delimiter is None:
            self._delimiter = folders[0].delimiter
        return folders

    @property
    def delimiter(self) -> str | None:
        """The server's hierarchy delimiter ('.' on our Dovecot, '/' on Gmail); None for flat servers."""
        if self._delimiter is None:
            self._run('asking the hierarchy delimiter', 'LIST', '""', '""')
            listed = self._untagged('LIST')
            match = _LIST_LINE.match(listed[0]) if listed and isinstance(listed[0], bytes) else None
            delimiter = _unquote(match.group('delimiter')) if match else b'NIL'
            self._delimiter = None if delimiter == b'NIL' else delimiter.decode('ascii', 'replace')
        return self._delimiter

    def create_folder(self, name: str) -> str:
        """Create the folder `name` (decoded; levels joined by self.delimiter) if missing; returns its raw name."""
        raw_name = encode_mutf7(name)
        self._run(f'creating folder {name!r}', 'CREATE', _quote(raw_name), ok_codes=frozenset({'ALREADYEXISTS'}))
        return raw_name

    def uidvalidity_of(self, raw_name: str) -> int | None:
        """A folder's UIDVALIDITY by STATUS (RFC 3501, 6.3.10), without selecting it."""
        self._run(f'STATUS {raw_name!r}', 'STATUS', _quote(raw_name), '(UIDVALIDITY)')
        for line in self._untagged('STATUS'):
            match = re.search(rb'UIDVALIDITY (\d+)', line[0] if isinstance(line, tuple) else line or b'')
            if match:
                return int(match.group(1))
        return None

    def _folder_exists(self, raw_name: str) -> bool:
        self._run(f'looking for folder {raw_name!r}', 'LIST', '""', _quote(raw_name))
        return any('\\nonexistent' not in {flag.lower() for flag in folder.flags}
                   for folder in parse_list(self._untagged('LIST')))

    def select(self, raw_name: str, readonly: bool = True,
               qresync: tuple[int, int] | None = None) -> FolderState:
        """SELECT (or EXAMINE) a folder; with qresync=(uidvalidity, modseq) also learn what vanished and changed."""
        args = []
        if qresync and 'QRESYNC' in self.enabled and all(value and value > 0 for value in qresync):
            args.append(f'(QRESYNC ({int(qresync[0])} {int(qresync[1])}))')
        elif 'CONDSTORE' in self.capabilities:
            args.append('(CONDSTORE)')   # asks for HIGHESTMODSEQ in the reply (RFC 7162, 3.1.8)
        command = 'EXAMINE' if readonly else 'SELECT'
        doing = f'{command} {raw_name!r}'
        quoted = _quote(raw_name)
        self.selected, self.writable = None, False
        try:
            self._run(doing, command, quoted, *args)
        except MailError as exc:
            if self._lost or self.conn is None:
                raise
            self.conn.state = 'AUTH'   # a failed SELECT closes the previous folder (RFC 3501, 6.3.1)
            # Dovecot says only "Mailbox doesn't exist", with no code: ask LIST.
            if not isinstance(exc, FolderGone) and not self._folder_exists(raw_name):
                raise FolderGone(f'{self.where} has no folder {raw_name!r}: {exc}') from exc
            raise
        untagged = self.conn.untagged_responses
        uidvalidity = self._last_number(untagged, 'UIDVALIDITY')
        if uidvalidity is None:
            raise PermanentMailError(f'{self.where} sent no UIDVALIDITY for {raw_name!r}: UIDs cannot be trusted')
        writable = 'READ-WRITE' in untagged and not readonly
        state = FolderState(
            exists=self._last_number(untagged, 'EXISTS') or 0,
            uidvalidity=uidvalidity,
            uidnext=self._last_number(untagged, 'UIDNEXT'),
            highestmodseq=None if 'NOMODSEQ' in untagged else self._last_number(untagged, 'HIGHESTMODSEQ'),
            writable=writable,
            vanished=vanished_uids(untagged.get('VANISHED', [])),
            changed=parse_flag_updates(untagged.get('FETCH', [])))
        # imaplib checks its own state before each command; SELECT via _simple_command does not set it.
        self.conn.state = 'SELECTED'
        self.conn.is_readonly = not writable
        self.selected, self.writable = raw_name, writable
        return state

    @staticmethod
    def _last_number(untagged: dict, name: str) -> int | None:
        values = untagged.get(name)
        if not values:
            return None
        words = _text(values[-1]).split()
        return number(words[0], name) if words else None

    # -------------------------------------------------- reading

    def uids(self, since: datetime.date | None = None) -> list[int]:
        """Every UID in the selected folder, ascending; with `since`, only mail that arrived on or after
        that day (SEARCH SINCE compares the internal date, RFC 3501 6.4.4)."""
        return self._search('listing UIDs', *_since(since) or ('ALL',))

    def uids_since(self, uid: int, since: datetime.date | None = None) -> list[int]:
        """The UIDs >= uid in the selected folder, ascending (and arrived on or after `since`)."""
        first = max(int(uid), 1)
        # n:* always includes the highest UID, even below n (RFC 3501, 6.4.8): filter.
        return [found for found in self._search(f'listing UIDs from {first}', 'UID', f'{first}:*', *_since(since))
                if found >= first]

    def _search(self, doing: str, *criteria: str) -> list[int]:
        self._require_selected(doing)
        if 'ESEARCH' in self.capabilities:
            # RETURN (ALL) answers with a sequence set, "1:10000", instead of 10,000 numbers.
            self._run(doing, 'UID', 'SEARCH', 'RETURN', '(ALL)', *criteria)
            return parse_esearch(self._untagged('ESEARCH'))
        self._run(doing, 'UID', 'SEARCH', *criteria)
        return sorted(number(token, 'a UID') for line in self._untagged('SEARCH') for token in (line or b'').split())

    def fetch(self, uids: Iterable[int], batch: int = 500, batch_bytes: int = BATCH_BYTES,
              newest_first: bool = False) -> Iterator[FetchedMessage]:
        """The messages with these UIDs, ascending (or, newest_first, batches from the highest UID down), at
        most batch messages and batch_bytes per command; messages that are not there (expunged meanwhile, or
        never were) are left out."""
        self._require_selected('fetching messages')
        items = 'UID FLAGS RFC822.SIZE INTERNALDATE BODY.PEEK[]'   # PEEK: fetching must not set \Seen
        if 'CONDSTORE' in self.capabilities:
            items += ' MODSEQ'
        wanted = sorted(set(uids))
        sizes = self._sizes_for_batching(wanted, batch, batch_bytes)
        for chunk in batches(sizes, batch, batch_bytes, descending=newest_first):
            self._run(f'fetching {len(chunk)} messages', 'UID', 'FETCH', uid_set(chunk), f'({items})',
                      ok_codes=frozenset({'EXPUNGEISSUED'}))
            yield from parse_fetch(self._untagged('FETCH'))

    def _sizes_for_batching(self, uids: list[int], batch: int, batch_bytes: int) -> dict[int, int]:
        """{uid: size, or an upper bound} for batches(): a full batch of messages of at most
        batch_bytes / batch each stays within batch_bytes, so only larger ones need their
        sizes. SEARCH LARGER names those in one short reply; asking every size would make
        imaplib read a line per message (a quarter more time for 10,000 small ones)."""
        if len(uids) <= 1:
            return dict.fromkeys(uids, 0)
        limit = max(batch_bytes // max(batch, 1), 1)
        large = []
        for uid_text in uid_sets(uids):
            large += self._search('finding large messages', 'UID', uid_text, 'LARGER', str(limit))
        sizes = dict.fromkeys(uids, limit)
        for uid_text in uid_sets(large):
            self._run('fetching message sizes', 'UID', 'FETCH', uid_text, '(UID RFC822.SIZE)',
                      ok_codes=frozenset({'EXPUNGEISSUED'}))
            sizes.update(parse_sizes(self._untagged('FETCH')))
        return sizes

    def identities(self, uids: Iterable[int]) -> Iterator[FetchedMessage]:
        """Size and the Message-ID and Date header lines (as `raw`) of these messages: enough to recognise
        stored mail under a new UIDVALIDITY without downloading it again."""
        self._require_selected('fetching message identities')
        wanted = sorted(set(uids))
        sets = [text for start in range(0, len(wanted), IDENTITY_BATCH)
                for text in uid_sets(wanted[start:start + IDENTITY_BATCH])]
        for uid_text in sets:
            self._run('fetching message identities', 'UID', 'FETCH', uid_text,
                      '(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID DATE)])',
                      ok_codes=frozenset({'EXPUNGEISSUED'}))
            yield from parse_fetch(self._untagged('FETCH'))

    def changed_flags(self, since_modseq: int) -> dict[int, tuple[str, ...]]:
        """{uid: flags} of the messages whose flags changed after since_modseq (needs CONDSTORE)."""
        self._require_selected('fetching changed flags')
        if 'CONDSTORE' not in self.capabilities:
            raise PermanentMailError(f'{self.where} does not offer CONDSTORE: use all_flags()')
        self._run(f'fetching flags changed since {since_modseq}', 'UID', 'FETCH', '1:*', '(UID FLAGS)',
                  f'(CHANGEDSINCE {int(since_modseq)})')
        return parse_flag_updates(self._untagged('FETCH'))

    def all_flags(self) -> dict[int, tuple[str, ...]]:
        """{uid: flags} of every message in the selected folder."""
        self._require_selected('fetching all flags')
        self._run('fetching all flags', 'UID', 'FETCH', '1:*', '(UID FLAGS)')
        return parse_flag_updates(self._untagged('FETCH'))

    # -------------------------------------------------- writing

    def append(self, raw_name: str, raw: bytes, flags: Iterable[str] = (),
               date: datetime.datetime | None = None) -> int | None:
        """Store a message in a folder; returns its UID when the server offers UIDPLUS.

        imaplib turns bare LF and CR into CRLF first, as IMAP requires.
        """
        flag_list = f'({" ".join(flags)})' if flags else None
        when = imaplib.Time2Internaldate(date) if date else None
        data = self._call(f'appending to {raw_name!r}', self.conn.append, _quote(raw_name), flag_list, when, raw)
        match = re.search(r'\[APPENDUID \d+ (\d+)\]', _text(data))   # RFC 4315: [APPENDUID uidvalidity uid]
        return number(match.group(1), 'a UID') if match else None

    def store_flags(self, uids: Iterable[int], add: Iterable[str] = (), remove: Iterable[str] = ()) -> None:
        """Add and remove flags on messages of the selected folder."""
        self._require_writable('changing flags')
        for sign, flags in (('+', tuple(add)), ('-', tuple(remove))):
            if flags:
                for uid_text in uid_sets(uids):
                    self._run(f'{sign}flags {flags}', 'UID', 'STORE', uid_text, f'{sign}FLAGS.SILENT',
                              f'({" ".join(flags)})')

    def move(self, uids: Iterable[int], target_raw_name: str) -> dict[int, int]:
        """Move messages of the selected folder to another folder, a sequence set per command.

        Returns {UID here: UID in the target} for the messages the server names
        in COPYUID (RFC 4315, UIDPLUS: untagged before MOVE's expunges, RFC 6851
        4.3; in COPY's tagged reply), so a caller can follow a message it moved
        instead of finding it again as a new one; empty without UIDPLUS.
        """
        self._require_writable('moving messages')
        doing = f'moving messages to {target_raw_name!r}'
        moved: dict[int, int] = {}
        for uid_text in uid_sets(uids):
            if 'MOVE' in self.capabilities:   # RFC 6851: atomic, one command
                data = self._run(doing, 'UID', 'MOVE', uid_text, _quote(target_raw_name))
            else:
                data = self._run(doing, 'UID', 'COPY', uid_text, _quote(target_raw_name))
            moved.update(copied_uids(self._untagged('COPYUID') + [_text(data)]))
            if 'MOVE' not in self.capabilities:
                self._expunge_set(uid_text)
        return moved

    def expunge_uids(self, uids: Iterable[int]) -> None:
        """Delete messages of the selected folder for good."""
        self._require_writable('expunging messages')
        for uid_text in uid_sets(uids):
            self._expunge_set(uid_text)

    def _expunge_set(self, uid_text: str) -> None:
        self._run('flagging messages \\Deleted', 'UID', 'STORE', uid_text, '+FLAGS.SILENT', '(\\Deleted)')
        if 'UIDPLUS' in self.capabilities:
            self._run('expunging messages', 'UID', 'EXPUNGE', uid_text)   # RFC 4315: only these UIDs
        else:
            self._run('expunging messages', 'EXPUNGE')   # every \Deleted message: see the module docstring

    # -------------------------------------------------- ending

    def close(self) -> None:
        """Log out and close the connection; a no-op when already closed."""
        if self.conn is None:
            return
        if self._lost:
            self._drop()
            return
        try:
            with self._translated('logging out'):
                self.conn.logout()
        finally:
            self.conn = None

    def usable(self, probe: bool) -> bool:
        """Whether the session still answers; `probe` asks with NOOP even when nothing waits to be read."""
        if self.conn is None:
            return False
        # A server that restarted or said BYE left something to read: an idle session never does.
        if not (probe or select.select([self.conn.sock], [], [], 0)[0]):
            return True
        try:
            self.conn.noop()
        except (OSError, imaplib.IMAP4.error):   # the session is gone; a new one is the answer
            self._drop()
            return False
        return True

    def _drop(self) -> None:
        """Close the socket without a word: after an error we do not know what state the server is in."""
        conn, self.conn = getattr(self, 'conn', None), None
        if conn is not None:
            with contextlib.suppress(OSError):   # already closed by the peer; closing was all we wanted
                conn.shutdown()

    def __enter__(self) -> 'ImapSession':
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self._drop()
