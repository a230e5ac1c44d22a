"""imap.ImapSession.fetch against bare imaplib UID FETCH, on a private Dovecot.

Starts Dovecot (tests/services.py) in a temporary directory, delivers N
messages of about 9 KB (2 to 16 KB, CRLF) straight into the user's Maildir
(10,000 APPENDs would take longer than everything measured here; Dovecot
indexes the files on the first SELECT, which the warm-up pass pays), then
times, best of several interleaved passes over loopback:

- imaplib: UID FETCH of the same items in the same batches of 500, the
  responses left as imaplib stores them (the baseline: the wire and
  imaplib's reader, no parsing);
- fetch: ImapSession.fetch over every UID, yielding FetchedMessage with
  flags, size, INTERNALDATE, MODSEQ and the raw bytes;
- parse only: imap.parse_fetch over stored imaplib responses, the cost our
  layer adds.

    .venv/bin/python bench/imap_fetch_bench.py [N]
"""
import os
import pathlib
import random
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mailkit import imap  # noqa: E402  (the project root is not on sys.path for a plain script)
from tests import services  # noqa: E402

USER, PASSWORD = 'bench', 'bench-password'
BATCH = 500
PASSES = 5
TARGET = 1.0   # seconds for 10,000 messages of about 9 KB, parsed, on loopback


def message(i: int, rng: random.Random, lines: list[str]) -> bytes:
    """A plain-text message of 2 to 16 KB whose body is a random run of the prepared lines."""
    count = rng.randint(2_000, 16_000) // 80
    first = rng.randrange(len(lines) - count)
    head = (f'From: Sender {i} <s{i}@example.org>\r\nTo: bench@example.org\r\n'
            f'Subject: message {i}\r\nMessage-ID: <{i}@bench.example.org>\r\n'
            f'Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n')
    return (head + '\r\n'.join(lines[first:first + count]) + '\r\n').encode()


def text_lines(rng: random.Random, count: int = 1000) -> list[str]:
    words = ('alpha', 'bravo', 'charlie', 'delta', 'echo', 'foxtrot', 'golf', 'hotel', 'india', 'juliet')
    return [' '.join(rng.choice(words) for _ in range(13)) for _ in range(count)]


def deliver(dovecot, count: int) -> int:
    """Write count messages into the user's Maildir/cur as Dovecot's mail user; returns total bytes."""
    with imap.ImapSession(dovecot.host, dovecot.imap_port, 'none', USER, PASSWORD) as session:
        session.select('INBOX')   # makes Dovecot create the Maildir
    cur = dovecot.maildir(USER) / 'cur'
    uid, gid = dovecot.mail_user.pw_uid, dovecot.mail_user.pw_gid
    rng = random.Random(7)
    lines = text_lines(rng)
    total = 0
    stamp = int(time.time())
    for i in range(count):
        raw = message(i, rng, lines)
        total += len(raw)
        path = cur / f'{stamp}.M{i}P{os.getpid()}.bench,S={len(raw)}:2,{"S" if i % 3 else ""}'
        path.write_bytes(raw)
        os.chown(path, uid, gid)
    return total


def time_imaplib(session: imap.ImapSession, uids: list[int]) -> tuple[float, list]:
    """Bare imaplib: the same commands, responses kept as imaplib leaves them."""
    conn = session.conn
    items = '(UID FLAGS RFC822.SIZE INTERNALDATE BODY.PEEK[] MODSEQ)'
    start = time.perf_counter()
    responses = []
    for i in range(0, len(uids), BATCH):
        _, data = conn.uid('FETCH', imap.uid_set(uids[i:i + BATCH]), items)
        responses.append(data)
    return time.perf_counter() - start, responses


def time_fetch(session: imap.ImapSession, uids: list[int]) -> tuple[float, int, int]:
    start = time.perf_counter()
    count = size = 0
    for fetched in session.fetch(uids, batch=BATCH):
        count += 1
        size += len(fetched.raw)
    return time.perf_counter() - start, count, size


def time_parse(responses: list) -> float:
    start = time.perf_counter()
    for data in responses:
        for _ in imap.parse_fetch(data):
            pass
    return time.perf_counter() - start


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    with tempfile.TemporaryDirectory(prefix='imapbench') as workdir:   # short: Dovecot's socket paths
        dovecot = services.start_dovecot(pathlib.Path(workdir))
        try:
            dovecot.add_user(USER, PASSWORD)
            start = time.perf_counter()
            total = deliver(dovecot, count)
            print(f'delivered {count:,} messages, {total / 1e6:.1f} MB '
                  f'(mean {total / count / 1e3:.1f} KB) in {time.perf_counter() - start:.1f} s')
            with imap.ImapSession(dovecot.host, dovecot.imap_port, 'none', USER, PASSWORD) as session:
                start = time.perf_counter()
                state = session.select('INBOX')
                uids = session.uids()
                print(f'first SELECT (Dovecot indexes the new files) + UID SEARCH: '
                      f'{time.perf_counter() - start:.2f} s, {state.exists:,} messages')
                assert len(uids) == count, (len(uids), count)
                time_fetch(session, uids)   # warm-up: Dovecot caches, page cache
                raw_best = fetch_best = parse_best = float('inf')
                for _ in range(PASSES):
                    raw_time, responses = time_imaplib(session, uids)
                    fetch_time, fetched, size = time_fetch(session, uids)
                    parse_time = time_parse(responses)
                    del responses
                    assert fetched == count and size == total, (fetched, size)
                    raw_best, fetch_best = min(raw_best, raw_time), min(fetch_best, fetch_time)
                    parse_best = min(parse_best, parse_time)
        finally:
            dovecot.stop()
    print(f'Python {sys.version.split()[0]}, batches of {BATCH}, best of {PASSES} passes')
    print(f'  imaplib UID FETCH (no parsing) {raw_best:6.3f} s  {count / raw_best:8.0f} msg/s')
    print(f'  ImapSession.fetch              {fetch_best:6.3f} s  {count / fetch_best:8.0f} msg/s  '
          f'({fetch_best / raw_best:.2f}x the time of bare imaplib)')
    print(f'  parse_fetch alone              {parse_best:6.3f} s  '
          f'({parse_best / count * 1e6:.1f} us/msg, {parse_best / raw_best * 100:.0f}% of the raw fetch)')
    limit = TARGET * count / 10_000
    verdict = 'met' if fetch_best < limit else 'NOT MET'
    print(f'target: fetch {count:,} messages in under {limit:.2f} s: {fetch_best:.3f} s, {verdict}')
    return 0 if fetch_best < limit else 1


if __name__ == '__main__':
    sys.exit(main())
