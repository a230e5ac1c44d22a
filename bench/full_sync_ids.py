"""force_full_sync of the 10,000-message benchmark INBOX: ids kept, and what a reader sees meanwhile.

Issue 14's target: force_full_sync keeps 100 % of message ids, and the folder's
count seen by a reader during it never drops. The seed emptied the folder and
fetched it again, giving every message a new id.

Builds the same INBOX as bench/sync_bench.py (bench/mailgen.py, written
straight into a private Dovecot's Maildir), then in a child process in
embedded mode (SQLite queue and database, 2 process workers):

1. the first full sync (the baseline: what fetching everything costs);
2. force_full_sync with nothing changed on the server, while a reader thread
   counts the INBOX's messages as GET /accounts/<id>/folders does, as fast as
   it can, on its own database connection;
3. a UIDVALIDITY change: with the consumer stopped, the INBOX's files are
   renamed to sort the other way round and Dovecot's uidlist and indexes are
   deleted, so it numbers the same messages again, in reverse, under a new
   UIDVALIDITY; then a plain sync, with the reader on.

For each phase: wall time (ledger enqueued_at -> finished_at), the task's
counts, the share of the first sync's ids still naming the same message
(same Message-ID and raw blob), and the reader's count: reads, min, max,
whether it ever dropped.

    ./run.sh bench full_sync_ids [--count 10000]
"""
import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import sync_bench  # noqa: E402  (the project root is not on sys.path for a plain script)
from mailkit import imap  # noqa: E402
from tests import services  # noqa: E402

TARGET_KEPT = 100.0   # % of ids kept by force_full_sync


# ---------------------------------------------------------------- child: emailsvc on the mailbox

class Reader(threading.Thread):
    """Counts the folder's messages, with the API's query, until stopped; keeps every count seen."""

    def __init__(self, models, tenant_id, folder_id):
        super().__init__(daemon=True)
        self.models, self.tenant_id, self.folder_id = models, tenant_id, folder_id
        self.counts, self.stop = [], threading.Event()

    def run(self):
        Message = self.models.EmailMessage
        with self.models.tenant_scope(self.tenant_id):
            query = Message.select().where(Message.folder == self.folder_id,
                                           Message.is_deleted == False)  # noqa: E712
            while not self.stop.is_set() and len(self.counts) < 10_000_000:
                self.counts.append(query.clone().count())
        self.models.database.close()

    def summary(self):
        drops = sum(1 for a, b in zip(self.counts, self.counts[1:]) if b < a)
        return {'reads': len(self.counts), 'min': min(self.counts), 'max': max(self.counts), 'drops': drops,
                'first': self.counts[0], 'last': self.counts[-1]}


def identities(models, tenant_id, client_id):
    """{our id: (UID, Message-ID, blob)} of the account's messages."""
    Message = models.EmailMessage
    with models.tenant_scope(tenant_id):
        return {i: (uid, mid, blob) for i, uid, mid, blob in Message.select(
            Message.id, Message.uid, Message.message_id, Message.blob)
            .where(Message.client == client_id).tuples()}


def kept(before, after):
    """% of the ids in `before` that still name the same message (same Message-ID and raw bytes)."""
    same = sum(1 for i, (_, mid, blob) in before.items() if i in after and after[i][1:] == (mid, blob))
    return same / len(before) * 100 if before else 100.0


def watched_sync(models, tasks, ids, folder_id, **options):
    """One sync with a reader counting the folder throughout; returns the timing, result and the reader's view."""
    reader = Reader(models, ids[0], folder_id)
    reader.start()
    while not reader.counts:
        time.sleep(0.001)
    try:
        run = timed(models, tasks, ids, **options)
    finally:
        reader.stop.set()
        reader.join(30)
    run['reader'] = reader.summary()
    return run


def timed(models, tasks, ids, **options):
    task_id = tasks.sync_emails(*ids, **options).id
    deadline = time.monotonic() + sync_bench.DEADLINE
    while (state := sync_bench.ledger_state(models, task_id)) != 'succeeded':
        if state in ('failed', 'dead', 'retrying', 'revoked') or time.monotonic() > deadline:
            row = sync_bench.ledger_row(models, task_id)
            raise RuntimeError(f'sync {task_id} {state}: {row.error}')
        time.sleep(0.005)
    row = sync_bench.ledger_row(models, task_id)
    return {'wall_s': (row.finished_at - row.enqueued_at).total_seconds(), 'result': row.result}


def renumber_on_the_server(maildir, port, user):
    """Delete Dovecot's uidlist and indexes of the INBOX: it numbers the files again, under a new UIDVALIDITY.
    The files are renamed first so that they sort the other way round: the same messages take other UIDs."""
    before = inbox_validity(port, user)
    files = sorted((maildir / 'cur').iterdir())
    for rank, path in enumerate(reversed(files)):
        _, colon, info = path.name.partition(':')   # keep the flags (":2,S")
        path.rename(path.with_name(f'{1_000_000_000 + rank}.renumbered{rank}.bench{colon}{info}'))
    for path in maildir.glob('dovecot*'):
        if path.is_file() and (path.name == 'dovecot-uidlist' or path.name.startswith('dovecot.index')):
            path.unlink()
    after = inbox_validity(port, user)   # this SELECT makes Dovecot index the files again
    if after == before:
        raise RuntimeError(f'UIDVALIDITY did not change ({before})')
    return before, after


def inbox_validity(port, user):
    with imap.ImapSession(services.HOST, port, 'none', user, sync_bench.PASSWORD) as session:
        return session.select('INBOX', readonly=True).uidvalidity


def run_child(args):
    import models
    import tasks
    models.migrate()
    workdir = pathlib.Path(os.environ['EMAILSVC_VAR'])
    ids = sync_bench.make_account(models, tasks, args.user, args.port)
    consumer, _ = sync_bench.start_consumer(models, workdir)
    try:
        first = timed(models, tasks, ids)
        with models.tenant_scope(ids[0]):
            inbox = models.EmailFolder.by_role(ids[2], 'inbox').id
        original = identities(models, ids[0], ids[2])
        forced = watched_sync(models, tasks, ids, inbox, force_full_sync=True)
        forced['kept_pct'] = kept(original, identities(models, ids[0], ids[2]))
    finally:
        sync_bench.stop_consumer(consumer)   # its workers' IMAP sessions close before the server renumbers
    validities = renumber_on_the_server(pathlib.Path(args.maildir), args.port, args.user)
    consumer, _ = sync_bench.start_consumer(models, workdir)
    try:
        renumbered = watched_sync(models, tasks, ids, inbox)
        after = identities(models, ids[0], ids[2])
        renumbered['kept_pct'] = kept(original, after)
        renumbered['uids_changed'] = sum(1 for i, (uid, _, _) in original.items() if i in after and after[i][0] != uid)
        renumbered['validities'] = validities
    finally:
        sync_bench.stop_consumer(consumer)
    print(json.dumps({'first': first, 'forced': forced, 'renumbered': renumbered, 'stored': len(original)}))


# ---------------------------------------------------------------- parent

def describe(name, run, first):
    result, reader = run['result'], run['reader']
    print(f'{name}: {run["wall_s"]:.1f} s ({run["wall_s"] / first["wall_s"]:.2f}x the first full sync); '
          f'synced {result["messages_synced"]}, updated {result["messages_updated"]}, '
          f'deleted {result["messages_deleted"]}; ids kept {run["kept_pct"]:.2f} %')
    print(f'    reader: {reader["reads"]:,} counts of INBOX during it, min {reader["min"]:,}, max {reader["max"]:,}, '
          f'first {reader["first"]:,}, last {reader["last"]:,}, drops {reader["drops"]}')


def report(out, count):
    first, forced, renumbered = out['first'], out['forced'], out['renumbered']
    print(f'\nPython {sys.version.split()[0]}, embedded mode (SQLite queue + database), 2 process workers, '
          f'sync batch {os.environ.get("EMAILSVC_MAIL_SYNC_BATCH", "500")}')
    print(f'first full sync of {count:,} messages (baseline; the seed\'s force_full_sync did this again, '
          f'under new ids): {first["wall_s"]:.1f} s, {first["result"]["messages_synced"]:,} stored')
    describe('force_full_sync, nothing changed', forced, first)
    old, new = renumbered['validities']
    describe(f'sync after a UIDVALIDITY change ({old} -> {new})', renumbered, first)
    print(f'    {renumbered["uids_changed"]:,} messages took a new UID and kept their id')
    targets = [
        (f'force_full_sync keeps {TARGET_KEPT:.0f} % of message ids', forced['kept_pct'] >= TARGET_KEPT),
        ('folder count seen by a reader never drops during force_full_sync',
         forced['reader']['drops'] == 0 and forced['reader']['min'] >= count),
        (f'a UIDVALIDITY change keeps {TARGET_KEPT:.0f} % of message ids', renumbered['kept_pct'] >= TARGET_KEPT),
        ('folder count seen by a reader never drops across a UIDVALIDITY change',
         renumbered['reader']['drops'] == 0 and renumbered['reader']['min'] >= count),
    ]
    for target, ok in targets:
        print(f'{target} {"met" if ok else "NOT MET"}')
    return all(ok for _, ok in targets)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--count', type=int, default=10_000, help='messages in the INBOX')
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--user', help=argparse.SUPPRESS)
    parser.add_argument('--port', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--maildir', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix='fsids-'))   # short: Dovecot's socket paths
    dovecot = None
    try:
        dovecot = services.start_dovecot(workdir)
        sync_bench.build_mailboxes(dovecot, [args.count])
        user = f'sync{args.count}'
        cmd = [sys.executable, __file__, '--child', '--user', user, '--port', str(dovecot.imap_port),
               '--maildir', str(dovecot.maildir(user))]
        done = subprocess.run(cmd, env=sync_bench.child_env(workdir, 'ids'), cwd=ROOT, text=True,
                              timeout=4 * sync_bench.DEADLINE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if done.returncode:
            raise SystemExit(f'child failed:\n{done.stderr[-3000:]}')
        ok = report(json.loads(done.stdout.strip().splitlines()[-1]), args.count)
    finally:
        if dovecot is not None:
            dovecot.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
