"""Deterministic, realistic mail for the sync benchmarks, written straight into a Dovecot Maildir.

`messages(count)` yields the same (raw, flags, date) for the same index on
every run and machine: message i depends only on SEED, i and the corpus
files (read-only, sorted), so the 1,000-message mailbox is the first 1,000
of the 10,000 one. What a mailbox holds:

- headers as mail servers and clients leave them: Return-Path, Delivered-To,
  2-5 Received, DKIM-Signature, Authentication-Results, From/To/Cc with
  accented, Cyrillic and CJK display names (RFC 2047 B and Q words), Subject
  (encoded when not ASCII), Date, Message-ID, In-Reply-To/References on
  replies, List-* on mailing-list mail;
- bodies: text/plain (7bit or quoted-printable UTF-8), multipart/alternative
  with an HTML part, replies with quoted text; sizes log-normal around a
  median of 9 KB;
- 4% multipart/mixed with one base64 attachment of 100 KB to 1 MB decoded
  (log-uniform; pdf, zip or jpg, random bytes);
- 8% ham from /work/shared/corpus/spam/dev/ham (SpamAssassin, 2002; under
  60 KB), each used once, with our MX's Delivered-To and Received on top.

Every line ends in CRLF, so the Maildir name carries S= and W= with the same
size and Dovecot need not read a file to know its RFC822.SIZE.
"""
import base64
import binascii
import datetime
import hashlib
import math
import os
import pathlib
import random

SEED = 20240917
CORPUS = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'corpus' / 'spam' / 'dev' / 'ham'
RECIPIENT = 'bench@example.org'
MEDIAN_SIZE = 9_400
SIGMA = 0.6
ATTACHMENT_SHARE = 0.04
CORPUS_SHARE = 0.08
CORPUS_MAX = 60_000
START = datetime.datetime(2023, 3, 1, 8, 0, tzinfo=datetime.timezone.utc)

FIRST = ('Anna', 'Jürgen', 'Zoë', 'Søren', 'François', 'Олег', 'Łukasz', 'José', 'Mei', 'Priya', 'Tom',
         'Sarah', 'Ahmed', 'Chloé', 'Ingrid', 'Mark', 'Laura', 'Kenji', 'Dmitri', 'Fatima', 'Björn', 'Elena',
         'Noah', 'Aoife', 'Mateo', 'Yuki', 'Grace', 'Omar', 'Hannah', 'Lars')
LAST = ('Müller', 'Schmidt', 'Nováková', 'Dubois', 'Иванов', 'García', 'Kowalski', 'Tanaka', 'Smith', 'Brown',
        'Johansson', 'Rossi', "O'Brien", 'Nguyen', 'Patel', 'Andersen', 'Lefèvre', 'Wang', 'Kim', 'Silva',
        '山田', 'Jensen', 'Fischer', 'Moreau', 'Costa')
DOMAINS = ('example.org', 'example.com', 'mail.example.net', 'corp.example', 'uni.example.edu',
           'shop.example', 'example.de', 'example.fr', 'example.co.uk', 'consulting.example')
LISTS = ('dev', 'announce', 'users', 'security', 'ops', 'design')
SUBJECTS = ('Quarterly report', 'Meeting notes', 'Re: budget for next year', 'Invoice', 'Your order has shipped',
            'Build failed on main', 'Lunch on Friday?', 'Draft proposal', 'Travel plans', 'Code review request',
            'Weekly newsletter', 'Password reset', 'Conference schedule', 'Server maintenance window',
            'Contract renewal', 'Photos from the trip', 'Release notes', 'Question about the API',
            'Welcome aboard', 'Minutes of the board meeting')
SUBJECTS_INTL = ('Grüße aus München', 'Réunion de lundi', 'Отчёт за квартал', '会議の議事録', 'Café à 10 h ?',
                 'Ångström-Messung fertig', 'Zażółć gęślą jaźń', 'Nächste Schritte ✓', 'Presupuesto año próximo')
WORDS = ('the', 'project', 'we', 'will', 'need', 'to', 'review', 'and', 'update', 'before', 'release', 'please',
         'let', 'me', 'know', 'if', 'you', 'have', 'any', 'questions', 'about', 'schedule', 'team', 'meeting',
         'customer', 'data', 'server', 'report', 'numbers', 'for', 'this', 'quarter', 'look', 'good', 'but',
         'there', 'are', 'still', 'some', 'open', 'issues', 'with', 'deployment', 'on', 'Friday', 'thanks',
         'again', 'for', 'your', 'help', 'attached', 'is', 'the', 'latest', 'version', 'of', 'document', 'which',
         'includes', 'changes', 'discussed', 'yesterday', 'budget', 'approval', 'should', 'arrive', 'next',
         'week', 'I', 'think', 'our', 'approach', 'works', 'well', 'enough', 'however', 'performance', 'tests',
         'show', 'a', 'regression', 'in', 'database', 'layer', 'that', 'needs', 'attention', 'soon')
WORDS_INTL = ('Grüße', 'natürlich', 'Straße', 'déjà', 'réunion', 'élève', 'привет', 'спасибо', 'отчёт',
              'こんにちは', 'ありがとう', 'año', 'mañana', 'Zürich', 'København', 'Łódź', 'naïve', 'café')
ATTACHMENTS = (('application/pdf', 'report-{n}.pdf', b'%PDF-1.4\n'), ('application/zip', 'archive-{n}.zip', b'PK\x03\x04'),
               ('image/jpeg', 'IMG_{n}.jpg', b'\xff\xd8\xff\xe0\x00\x10JFIF'))


# ---------------------------------------------------------------- pools built once per run (seeded)

def _sentence(rng, intl):
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
    if intl:
        for _ in range(rng.randint(1, 3)):
            words[rng.randrange(len(words))] = rng.choice(WORDS_INTL)
    return words[0].capitalize() + ' ' + ' '.join(words[1:]) + rng.choice('...?!')[0]


def _wrap(text, width=72):
    lines, start = [], 0
    while len(text) - start > width:
        cut = text.rfind(' ', start, start + width)
        if cut <= start:
            cut = start + width
        lines.append(text[start:cut])
        start = cut + 1
    lines.append(text[start:])
    return lines


class Pools:
    def __init__(self, rng):
        self.ascii = [_wrap(' '.join(_sentence(rng, False) for _ in range(rng.randint(2, 7)))) for _ in range(3000)]
        self.intl = [_wrap(' '.join(_sentence(rng, rng.random() < 0.5) for _ in range(rng.randint(2, 7))))
                     for _ in range(1000)]
        ham = sorted(p for p in CORPUS.glob('*.eml') if p.stat().st_size <= CORPUS_MAX) if CORPUS.is_dir() else []
        rng.shuffle(ham)
        self.ham = ham
        self.ham_used = 0


# ---------------------------------------------------------------- headers

def _encoded_words(text):
    """RFC 2047 B words of at most 45 UTF-8 bytes each, never splitting a character."""
    words, chunk = [], ''
    for char in text:
        if len((chunk + char).encode()) > 45:
            words.append(chunk)
            chunk = ''
        chunk += char
    words.append(chunk)
    return '\r\n '.join(f'=?UTF-8?B?{base64.b64encode(w.encode()).decode()}?=' for w in words)


def _q_word(text):
    encoded = ''.join(c if c.isalnum() and c.isascii() else '_' if c == ' ' else
                      ''.join(f'={b:02X}' for b in c.encode()) for c in text)
    return f'=?utf-8?Q?{encoded}?='


def _display(name, rng):
    if name.isascii():
        return f'"{name}"' if "'" in name or '.' in name else name
    return _q_word(name) if rng.random() < 0.5 else _encoded_words(name)


def _person(rng):
    first, last = rng.choice(FIRST), rng.choice(LAST)
    local = (first[0] + '.' + last).lower().encode('ascii', 'ignore').decode() or 'user'
    local = ''.join(c for c in local if c.isalnum() or c == '.') or 'user'
    return f'{first} {last}', f'{local}{rng.randrange(100)}@{rng.choice(DOMAINS)}'


def _mailbox(rng, person=None):
    name, addr = person or _person(rng)
    return f'{_display(name, rng)} <{addr}>'


def message_id(i):
    digest = hashlib.sha1(f'{SEED}:{i}'.encode()).hexdigest()[:20]
    return f'<{digest}.{i}@{DOMAINS[i % len(DOMAINS)]}>'


def _date_text(when, rng):
    zone = datetime.timezone(datetime.timedelta(minutes=rng.choice((0, 60, 120, -300, -420, 330, 540))))
    local = when.astimezone(zone)
    return local.strftime('%a, %d %b %Y %H:%M:%S ') + local.strftime('%z')


def _b64_lines(data):
    return base64.encodebytes(data).replace(b'\n', b'\r\n')


def _received(rng, when, by, i):
    ip = f'192.0.2.{rng.randrange(1, 255)}'
    host = f'mx{rng.randrange(1, 9)}.{rng.choice(DOMAINS)}'
    ident = hashlib.md5(f'{i}:{by}:{rng.random()}'.encode()).hexdigest()[:12].upper()
    return (f'Received: from {host} ({host} [{ip}])\r\n\tby {by} (Postfix) with ESMTPS id {ident}\r\n'
            f'\tfor <{RECIPIENT}>; {_date_text(when, rng)}\r\n')


def _headers(i, rng, when, sender, subject, reply, mailing_list):
    out = [f'Return-Path: <{sender[1]}>\r\n', f'Delivered-To: {RECIPIENT}\r\n']
    for hop in range(rng.randint(2, 5)):
        out.append(_received(rng, when - datetime.timedelta(seconds=hop * 3), f'mail{hop}.example.org', i))
    domain = sender[1].split('@')[1]
    signature = base64.b64encode(rng.randbytes(256)).decode()
    out.append(f'DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d={domain};\r\n'
               f'\ts=sel{rng.randrange(1, 4)}; t={int(when.timestamp())};\r\n'
               f'\th=from:to:cc:subject:date:message-id:mime-version:content-type;\r\n'
               f'\tbh={base64.b64encode(rng.randbytes(32)).decode()};\r\n'
               + ''.join(f'\t{"b=" if k == 0 else ""}{signature[k:k + 70]}\r\n' for k in range(0, len(signature), 70)))
    out.append(f'Authentication-Results: mail0.example.org;\r\n\tdkim=pass header.d={domain};\r\n'
               f'\tspf=pass smtp.mailfrom={sender[1]};\r\n\tdmarc=pass header.from={domain}\r\n')
    out.append(f'From: {_mailbox(rng, sender)}\r\n')
    to = [_mailbox(rng, ('Bench User', RECIPIENT))] + [_mailbox(rng) for _ in range(rng.choice((0, 0, 1, 2)))]
    out.append('To: ' + ',\r\n '.join(to) + '\r\n')
    if rng.random() < 0.3:
        out.append('Cc: ' + ',\r\n '.join(_mailbox(rng) for _ in range(rng.randint(1, 4))) + '\r\n')
    out.append(f'Subject: {subject if subject.isascii() else _encoded_words(subject)}\r\n')
    out.append(f'Date: {_date_text(when, rng)}\r\n')
    out.append(f'Message-ID: {message_id(i)}\r\n')
    if reply:
        refs = sorted({rng.randrange(i) for _ in range(rng.randint(1, 8))})
        out.append(f'In-Reply-To: {message_id(refs[-1])}\r\n')
        out.append('References: ' + '\r\n '.join(message_id(r) for r in refs) + '\r\n')
    if mailing_list:
        name = rng.choice(LISTS)
        out.append(f'List-Id: {name.capitalize()} discussion <{name}.lists.example.org>\r\n'
                   f'List-Unsubscribe: <mailto:{name}-unsubscribe@lists.example.org>,\r\n'
                   f' <https://lists.example.org/unsubscribe/{name}?u={rng.randrange(10**9)}>\r\n'
                   f'List-Post: <mailto:{name}@lists.example.org>\r\nPrecedence: list\r\n')
    out.append(rng.choice(('User-Agent: Mozilla Thunderbird\r\n', 'X-Mailer: Microsoft Outlook 16.0\r\n',
                           'X-Mailer: Apple Mail (2.3774)\r\n', '')))
    out.append('MIME-Version: 1.0\r\n')
    return ''.join(out).encode()


# ---------------------------------------------------------------- bodies

def _text_lines(rng, pools, budget, intl):
    pool = pools.intl if intl else pools.ascii
    lines, size = [], 0
    while size < budget:
        paragraph = rng.choice(pool)
        lines.extend(paragraph)
        lines.append('')
        size += sum(len(line) + 2 for line in paragraph) + 2
    return lines


def _text_part(lines, quoted=None, name='Bench'):
    body = lines + ['-- ', name]
    if quoted:
        body += ['', 'On an earlier date someone wrote:'] + ['> ' + line for line in quoted]
    text = '\n'.join(body) + '\n'
    if text.isascii():
        return b'Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n', \
            text.replace('\n', '\r\n').encode()
    qp = binascii.b2a_qp(text.encode(), istext=True).replace(b'\n', b'\r\n')
    return (b'Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n', qp)


def _html_part(rng, lines):
    paragraphs, current = [], []
    for line in lines:
        if line:
            current.append(line)
        elif current:
            paragraphs.append(' '.join(current))
            current = []
    blocks = []
    for k, paragraph in enumerate(paragraphs):
        escaped = paragraph.replace('&', '&amp;').replace('<', '&lt;')
        if k % 3 == 1:
            escaped += f' <a href="https://www.example.com/r/{rng.randrange(10**8)}?utm_source=mail">details</a>'
        blocks.append(f'<p style="margin:0 0 12px 0;font-family:Arial,Helvetica,sans-serif;font-size:14px;'
                      f'line-height:20px;color:#333333">{escaped}</p>')
    html = ('<!DOCTYPE html>\n<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
            '<style>body{margin:0;padding:0}table{border-collapse:collapse}</style></head>\n<body>\n'
            '<table role="presentation" width="100%" cellpadding="0" cellspacing="0"><tr><td align="center">\n'
            '<table width="600" cellpadding="0" cellspacing="0"><tr><td style="padding:24px">\n'
            + '\n'.join(blocks) + '\n</td></tr></table>\n</td></tr></table>\n</body></html>\n')
    qp = binascii.b2a_qp(html.encode(), istext=True).replace(b'\n', b'\r\n')
    return b'Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n', qp


def _multipart(subtype, boundary, parts):
    out = [f'Content-Type: multipart/{subtype};\r\n\tboundary="{boundary}"\r\n\r\n'.encode(),
           b'This is a multi-part message in MIME format.\r\n']
    for head, body in parts:
        out += [f'\r\n--{boundary}\r\n'.encode(), head, body]
    out.append(f'\r\n--{boundary}--\r\n'.encode())
    return b''.join(out)


def _from_corpus(i, rng, pools, when):
    path = pools.ham[pools.ham_used]
    pools.ham_used += 1
    data = path.read_bytes()
    if data.startswith(b'From '):   # an mbox separator, not a header
        data = data[data.find(b'\n') + 1:]
    data = data.replace(b'\r\n', b'\n').replace(b'\r', b'\n').replace(b'\n', b'\r\n')
    top = (f'Delivered-To: {RECIPIENT}\r\n'.encode() + _received(rng, when, 'mail0.example.org', i).encode())
    return top + data


def message(i, rng, pools):
    """The i-th message: (raw bytes, maildir flags, date)."""
    when = START + datetime.timedelta(minutes=i * 5 + rng.randrange(5))
    flags = ''.join(sorted(('F' if rng.random() < 0.05 else '') + ('R' if rng.random() < 0.15 else '')
                           + ('S' if rng.random() < 0.75 else '')))
    kind = rng.random()
    if kind < CORPUS_SHARE and pools.ham_used < len(pools.ham):
        return _from_corpus(i, rng, pools, when), flags, when
    with_attachment = rng.random() < ATTACHMENT_SHARE / (1 - CORPUS_SHARE)
    target = min(max(int(rng.lognormvariate(math.log(MEDIAN_SIZE), SIGMA)), 1500), 150_000)
    intl = rng.random() < 0.3
    reply = rng.random() < 0.35 and i > 0
    mailing_list = rng.random() < 0.2
    subject = rng.choice(SUBJECTS_INTL if intl and rng.random() < 0.6 else SUBJECTS)
    if reply and not subject.startswith('Re:'):
        subject = 'Re: ' + subject
    sender = _person(rng)
    head = _headers(i, rng, when, sender, subject, reply, mailing_list)
    budget = max(target - len(head), 300)
    alternative = rng.random() < 0.55
    text_budget = budget * (0.3 if alternative else 1.0)
    if reply:
        text_budget /= 2
    lines = _text_lines(rng, pools, text_budget, intl)
    quoted = _text_lines(rng, pools, text_budget, intl) if reply else None
    text = _text_part(lines, quoted, sender[0])
    body = _multipart('alternative', f'=_alt_{i:06d}_{rng.randrange(10**9)}', [text, _html_part(rng, lines)]) \
        if alternative else b''.join(text)
    if with_attachment:
        content_type, pattern, magic = rng.choice(ATTACHMENTS)
        size = int(math.exp(rng.uniform(math.log(100_000), math.log(1_000_000))))
        data = magic + rng.randbytes(size - len(magic))
        name = pattern.format(n=rng.randrange(1000, 9999))
        attachment = (f'Content-Type: {content_type}; name="{name}"\r\nContent-Transfer-Encoding: base64\r\n'
                      f'Content-Disposition: attachment; filename="{name}"\r\n\r\n').encode(), _b64_lines(data)
        if alternative:   # the multipart/alternative as one part: its head, then its body
            split = body.index(b'\r\n\r\n') + 4
            inner = (body[:split], body[split:])
        else:
            inner = text
        return head + _multipart('mixed', f'=_mix_{i:06d}_{rng.randrange(10**9)}', [inner, attachment]), flags, when
    return head + body, flags, when


def messages(count):
    """(raw, flags, date) of messages 0..count-1, the same on every run."""
    pools = Pools(random.Random(SEED))
    for i in range(count):
        yield message(i, random.Random(SEED * 1_000_003 + i), pools)


# ---------------------------------------------------------------- Maildir

def maildir_name(i, raw, flags):
    # S= is the file's size, W= its size with CRLF line ends (RFC822.SIZE): equal here.
    return f'{1_680_000_000 + i}.M{i}P1.syncbench,S={len(raw)},W={len(raw)}:2,{flags}'


def write_maildirs(targets, count, uid, gid):
    """Write messages 0..count-1 into each Maildir `cur` in targets {cur_path: how many}; returns stats."""
    sizes = []
    for i, (raw, flags, when) in enumerate(messages(count)):
        if raw.count(b'\n') != raw.count(b'\r\n'):
            raise AssertionError(f'message {i} has a bare LF: W= would be wrong')
        sizes.append(len(raw))
        name = maildir_name(i, raw, flags)
        stamp = when.timestamp()
        for cur, limit in targets.items():
            if i < limit:
                path = cur / name
                path.write_bytes(raw)
                os.chown(path, uid, gid)
                os.utime(path, (stamp, stamp))   # INTERNALDATE: the delivery time
    return sizes
