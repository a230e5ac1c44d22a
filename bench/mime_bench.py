"""mime.parse against the stdlib email package, on the shared corpora.

Loads every message of shared/corpus/spam/dev (3,628) and shared/corpus/mime
(426) into memory and parses each one with:

- mime.parse;
- stdlib policy.default, the baseline: BytesParser(policy=email.policy.default)
  .parsebytes(raw), then walk() and get_content() on every text part (errors
  caught: the mime corpus has unknown charsets and transfer encodings);
- stdlib compat32 for context: the same walk with get_payload(decode=True),
  subject through email.header.make_header, From/To through getaddresses.
  This is the "lazy compat32 + decode headers ourselves" strategy before any
  of our own field work, so it bounds what that strategy could reach.

Each message is timed on its own and keeps its best time over the passes, so
one figure per subset (all, 1,000 largest, 1,000 smallest) comes from the
same run. spam/dev is also timed with CRLF line endings, which is how IMAP
delivers every message.

    .venv/bin/python bench/mime_bench.py
"""
import email.header
import email.parser
import email.policy
import email.utils
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mailkit import mime  # noqa: E402  (the project root is not on sys.path for a plain script)

CORPUS = ROOT.parent / 'shared' / 'corpus'
TARGET = 8.0          # mime.parse must be at least this much faster than policy.default on spam/dev


def stdlib_default(raw: bytes) -> None:
    try:
        msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(raw)
        str(msg['subject'] or '')
        for part in msg.walk():
            if part.get_content_maintype() == 'text':
                part.get_content()
    except Exception as exc:   # unknown charsets and encodings (LookupError, KeyError): counted, not fatal
        stdlib_default.errors.append(type(exc).__name__)


stdlib_default.errors = []


def stdlib_compat32(raw: bytes) -> None:
    try:
        msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw)
        str(email.header.make_header(email.header.decode_header(msg.get('subject', ''))))
        email.utils.getaddresses(msg.get_all('from', []) + msg.get_all('to', []))
        for part in msg.walk():
            part.get_payload(decode=True)
    except Exception as exc:   # bad charsets in encoded words (LookupError): counted, not fatal
        stdlib_compat32.errors.append(type(exc).__name__)


stdlib_compat32.errors = []


def best_times(parse, messages: list[bytes], passes: int) -> list[float]:
    """Per-message best wall time over `passes` runs (the first run also warms caches)."""
    best = [float('inf')] * len(messages)
    clock = time.perf_counter
    for _ in range(passes):
        gc.collect()
        for i, raw in enumerate(messages):
            start = clock()
            parse(raw)
            elapsed = clock() - start
            if elapsed < best[i]:
                best[i] = elapsed
    return best


def line(name: str, seconds: float, count: int, baseline: float | None) -> str:
    ratio = f'  ({baseline / seconds:.1f}x stdlib policy.default)' if baseline else ''
    return f'  {name:24s} {count / seconds:7.0f} msg/s  {seconds / count * 1000:6.3f} ms/msg{ratio}'


def report(title: str, indexes: list[int], times: dict[str, list[float]], sizes: list[int]) -> float:
    total_bytes = sum(sizes[i] for i in indexes)
    print(f'{title}: {len(indexes)} messages, {total_bytes / 1e6:.1f} MB, '
          f'median {sorted(sizes[i] for i in indexes)[len(indexes) // 2]:,} B')
    totals = {name: sum(t[i] for i in indexes) for name, t in times.items()}
    baseline = totals['stdlib policy.default']
    for name, seconds in totals.items():
        print(line(name, seconds, len(indexes), None if name.startswith('stdlib policy') else baseline))
    return baseline / totals['mime.parse']


def main() -> int:
    if not CORPUS.is_dir():
        print(f'corpus not found at {CORPUS}: check out shared/ next to the project')
        return 1
    dev = [p.read_bytes() for p in sorted((CORPUS / 'spam' / 'dev').glob('*/*.eml'))]
    tricky = [p.read_bytes() for p in sorted((CORPUS / 'mime').rglob('*.eml'))]
    crlf = [raw.replace(b'\r\n', b'\n').replace(b'\n', b'\r\n') for raw in dev]
    messages = dev + tricky + crlf
    sizes = [len(raw) for raw in messages]
    print(f'Python {sys.version.split()[0]}; per-message best of passes (mime.parse 5, stdlib 2)\n')

    times = {
        'mime.parse': best_times(mime.parse, messages, 5),
        'stdlib policy.default': best_times(stdlib_default, messages, 2),
        'stdlib compat32': best_times(stdlib_compat32, messages, 2),
    }
    n_dev, n_tricky = len(dev), len(tricky)
    dev_ix = list(range(n_dev))
    tricky_ix = list(range(n_dev, n_dev + n_tricky))
    crlf_ix = list(range(n_dev + n_tricky, len(messages)))
    lf_ix = dev_ix + tricky_ix
    by_size = sorted(lf_ix, key=sizes.__getitem__)

    dev_ratio = report('spam/dev', dev_ix, times, sizes)
    report('spam/dev with CRLF line endings (as IMAP sends)', crlf_ix, times, sizes)
    report('mime (tricky and malformed)', tricky_ix, times, sizes)
    report('both corpora', lf_ix, times, sizes)
    report('1,000 largest of both', by_size[-1000:], times, sizes)
    report('1,000 smallest of both', by_size[:1000], times, sizes)
    print(f'\nstdlib errors caught: policy.default {len(stdlib_default.errors) // 2} per pass, '
          f'compat32 {len(stdlib_compat32.errors) // 2} per pass')
    verdict = 'met' if dev_ratio >= TARGET else 'NOT MET'
    print(f'target: mime.parse >= {TARGET:.0f}x stdlib policy.default on spam/dev: {dev_ratio:.1f}x, {verdict}')
    return 0 if dev_ratio >= TARGET else 1


if __name__ == '__main__':
    sys.exit(main())
