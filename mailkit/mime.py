"""Turn one raw RFC 822 / MIME message into the fields we store.

Why a hand-rolled parser
------------------------
Sync speed is decided here. A sync of 10,000 messages must beat mbsync's
9.1 s including the IMAP fetch and the database writes, which leaves well
under 0.3 ms per message for parsing. The stdlib `email` package builds an
object tree and, with `policy.default`, runs every header through a
pure-Python RFC 5322 grammar: 0.5-0.7 ms per message on the spam/dev corpus
here, 2.2 ms on the sync host. `compat32` plus our own header decoding
still costs 0.11 ms (its header pass alone 0.064 ms), too close to the
budget to build on. So this module does only the work the stored fields
need, on the raw bytes, and lets C primitives (bytes.find, binascii, one
regex per header block) do the scanning: 0.05 ms per message, 10-11x
faster than policy.default (bench/mime_bench.py has the figures). From
PyPI, fast-mail-parser 0.10 (Rust) parses in 0.03 ms but raises on 30 of
the 4,054 corpus messages, reads the mbox From line as a header and loses
header order: not worth a compiled dependency and a fallback parser.

1. Headers (RFC 5322 2.2). The header block ends at the first empty line.
   One regex `split` cuts it into fields, each with its folded continuation
   lines; unfolding is deleting the line breaks (2.2.3). A line that is
   neither a field nor a continuation ends the headers and starts the body,
   as in the stdlib. Headers are read as UTF-8 (RFC 6532); raw 8-bit
   headers in a legacy charset are re-read in the charset of the text
   body, else cp1252 (as Thunderbird does).
2. Encoded words (RFC 2047): regex plus binascii. Adjacent words in one
   charset are joined as bytes before decoding, because senders split
   multibyte characters across words; blanks between encoded words go
   (6.2).
3. Addresses: one regex per mailbox for "Name" <addr>, Name <addr>, addr
   and addr (Full Name); groups and odd quoting go to email.utils. Dates:
   one regex for the RFC 5322 form, email.utils for obsolete ones.
4. MIME (RFC 2045/2046): the body is walked by offsets into the one raw
   buffer; a part is copied only when it is a leaf we keep. Boundary lines
   are found with bytes.find; base64 and quoted-printable are undone by
   binascii. message/rfc822 parts are kept as attachments, raw, not parsed.
   multipart nesting deeper than MAX_DEPTH is kept whole as an attachment.

Charsets follow mail clients (WHATWG Encoding labels: gb2312 -> gb18030,
iso-8859-1 -> cp1252, ks_c_5601-1987 -> cp949): the declared charset, then
UTF-8, then the declared charset with replacement characters; with no
usable label, UTF-8 (even slightly broken), then cp1252.

Nothing in a message makes `parse` raise: problems become short strings in
`ParsedMessage.defects`. `ParseError` means the input was not bytes, or
this module failed on a message (a bug): keep the raw bytes and flag the
message; retrying cannot help.

Known limits: bare-CR line endings (classic Mac OS) are not line breaks;
uuencode and other non-MIME encodings are kept raw; an HTML body's charset
comes from its MIME header, not from <meta>; unlabelled legacy text is not
sniffed (Big5 labelled us-ascii reads as cp1252). Filenames are stored as
sent: they may hold '/' or '..' and must never be used as paths.
"""
from __future__ import annotations

import binascii
import codecs
import email.utils
import functools
import html as html_lib
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from urllib.parse import unquote_to_bytes

__all__ = [
    'Attachment', 'ParsedMessage', 'ParseError', 'parse', 'parse_headers',
    'decode_header_value', 'parse_addresses',
]

# Deeper than any mail client nests (they stop at about 6 levels); a part
# below this depth is stored whole as an attachment. It bounds recursion
# and the re-scanning of nested bodies in hostile messages.
MAX_DEPTH = 20
# Cap on recorded defects: a hostile message with 100,000 broken parts
# should not produce 100,000 strings.
MAX_DEFECTS = 50
SNIPPET_CHARS = 200
# Bounds on hostile messages, so that parsing stays linear and cheap: a
# megabyte of crafted header or structure must not cost more than a real
# message of that size. Encoded words and addresses are read in the first
# 100 KB of a value (Postfix discards the rest of a header past 100 KB,
# header_size_limit); the value itself is kept whole. Real messages have
# tens of fields and parts, not thousands.
MAX_HEADER_VALUE = 100 * 1024
MAX_HEADER_FIELDS = 1000
MAX_PARTS = 1000
MAX_PARAMS = 100
# email.utils parses the odd address lists our one regex does not (groups,
# stray quotes) in pure Python, quadratically for groups (a 1 MB group took
# 76 s): it gets at most this much of one.
MAX_ODD_ADDRESSES = 4096


class ParseError(ValueError):
    """Not bytes, or this module failed on the message: store the raw bytes and flag it; retrying cannot help."""


@dataclass(slots=True)
class Attachment:
    filename: str | None      # decoded RFC 2231 / RFC 2047 name; None when absent
    content_type: str         # lowercased 'type/subtype'
    content_id: str | None    # without angle brackets, as `cid:` URLs use it (RFC 2392)
    disposition: str | None   # 'attachment' | 'inline' | None
    data: bytes               # transfer encoding undone; raw when it is unknown


@dataclass(slots=True)
class ParsedMessage:
    subject: str
    from_: list[tuple[str, str]]
    to: list[tuple[str, str]]
    cc: list[tuple[str, str]]
    reply_to: list[tuple[str, str]]
    date: datetime | None
    message_id: str | None
    in_reply_to: str | None
    references: list[str]
    text: str | None
    html: str | None
    snippet: str
    attachments: list[Attachment] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    size: int = 0
    defects: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- public API

def parse(raw: bytes) -> ParsedMessage:
    """Parse one raw message into stored fields; what is wrong with it goes to `defects`.

    Raises ParseError only for input that is not bytes, or when this module
    fails on a message (a bug, reported with the cause chained).
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ParseError(f'expected the raw message as bytes, got {type(raw).__name__}')
    buf = bytes(raw)
    try:
        return _parse(buf)
    except Exception as exc:  # a bug here must not stall a sync: the caller stores the raw bytes
        raise ParseError(f'cannot parse message of {len(buf)} bytes: {exc!r}') from exc


def parse_headers(raw: bytes) -> list[tuple[str, str]]:
    """Top-level headers only, (name, decoded value) in order; the body is not looked at."""
    buf = bytes(raw)
    fields, _, _ = _read_fields(buf, _skip_envelope(buf), len(buf), [])
    return [(name, _decode_value(value)) for name, value in fields]


def decode_header_value(value: str | bytes) -> str:
    """Unfold a header value and decode its RFC 2047 encoded words."""
    return _decode_value(_value_str(value))


def parse_addresses(value: str | bytes) -> list[tuple[str, str]]:
    """[(display name, address)] from an address-list header value, names decoded."""
    return _addresses(_value_str(value))


def _value_str(value: str | bytes) -> str:
    """One header value as unfolded, stripped str; bytes decoded as in a header block."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value, eight_bit = _bytes_to_header_str(bytes(value))
        value = _unfold(value).strip()
        return _repair_8bit(value) if eight_bit else value
    return _unfold(value).strip()


# ------------------------------------------------------------------- headers

# One field per match on '\n' + header block: name, optional blanks before
# the colon (obsolete syntax, RFC 5322 4.5), colon, value with its folded
# continuation lines (a CR before each LF stays in the value until
# unfolding). Starting with a literal newline lets the regex engine jump
# from line to line instead of trying every character. `split` returns
# [gap, name, value, gap, name, value, ..., gap]: any non-empty gap is a line
# that is neither a field nor a continuation.
_FIELD = re.compile(r'\n([^\s:]+)[ \t]*:[ \t]*([^\n]*(?:\n[ \t][^\n]*)*)')
# The same split keeping odd lines, for the rare path that needs offsets.
_FOLDED_FIELD = re.compile(r'(?:([^\s:]+)[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)|([^\n]+))\n?')
_BLANK_LINE = re.compile(rb'\n\r?\n')


def _skip_envelope(buf: bytes) -> int:
    """Offset after an mbox 'From sender date' line (not a header: no colon after From)."""
    if buf.startswith(b'From ') and not buf[5:80].lstrip(b' \t').startswith(b':'):
        nl = buf.find(b'\n')
        return len(buf) if nl < 0 else nl + 1
    return 0


def _bytes_to_header_str(data: bytes) -> tuple[str, bool]:
    """Header bytes as str, and whether some were not UTF-8 (RFC 6532 allows UTF-8).

    Bytes that are not UTF-8 survive as surrogate escapes, to be re-decoded
    field by field (_repair_8bit).
    """
    try:
        return data.decode('utf-8'), False
    except UnicodeDecodeError:  # legacy 8-bit header: _repair_8bit fixes it field by field
        return data.decode('utf-8', 'surrogateescape'), True


def _unfold(text: str) -> str:
    """RFC 5322 2.2.3: unfolding removes the line breaks before blanks, keeping the blanks."""
    if '\r' in text:
        text = text.replace('\r\n', '\n')
    return text.replace('\n ', ' ').replace('\n\t', '\t')


def _read_fields(buf: bytes, start: int, end: int, defects: list[str], repair: bool = True):
    """Header fields of the entity at buf[start:end]: ([(name, unfolded value)], body offset, eight_bit).

    With repair=False, bytes that are not UTF-8 stay as surrogate escapes for
    the caller to re-decode (see _repair_8bit).
    """
    # An empty first line means "no headers" (RFC 5322 3.5): all of it is body.
    if buf.startswith(b'\n', start, end) or buf.startswith(b'\r\n', start, end):
        return [], start + (1 if buf[start] == 0x0A else 2), False
    blank = _BLANK_LINE.search(buf, start, end)
    if blank is None:
        header_end = body_start = end
    else:
        header_end, body_start = blank.start(), blank.end()
    block, eight_bit = _bytes_to_header_str(buf[start:header_end])
    if blank is None:
        block = block.rstrip('\r\n')
    pieces = _FIELD.split('\n' + block)
    if any(pieces[::3]):
        fields, body_start = _read_odd_fields(block, start, body_start, defects)
    else:
        # Unfolding (RFC 5322 2.2.3) deletes the CRLFs; the blank after each stays.
        fields = [(name, _unfold_value(value) if '\n' in value else value.rstrip())
                  for name, value in zip(pieces[1::3], pieces[2::3])]
    if len(fields) > MAX_HEADER_FIELDS:
        _defect(defects, f'{len(fields)} header fields: only the first {MAX_HEADER_FIELDS} are read')
        fields = fields[:MAX_HEADER_FIELDS]
    if eight_bit and repair:
        fields = [(name, _repair_8bit(value)) for name, value in fields]
    return fields, body_start, eight_bit


def _unfold_value(value: str) -> str:
    return value.replace('\r', '').replace('\n', '').strip()


def _read_odd_fields(block: str, start: int, body_start: int, defects: list[str]):
    """_read_fields for a header block holding a line that is not a field (the rare, slower path)."""
    fields = []
    for match in _FOLDED_FIELD.finditer(block):
        name, value, other = match.groups()
        if other is None:
            fields.append((name, _unfold(value).strip()))
        elif other[0] in ' \t' and not fields:
            # A continuation with nothing to continue: skip it, as the stdlib does.
            _defect(defects, 'header block starts with a continuation line')
        elif other.startswith(('From ', '>From ')):
            _defect(defects, 'mbox From line inside the headers')
        elif other.strip():
            # Not a header: the sender forgot the empty line, so the body starts here.
            _defect(defects, 'missing empty line between headers and body')
            return fields, start + len(block[:match.start()].encode('utf-8', 'surrogateescape'))
    return fields, body_start


def _repair_8bit(value: str, charset: str | None = None) -> str:
    """Re-decode a value whose raw bytes were not UTF-8 (they sit in it as surrogate escapes).

    Raw 8-bit headers carry no charset. Like Thunderbird, we try the charset
    of the message's text body first: a Big5 body comes with Big5 headers.
    """
    if value.isascii():
        return value
    try:
        value.encode('utf-8')
        return value
    except UnicodeEncodeError:  # surrogates: these bytes were not UTF-8
        return _decode_bytes(value.encode('utf-8', 'surrogateescape'), charset, None)


def _first_values(fields, wanted=None) -> dict[str, str]:
    """Lowercased name -> value of its first occurrence (what the stdlib's msg[name] returns)."""
    if wanted is None:
        return {name.lower(): value for name, value in reversed(fields)}
    return {key: value for name, value in reversed(fields) if (key := name.lower()) in wanted}


# ------------------------------------------------------ RFC 2047 encoded words

# =?charset?encoding?text?= ; the charset may carry an RFC 2231 language
# suffix (charset*lang). The text may hold blanks, which RFC 2047 forbids
# but spammers and old clients produce, and every mail client decodes.
_ENCODED_WORD = re.compile(r'=\?([^?\s]+)\?([qQbB])\?([^?]*)\?=')


def _decode_value(value: str) -> str:
    return _decode_words(value) if '=?' in value else value


def _decode_words(value: str, defects: list[str] | None = None) -> str:
    """Decode RFC 2047 encoded words in an unfolded header value (in its first MAX_HEADER_VALUE characters)."""
    if len(value) > MAX_HEADER_VALUE:
        _defect(defects, f'encoded words after the first {MAX_HEADER_VALUE} characters of a header are kept as sent')
        return _decode_words(value[:MAX_HEADER_VALUE], defects) + value[MAX_HEADER_VALUE:]
    pieces: list[list] = []   # [charset or None, bytes or str]
    pos = 0
    after_word = False
    for match in _ENCODED_WORD.finditer(value):
        gap = value[pos:match.start()]
        # RFC 2047 6.2: blanks between two encoded words are not displayed.
        if gap and not (after_word and gap.isspace()):
            pieces.append([None, gap])
        pos = match.end()
        charset, encoding, text = match.groups()
        data = _decode_word_text(encoding, text)
        if data is None:
            _defect(defects, f'undecodable encoded word {match.group(0)[:40]!r}')
            pieces.append([None, match.group(0)])
            after_word = False
            continue
        charset = charset.split('*', 1)[0].lower()
        if pieces and pieces[-1][0] == charset:
            pieces[-1][1] += data      # a multibyte character may straddle two words
        else:
            pieces.append([charset, data])
        after_word = True
    if not pieces:
        return value
    if pos < len(value):
        pieces.append([None, value[pos:]])
    return ''.join(text if charset is None else _decode_bytes(text, charset, defects)
                   for charset, text in pieces)


def _decode_word_text(encoding: str, text: str) -> bytes | None:
    """The bytes of one encoded word's text; None when it is not valid B or Q."""
    data = text.encode('utf-8', 'surrogateescape')
    if encoding in 'qQ':
        # RFC 2047 4.2: '_' is a space; binascii's header mode does exactly this.
        return binascii.a2b_qp(data, header=True)
    data = data.strip()
    try:
        return binascii.a2b_base64(data + b'=' * (-len(data) % 4))
    except binascii.Error:  # broken base64 inside a header: salvage what we can
        return _salvage_base64(data)


# ------------------------------------------------------------------ charsets

# Labels mail clients treat as a wider charset than the name says (WHATWG
# Encoding Standard): senders declare the old name and use the superset.
_CHARSET_ALIASES = {
    'gb2312': 'gb18030', 'gbk': 'gb18030', 'x-gbk': 'gb18030', 'euc-cn': 'gb18030',
    'gb_2312-80': 'gb18030', 'chinese': 'gb18030',
    'ks_c_5601-1987': 'cp949', 'ks_c_5601': 'cp949', 'euc-kr': 'cp949', 'korean': 'cp949',
    'shift_jis': 'cp932', 'shift-jis': 'cp932', 'sjis': 'cp932', 'x-sjis': 'cp932',
    'windows-31j': 'cp932', 'big5': 'cp950', 'x-x-big5': 'cp950',
    'iso-8859-1': 'cp1252', 'iso8859-1': 'cp1252', 'iso_8859-1': 'cp1252',
    'latin1': 'cp1252', 'latin-1': 'cp1252', 'l1': 'cp1252',
    'tis-620': 'cp874', 'iso-8859-11': 'cp874',
    'iso-8859-8-i': 'iso8859-8', 'iso-8859-6-i': 'iso8859-6',
    'x-mac-roman': 'mac-roman', 'utf8': 'utf-8', 'unicode-1-1-utf-8': 'utf-8',
}
_ASCII_CODECS = frozenset({'ascii'})
# Codecs that read ASCII bytes as ASCII. Pure-ASCII text in one of these is
# decoded by the C fast path: the charmap codecs (cp1252 and the ISO 8859
# family) are 3x slower even on ASCII. Not in the list: 7-bit stateful
# codecs (iso2022_jp, utf-7, hz), whose escapes are ASCII bytes, UTF-16/32,
# and EBCDIC.
_ASCII_SUPERSETS = frozenset({
    'ascii', 'utf-8', 'utf-8-sig', 'cp437', 'cp850', 'cp866', 'cp874', 'tis-620', 'mac-roman',
    'cp1250', 'cp1251', 'cp1252', 'cp1253', 'cp1254', 'cp1255', 'cp1256', 'cp1257', 'cp1258',
    'iso8859-1', 'iso8859-2', 'iso8859-3', 'iso8859-4', 'iso8859-5', 'iso8859-6', 'iso8859-7',
    'iso8859-8', 'iso8859-9', 'iso8859-10', 'iso8859-13', 'iso8859-14', 'iso8859-15', 'iso8859-16',
    'koi8-r', 'koi8-u', 'gb2312', 'gbk', 'gb18030', 'big5', 'big5hkscs', 'cp950',
    'shift_jis', 'cp932', 'euc_jp', 'euc_kr', 'cp949',
})


def _codec(charset: str | None) -> str | None:
    """Python codec name for a MIME charset label, or None when Python has no text codec for it."""
    # IANA charset names are at most 40 characters; longer labels come from
    # senders and would fill the cache below with megabyte keys.
    if not charset or len(charset) > 64:
        return None
    return _cached_codec(charset)


@functools.lru_cache(maxsize=256)   # bounded: charset labels come from senders
def _cached_codec(charset: str) -> str | None:
    label = charset.strip().strip('"\'').strip().lower()
    if label.startswith('charset='):     # charset="charset=us-ascii", seen from a webmail
        label = label[8:].strip('"\' ')
    label = _CHARSET_ALIASES.get(label, label)
    try:
        info = codecs.lookup(label)
    except LookupError:                  # unknown label: the caller guesses instead
        return None
    # Codecs such as 'base64' or 'rot13' exist but do not turn bytes into text;
    # bytes.decode() checks this same flag before refusing them.
    return info.name if info._is_text_encoding else None


def _decode_bytes(data: bytes, charset: str | None, defects: list[str] | None) -> str:
    """Bytes to str: declared charset, then UTF-8, then declared (or cp1252) with replacement chars."""
    codec = _codec(charset)
    if codec is None and charset:
        _defect(defects, f'unknown charset {charset[:40]!r}')
    if data.isascii() and (codec is None or codec in _ASCII_SUPERSETS):
        return data.decode('ascii')
    if codec is not None:
        text = _try_decode(data, codec)
        if text is not None:
            return text
    if codec != 'utf-8':
        text = _try_decode(data, 'utf-8')
        if text is not None:
            if codec is not None:
                _defect(defects, f'text labelled {charset[:40]!r} is utf-8')
            return text
    if codec is None or codec in _ASCII_CODECS:
        text = _mostly_utf8(data)
        if text is not None:
            _defect(defects, 'broken utf-8 text: bad bytes replaced')
            return text
        # Legacy 8-bit text with no usable label is nearly always Windows Latin-1
        # (WHATWG treats 'us-ascii' and 'iso-8859-1' labels the same way).
        codec = 'cp1252'
        text = _try_decode(data, codec)
        if text is not None:
            _defect(defects, f'8-bit text labelled {charset or "nothing"!r}: read as cp1252'[:120])
            return text
    _defect(defects, f'undecodable bytes in {codec} text replaced')
    return data.decode(codec, 'replace')


def _mostly_utf8(data: bytes) -> str | None:
    """UTF-8 with a few broken bytes (a truncated header, a cut last character), else None.

    Legacy 8-bit text almost never forms valid multibyte UTF-8 sequences, so
    more valid non-ASCII characters than broken ones means UTF-8.
    """
    text = data.decode('utf-8', 'replace')
    broken = text.count('\ufffd')
    non_ascii = len(text) - len(text.encode('ascii', 'ignore'))
    return text if non_ascii - broken > broken else None


def _try_decode(data: bytes, codec: str) -> str | None:
    try:
        return data.decode(codec)
    except UnicodeDecodeError:  # the label lied: the caller tries its next guess
        return None


# ----------------------------------------------------------------- addresses

_ADDR = r'[^\s<>"(),;:@\\]++@[^\s<>"(),;:@\\]++'
# One mailbox of a list and the comma after it, in the shapes nearly all mail
# uses: "Quoted Name" <addr> | Name <addr> | addr | addr (Full Name).
# 'addr (Full Name)' is the RFC 822 / RFC 1036 way to give a name; RFC 5322
# calls comments invisible, but it is the only name those senders give.
# Each class stops at the delimiter that follows it, and the quantifiers are
# possessive, so nothing backtracks: a hostile megabyte costs milliseconds.
_MAILBOX = re.compile(
    rf'(?:\s*+"((?:[^"\\]++|\\.)*+)"\s*+<\s*+({_ADDR})\s*+>'
    rf'|([^"<>(),;:@\\]*+)<\s*+({_ADDR})\s*+>'
    rf'|\s*+<?({_ADDR})>?(?:\s*+\(([^()\\]*+)\))?)'
    r'\s*+(?:,\s*+|$)')


def _addresses(value: str | None) -> list[tuple[str, str]]:
    """Address list parse: one regex per mailbox; email.utils for the rest (groups, odd quoting).

    Reads the first MAX_HEADER_VALUE characters: later addresses of a longer list are left out.
    """
    if not value:
        return []
    value = value[:MAX_HEADER_VALUE]
    out = []
    pos, end = 0, len(value)
    while pos < end:
        match = _MAILBOX.match(value, pos)
        if match is None:
            if end <= MAX_ODD_ADDRESSES:
                return _addresses_by_stdlib(value)
            # A long list: keep what the regex read, and give the stdlib a bounded rest.
            return out + _addresses_by_stdlib(value[pos:pos + MAX_ODD_ADDRESSES])
        quoted, quoted_addr, name, named_addr, addr, comment = match.groups()
        if quoted_addr:
            if '\\' in quoted:
                quoted = _QUOTED_PAIR.sub(r'\1', quoted)
            out.append((_decode_value(' '.join(quoted.split())), quoted_addr))
        elif named_addr:
            out.append((_decode_value(' '.join(name.split())), named_addr))
        else:
            out.append((_decode_value(' '.join(comment.split())) if comment else '', addr))
        pos = match.end()
    return out


def _addresses_by_stdlib(value: str) -> list[tuple[str, str]]:
    try:
        pairs = email.utils.getaddresses([value])
    except RecursionError:   # the stdlib recurses once per nested '(': a hostile header, not an address
        return []
    return [(_decode_value(name), addr) for name, addr in pairs if name or addr]


# ------------------------------------------------------- dates and message ids

# The form nearly every mailer writes (RFC 5322 3.3): [Day,] D Mon YYYY HH:MM[:SS] +ZZZZ.
# Parsed here in one regex; anything else goes to email.utils, which knows
# the obsolete forms (two-digit years, zone names).
_DATE = re.compile(r'\s*(?:[A-Za-z]{3},?\s*)?(\d{1,2})\s+([A-Za-z]{3})\s+(\d{4})\s+'
                   r'(\d{1,2}):(\d\d)(?::(\d\d))?\s*([+-])(\d\d)(\d\d)(?![\d:])')
_MONTHS = {name: number for number, name in enumerate(
    ('jan', 'feb', 'mar', 'apr', 'may', 'jun', 'jul', 'aug', 'sep', 'oct', 'nov', 'dec'), 1)}


def _parse_date(value: str | None, defects: list[str]) -> datetime | None:
    """RFC 5322 3.3 date as aware UTC; None when missing or unparseable."""
    if not value:
        return None
    try:
        match = _DATE.match(value)
        month = match and _MONTHS.get(match.group(2).lower())
        if month:
            day, _, year, hour, minute, second, sign, zone_h, zone_m = match.groups()
            offset = timedelta(hours=int(zone_h), minutes=int(zone_m))
            local = datetime(int(year), month, int(day), int(hour), int(minute), int(second or 0),
                             tzinfo=timezone.utc)
            # '-0000' means UTC with no local zone known (RFC 5322 3.3): the same instant as +0000.
            return local - offset if sign == '+' else local + offset
        parsed = email.utils.parsedate_to_datetime(value)
        if parsed.tzinfo is None:   # '-0000' again
            return parsed.replace(tzinfo=timezone.utc)
        return parsed.astimezone(timezone.utc)
    except (ValueError, OverflowError) as exc:   # not a date, or out of datetime's range
        _defect(defects, f'invalid Date {value[:60]!r}: {exc}')
        return None


_MSG_ID = re.compile(r'<([^<>]*)>')


def _first_id(value: str | None) -> str | None:
    """The first msg-id (RFC 5322 3.6.4) without angle brackets; a bare token when brackets are missing."""
    if not value:
        return None
    match = _MSG_ID.search(value)
    if match is not None:
        return match.group(1).strip() or None
    token = value.split(None, 1)
    return token[0] if token else None


def _all_ids(value: str | None) -> list[str]:
    if not value:
        return []
    ids = [m.strip() for m in _MSG_ID.findall(value) if m.strip()]
    return ids or value.replace(',', ' ').split()


# ---------------------------------------------------------- MIME parameters

# ; name = "quoted \" string" | token   (RFC 2045 5.1). A missing closing
# quote runs to the end of the value, which is what the sender meant.
_PARAM = re.compile(r';\s*+([^\s=;"]++)\s*+=\s*+(?:"((?:[^"\\]++|\\.)*+)"?|([^;]*+))', re.S)
_QUOTED_PAIR = re.compile(r'\\(.)', re.S)
_MIME_TYPE = re.compile(r'[!#$%&\'*+.^_`|~0-9a-z-]+/[!#$%&\'*+.^_`|~0-9a-z-]+')


def _split_header_params(value: str) -> tuple[str, dict[str, str]]:
    """'type/sub; a=b' -> ('type/sub' lowercased, {name: value}); RFC 2231 parameters merged.

    Reads the first MAX_HEADER_VALUE characters and MAX_PARAMS parameters.
    """
    value = value[:MAX_HEADER_VALUE]
    semi = value.find(';')
    if semi < 0:
        return value.strip().lower(), {}
    params: dict[str, str] = {}
    extended = False
    for count, (name, quoted, token) in enumerate(_PARAM.findall(value, semi)):
        if count == MAX_PARAMS:   # a real header has a few; a hostile one, thousands of RFC 2231 sections
            break
        name = name.lower()
        if '*' in name:
            extended = True
        if name not in params:          # the first of duplicate parameters wins, as in the stdlib
            if token:
                params[name] = token.strip()
            else:
                params[name] = _QUOTED_PAIR.sub(r'\1', quoted) if '\\' in quoted else quoted
    if extended:
        params = _merge_rfc2231(params)
    return value[:semi].strip().lower(), params


def _merge_rfc2231(params: dict[str, str]) -> dict[str, str]:
    """RFC 2231 3-4: name*0*=charset'lang'%xx, name*1=... joined and decoded; wins over plain name=."""
    plain = {k: v for k, v in params.items() if '*' not in k}
    segments: dict[str, list[tuple[int, bool, str]]] = {}
    for key, value in params.items():
        if '*' not in key:
            continue
        base, _, rest = key.partition('*')
        encoded = key.endswith('*')
        number = rest.rstrip('*')
        # isdecimal, not isdigit: int('²') raises. Sections are numbered from 0 up (RFC 2231, 3).
        index = int(number) if number.isdecimal() and len(number) <= 4 else 0
        segments.setdefault(base, []).append((index, encoded, value))
    for base, parts in segments.items():
        parts.sort()
        charset = None
        data = bytearray()
        for position, (_, encoded, value) in enumerate(parts):
            if encoded:
                if position == 0 and value.count("'") >= 2:
                    charset, _, value = value.split("'", 2)
                data += unquote_to_bytes(value)
            else:
                data += value.encode('utf-8', 'surrogateescape')
        plain[base] = _decode_bytes(bytes(data), charset or 'utf-8', None)
    return plain


# ---------------------------------------------------------------- MIME walk

class _Walk:
    """What the walk collects; one per parse."""
    __slots__ = ('buf', 'text', 'html', 'attachments', 'defects', 'charset', 'parts_left')

    def __init__(self, buf: bytes, defects: list[str]):
        self.buf = buf
        self.text: str | None = None
        self.html: str | None = None
        self.attachments: list[Attachment] = []
        self.defects = defects
        self.charset: str | None = None     # of the first text body: the best guess for 8-bit headers
        self.parts_left = MAX_PARTS         # in the whole message, at every depth


_PART_FIELDS = frozenset({'content-type', 'content-transfer-encoding', 'content-disposition', 'content-id'})


def _walk_entity(walk: _Walk, mime: dict[str, str], start: int, end: int,
                 depth: int, default_type: str, parent: str = '') -> None:
    """Collect bodies and attachments from the entity whose body is buf[start:end]; parent is the enclosing type."""
    ctype, params = _content_type(mime.get('content-type'), default_type, walk.defects)
    if ctype.startswith('multipart/'):
        if depth >= MAX_DEPTH:
            _defect(walk.defects, f'MIME nesting deeper than {MAX_DEPTH}: stored as an attachment')
            _add_attachment(walk, mime, ctype, params, walk.buf[start:end], parent)
            return
        boundary = params.get('boundary', '').rstrip()   # RFC 2046 5.1.1: never ends in a blank
        spans = _split_multipart(walk.buf, start, end, boundary, walk.defects, walk.parts_left) \
            if boundary else None
        if spans is None:
            # RFC 2046 5.1.1 gives no recovery; treat the body as plain text so it is still readable.
            _defect(walk.defects, f'{ctype} without usable boundary: read as text/plain')
            ctype, params = 'text/plain', {}
        else:
            # RFC 2046 5.1.5: in a digest, a part without Content-Type is a message.
            child_default = 'message/rfc822' if ctype == 'multipart/digest' else 'text/plain'
            walk.parts_left -= len(spans)
            for part_start, part_end in spans:
                fields, body_start, _ = _read_fields(walk.buf, part_start, part_end, walk.defects)
                _walk_entity(walk, _first_values(fields, _PART_FIELDS), body_start, part_end,
                             depth + 1, child_default, ctype)
            return
    data = _decode_transfer(walk.buf[start:end], mime.get('content-transfer-encoding'), walk.defects)
    if ctype == 'text/plain' or ctype == 'text/html':
        disposition = _disposition(mime.get('content-disposition'))[0]
        if disposition != 'attachment':
            slot = 'text' if ctype == 'text/plain' else 'html'
            current = getattr(walk, slot)
            # An empty first part (Apple Mail and broken gateways send them) must
            # not hide the real body that follows.
            if current is None or not current or current.isspace():
                charset = params.get('charset')
                setattr(walk, slot, _decode_body(data, charset, walk.defects))
                walk.charset = walk.charset or charset
                return
    _add_attachment(walk, mime, ctype, params, data, parent)


def _decode_body(data: bytes, charset: str | None, defects: list[str]) -> str:
    """A text body as str with '\n' line breaks (IMAP delivers CRLF; stray CRs in CRLF text go too)."""
    codec = _codec(charset)
    if codec is not None and codec.startswith(('utf-16', 'utf-32')):
        text = _decode_bytes(data, charset, defects)     # CR is not one byte there: fix it after decoding
        return text.replace('\r\n', '\n') if '\r' in text else text
    if b'\r\n' in data:
        data = data.translate(None, b'\r')              # 3x cheaper than replace(b'\r\n', b'\n')
    return _decode_bytes(data, charset, defects)


def _content_type(value: str | None, default: str, defects: list[str]) -> tuple[str, dict[str, str]]:
    """(type/subtype, params); RFC 2045 5.2: a missing or invalid type means text/plain."""
    if not value:
        return default, {}
    ctype, params = _split_header_params(value)
    if _MIME_TYPE.fullmatch(ctype) is not None:
        return ctype, params
    # 'application/pdf name="x.pdf"' (a forgotten ';'): keep the type mail clients would.
    match = _MIME_TYPE.match(ctype)
    if match is not None and ctype[match.end()] in ' \t':
        _defect(defects, f'invalid Content-Type {value[:60]!r}: read as {match.group()}')
        # What follows the blank is meant as parameters (boundary=, name=).
        _, params = _split_header_params(';' + value.lstrip()[match.end():])
        return match.group(), params
    _defect(defects, f'invalid Content-Type {value[:60]!r}: read as text/plain')
    return 'text/plain', params


def _disposition(value: str | None) -> tuple[str | None, dict[str, str]]:
    """RFC 2183 disposition type and params; an unknown type counts as 'attachment' (2.8)."""
    if not value:
        return None, {}
    kind, params = _split_header_params(value)
    if kind not in ('attachment', 'inline'):
        kind = 'attachment' if kind else None
    return kind, params


def _add_attachment(walk: _Walk, mime: dict[str, str], ctype: str,
                    params: dict[str, str], data: bytes, parent: str) -> None:
    disposition, disp_params = _disposition(mime.get('content-disposition'))
    if disposition is None and parent == 'multipart/related':
        disposition = 'inline'     # RFC 2387: the parts after the root are shown within it
    filename = disp_params.get('filename') or params.get('name')
    if filename:
        filename = _decode_value(filename)    # RFC 2047 in a quoted name: wrong, but Outlook does it
    elif ctype == 'message/rfc822' or ctype == 'message/global':
        filename = _subject_filename(data)
    content_id = mime.get('content-id')
    if content_id:
        content_id = content_id.strip().strip('<>').strip() or None
    walk.attachments.append(Attachment(filename or None, ctype, content_id or None, disposition, data))


def _subject_filename(message: bytes) -> str:
    """A name for a forwarded message: its subject + '.eml', else 'message.eml'."""
    fields, _, _ = _read_fields(message, 0, len(message), [])
    subject = _decode_value(_first_values(fields).get('subject', ''))
    subject = subject.replace('/', '_').replace('\\', '_')
    return subject[:200] + '.eml' if subject else 'message.eml'


def _split_multipart(buf: bytes, start: int, end: int, boundary: str,
                     defects: list[str], limit: int = MAX_PARTS) -> list[tuple[int, int]] | None:
    """Body spans between boundary lines (RFC 2046 5.1.1), at most `limit`; None when no boundary line is present."""
    delimiter = b'--' + boundary.encode('utf-8', 'surrogateescape')
    spans: list[tuple[int, int]] = []
    part_start = -1
    pos = start
    while True:
        i = buf.find(delimiter, pos, end)
        if i < 0:
            break
        pos = i + 1
        if i != start and buf[i - 1] != 0x0A:          # must begin a line
            continue
        j = i + len(delimiter)
        closing = buf.startswith(b'--', j, end)
        k = j + 2 if closing else j
        while k < end and buf[k] in b' \t':            # transport padding
            k += 1
        if k < end and buf[k] not in b'\r\n':           # a longer boundary, e.g. a nested one
            continue
        if k < end and buf[k] == 0x0D:
            k += 1
        if k < end and buf[k] == 0x0A:
            k += 1
        if part_start >= 0:
            # The line break before a delimiter belongs to the delimiter.
            part_end = i - 1 if i > part_start else i
            if part_end > part_start and buf[part_end - 1] == 0x0D:
                part_end -= 1
            spans.append((part_start, max(part_end, part_start)))
        if closing:
            return spans
        if len(spans) >= limit:
            _defect(defects, f'more than {MAX_PARTS} MIME parts: the rest is not read')
            return spans
        part_start = pos = k
    if part_start < 0:
        return None
    _defect(defects, f'multipart without closing boundary {boundary[:40]!r}')
    spans.append((part_start, end))
    return spans


# ---------------------------------------------------- transfer encodings

def _decode_transfer(data: bytes, encoding: str | None, defects: list[str]) -> bytes:
    """Undo the Content-Transfer-Encoding (RFC 2045 6); keep the bytes raw when it is unknown."""
    if not encoding:
        return data
    encoding = encoding.lower()
    kind = _TRANSFER_ENCODINGS.get(encoding)
    if kind is None:
        # Senders write '7-bit', '8 bits', 'quoted printable', 'base64;': compare letters and digits only.
        kind = _TRANSFER_ENCODINGS.get(_NOT_ALNUM.sub('', encoding))
        if kind is None:
            _defect(defects, f'unknown Content-Transfer-Encoding {encoding[:40]!r}: kept raw')
            return data
    if kind == 'base64':
        return _decode_base64(data, defects)
    if kind == 'quoted-printable':
        return binascii.a2b_qp(data)
    return data


_TRANSFER_ENCODINGS = {
    '7bit': 'identity', '8bit': 'identity', 'binary': 'identity',
    'base64': 'base64', 'quoted-printable': 'quoted-printable',
    # the same with everything but letters and digits removed
    '7bits': 'identity', '8bits': 'identity', 'quotedprintable': 'quoted-printable',
}
_NOT_ALNUM = re.compile(r'[^a-z0-9]+')


def _decode_base64(data: bytes, defects: list[str]) -> bytes:
    try:
        return binascii.a2b_base64(data)   # skips line breaks and other non-alphabet bytes
    except binascii.Error as exc:          # bad padding or a truncated last group
        _defect(defects, f'broken base64 ({exc}): decoded what could be')
        return _salvage_base64(data)


_NOT_BASE64 = bytes(c for c in range(256) if not (chr(c).isascii() and (chr(c).isalnum() or chr(c) in '+/')))


def _salvage_base64(data: bytes) -> bytes:
    """Decode every whole base64 group and drop the broken tail (and any stray '=')."""
    clean = data.translate(None, _NOT_BASE64)
    if len(clean) % 4 == 1:        # one lone character carries no whole byte
        clean = clean[:-1]
    return binascii.a2b_base64(clean + b'=' * (-len(clean) % 4))


# ------------------------------------------------------------------ snippets

# Hidden blocks, comments, a block cut open by the end of the window, tags:
# one pass, in this order of preference at each '<'.
# An unclosed block swallows the rest of the window in one step; anything
# slower would let 20,000 unclosed <title> tags take seconds.
_HTML_MARKUP = re.compile(r'<(script|style|head|title)\b.*?</\1\s*>|<!--.*?(?:-->|$)'
                          r'|<(?:script|style|head|title)\b.*|<[^>]*>?', re.S | re.I)
_BODY_TAG = re.compile(r'<body\b', re.I)


def _snippet(text: str | None, html: str | None) -> str:
    """About SNIPPET_CHARS of the text (else of the HTML's visible text), whitespace collapsed."""
    if text:
        snippet = _collapse_prefix(text, 0, SNIPPET_CHARS * 2, None)
        if snippet:              # else a blank text part: the HTML may still say something
            return snippet
    if html:
        # Skip the <head> (styles, title) unread: in spam it is often most of the page.
        body = _BODY_TAG.search(html, 0, 65536)
        return _collapse_prefix(html, body.start() if body else 0, SNIPPET_CHARS * 10, _html_to_text)
    return ''


def _collapse_prefix(source: str, start: int, size: int, convert) -> str:
    """Collapse whitespace in a growing window until it yields enough characters: big bodies cost no more."""
    while True:
        chunk = source[start:start + size]
        words = ' '.join((convert(chunk) if convert else chunk).split())
        if len(words) >= SNIPPET_CHARS or start + size >= len(source):
            return words[:SNIPPET_CHARS]
        size *= 4


def _html_to_text(markup: str) -> str:
    return html_lib.unescape(_HTML_MARKUP.sub(' ', markup))


# -------------------------------------------------------------------- parse

_NON_BLANK = re.compile(rb'\S')


def _defect(defects: list[str] | None, message: str) -> None:
    if defects is not None and len(defects) < MAX_DEFECTS:
        defects.append(message)


def _parse(buf: bytes) -> ParsedMessage:
    defects: list[str] = []
    start = _skip_envelope(buf)
    if _NON_BLANK.search(buf, start) is None:
        defects.append('empty message')
    fields, body_start, eight_bit = _read_fields(buf, start, len(buf), defects, repair=False)
    first = _first_values(fields)

    walk = _Walk(buf, defects)
    mime = {key: first[key] for key in _PART_FIELDS if key in first}
    if eight_bit:
        mime = {key: _repair_8bit(value) for key, value in mime.items()}
    _walk_entity(walk, mime, body_start, len(buf), 0, 'text/plain')

    if eight_bit:   # now that the body's charset is known
        _defect(defects, f'8-bit header bytes that are not utf-8: read as {walk.charset or "cp1252"}')
        fields = [(name, _repair_8bit(value, walk.charset)) for name, value in fields]
        first = _first_values(fields)
    if buf.find(b'=?', start, body_start) < 0:   # no encoded words: the values are final
        headers = fields
    else:
        headers = [(name, _decode_words(value, defects) if '=?' in value else value)
                   for name, value in fields]
    return ParsedMessage(
        # The first Subject, decoded once already in `headers`.
        subject=_first_values(headers, ('subject',)).get('subject', ''),
        from_=_addresses(first.get('from')),
        to=_addresses(first.get('to')),
        cc=_addresses(first.get('cc')),
        reply_to=_addresses(first.get('reply-to')),
        date=_parse_date(first.get('date'), defects),
        message_id=_first_id(first.get('message-id')),
        in_reply_to=_first_id(first.get('in-reply-to')),
        references=_all_ids(first.get('references')),
        text=walk.text,
        html=walk.html,
        snippet=_snippet(walk.text, walk.html),
        attachments=walk.attachments,
        headers=headers,
        size=len(buf),
        defects=defects,
    )
