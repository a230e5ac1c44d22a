"""sync_emails against mbsync: a full sync and a no-change resync of the same Dovecot INBOX.

Starts a private Dovecot (tests/services.py) in a temporary directory and
builds, once per run and the same on every run, one INBOX per size in its own
Dovecot user (bench/mailgen.py: realistic mail, median ~9 KB, 4% with a
100 KB-1 MB attachment, ~320 MB for 10,000), written straight into the
Maildir. One plain login + SELECT per user lets Dovecot index the files
before either tool runs, so neither is charged for it. Then, per size:

- emailsvc, embedded mode (SQLite queue and database, fresh per size): a child
  process with its own EMAILSVC_* environment creates a tenant, user and IMAP
  account (password in a Credential row, encrypted by the vault), starts
  `huey_consumer tasks.huey -w 2 -k process`, enqueues
  `tasks.sync_emails(client_id, tenant_id, user_id)` and takes the time from
  the ledger: enqueued_at to finished_at of the succeeded record. The worker's
  own `sync_duration_seconds` is shown beside it. Peak RSS of the worker that
  ran the sync: VmRSS of each worker sampled every 20 ms, and VmHWM read
  before the worker exits; the larger is reported. Then the no-change resync
  (nothing changed on the server), best of --resyncs runs, timed the same way.
- mbsync (Debian isync; its defaults, so FSync on), same server, same user:
  full sync into a fresh Maildir (`mbsync -c rc -a`), then no-change resyncs,
  best of --resyncs. Checked: exit status 0 and a message file per message.
  A second full sync with `FSync no` is shown for information.

Before each timed phase every dirty page is written back (os.sync), so one
tool's writeback does not slow the other's fsyncs. Beside our resync, the
same IMAP commands run alone (mailkit.imap, no queue, no database): what
the server and the wire cost.

The account is created with sync_enabled off, so the consumer's periodic_sync
(every 5 minutes) cannot queue a second sync of it while the bench runs.
STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY HIGHESTMODSEQ) is compared before
and after each tool: both must see the same, unchanged mailbox.

MB is 10^6 bytes, for mail and for RSS alike.

    ./run.sh bench sync_bench [--sizes 1000,10000] [--resyncs 5] [--profile]

--profile instead runs the full sync of the largest size in-process, under
cProfile (the task's function itself, inside its tenant scope, with a ledger
row for its progress reports), then a no-change resync, and prints where the
time goes.
"""
import argparse
import cProfile
import io
import json
import os
import pathlib
import pstats
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import mailgen  # noqa: E402  (the project root is not on sys.path for a plain script)
from mailkit import imap  # noqa: E402
from tests import services  # noqa: E402

PASSWORD = 'sync-bench-pw'
MBSYNC = '/usr/bin/mbsync'
DEADLINE = 600           # seconds any one wait may take
RSS_INTERVAL = 0.02      # seconds between RSS samples during the full sync
TARGET_FULL = 1.0        # x mbsync's wall time, full sync of 10,000
TARGET_RESYNC = 0.5      # x mbsync's no-change resync
TARGET_FLAT = 1.25       # resync at 10,000 within this factor of the one at 1,000
TARGET_RSS_MB = 200


def mb(n_bytes):
    return n_bytes / 1e6


# ---------------------------------------------------------------- /proc, disk

def cpu_seconds():
    """(CPU-seconds the whole machine has been busy, CPU-seconds of this process and its reaped children)."""
    with open('/proc/stat') as stat:
        ticks = [int(value) for value in stat.readline().split()[1:9]]   # user .. steal
    own = os.times()
    return ((sum(ticks) - ticks[3] - ticks[4]) / os.sysconf('SC_CLK_TCK'),   # minus idle and iowait
            own.user + own.system + own.children_user + own.children_system)


def settle():
    """Write back every dirty page first: one tool's 650 MB of writeback must not slow the
    next one's fsyncs (mbsync fsyncs each message; SQLite each WAL checkpoint). Measured
    without this, mbsync's full sync of 10,000 took anything from 5.5 s to 11.9 s."""
    os.sync()


def proc_kb(pid, field):
    """VmRSS, VmHWM, ... of pid in kB; 0 once it has gone."""
    try:
        with open(f'/proc/{pid}/status') as status:
            for line in status:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


# ---------------------------------------------------------------- child: emailsvc on one mailbox

def make_account(models, tasks, user, port):
    """A tenant, a user and the IMAP account of Dovecot user `user`; returns (tenant, user, client) ids."""
    tenant = models.Tenant.create(name=f'bench-{user}')
    with models.tenant_scope(tenant.id):
        owner = models.User.create(name='bench')
        client = models.EmailClient.create(
            user_id=owner.id, email=f'{user}@example.org', incoming_protocol='imap',
            incoming_host=services.HOST, incoming_port=port, incoming_security='none',
            incoming_username=user, sync_enabled=False)   # keeps periodic_sync away from it
        models.Credential.store(client, 'incoming', PASSWORD)
    return tenant.id, owner.id, client.id


def ledger_row(models, task_id):
    with models.all_tenants():
        return models.TaskRecord.get_by_id(task_id)


def ledger_state(models, task_id):
    row = models.database.execute_sql('SELECT state FROM task_record WHERE id = ?', (task_id,)).fetchone()
    return row[0] if row else None


def timed_sync(models, tasks, ids, worker_pids=(), interval=0.001):
    """Enqueue one sync and wait for the ledger to say succeeded; RSS of worker_pids sampled meanwhile."""
    peaks = dict.fromkeys(worker_pids, 0)
    task_id = tasks.sync_emails(*ids).id
    deadline = time.monotonic() + DEADLINE
    while True:
        for pid in peaks:
            peaks[pid] = max(peaks[pid], proc_kb(pid, 'VmRSS'))
        state = ledger_state(models, task_id)
        if state == 'succeeded':
            break
        if state in ('failed', 'dead', 'retrying', 'revoked'):
            row = ledger_row(models, task_id)
            raise RuntimeError(f'sync {state}: {row.error}\n{row.traceback}')
        if time.monotonic() > deadline:
            raise RuntimeError(f'sync {task_id} not done after {DEADLINE} s (state {state})')
        time.sleep(interval)
    row = ledger_row(models, task_id)
    worker = int(row.worker.split(":")[1])
    return {'wall_s': (row.finished_at - row.enqueued_at).total_seconds(), 'result': row.result,
            'worker': worker, 'rss_sampled_kb': peaks.get(worker, 0), 'hwm_kb': proc_kb(worker, 'VmHWM')}


def start_consumer(models, workdir):
    log = open(workdir / 'consumer.log', 'ab')
    consumer = subprocess.Popen([sys.executable, '-m', 'huey.bin.huey_consumer', 'tasks.huey', '-w', '2',
                                 '-k', 'process', '-q'], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        pids = [hb.pid for hb in models.ConsumerHeartbeat.select()
                .where(models.ConsumerHeartbeat.consumer_pid == consumer.pid)]
        if len(pids) == 2:
            return consumer, pids
        if consumer.poll() is not None or time.monotonic() > deadline:
            stop_consumer(consumer)
            raise RuntimeError(f'consumer did not start; see {workdir / "consumer.log"}')
        time.sleep(0.02)


def stop_consumer(consumer):
    if consumer.poll() is None:
        consumer.send_signal(signal.SIGINT)   # lets the workers finish and remove their heartbeats
        try:
            consumer.wait(30)
        except subprocess.TimeoutExpired:
            consumer.kill()
            consumer.wait(10)


def stored_counts(models, ids):
    import peewee
    tenant_id, _, client_id = ids
    with models.tenant_scope(tenant_id):
        messages = models.EmailMessage.select().where(models.EmailMessage.client == client_id)
        return {'messages': messages.count(),
                'bytes': messages.select(peewee.fn.SUM(models.EmailMessage.size)).scalar() or 0,
                'parse_errors': messages.where(models.EmailMessage.parse_error.is_null(False)).count(),
                'attachments': models.Attachment.select().join(models.EmailMessage)
                .where(models.EmailMessage.client == client_id).count()}


def run_child_sync(args):
    import models
    import tasks
    models.migrate()
    workdir = pathlib.Path(os.environ['EMAILSVC_VAR'])
    ids = make_account(models, tasks, args.user, args.port)
    consumer, workers = start_consumer(models, workdir)
    try:
        idle_rss = {pid: proc_kb(pid, 'VmRSS') for pid in workers}
        settle()
        full = timed_sync(models, tasks, ids, workers, interval=RSS_INTERVAL)
        full['idle_rss_kb'] = idle_rss[full['worker']]
        stored = stored_counts(models, ids)
        settle()
        resyncs = [timed_sync(models, tasks, ids) for _ in range(args.resyncs)]
        full['rss_after_kb'] = proc_kb(full['worker'], 'VmRSS')
    finally:
        stop_consumer(consumer)
    db_file = pathlib.Path(tasks.SETTINGS['database.url'].split('///', 1)[1])
    db_bytes = sum(p.stat().st_size for p in db_file.parent.glob(db_file.name + '*'))
    print(json.dumps({'full': full, 'stored': stored, 'resyncs': resyncs, 'db_bytes': db_bytes}))


# ---------------------------------------------------------------- child: --profile

CATEGORIES = (   # (label, test on the profiled function's file name), first match wins
    ('MIME parse (mailkit/mime.py)', lambda f: f.endswith(('mailkit/mime.py', '/html/__init__.py'))
     or '/email/' in f),
    ('IMAP fetch (imaplib, socket, mailkit/imap.py)', lambda f: f.endswith(
        ('mailkit/imap.py', '/imaplib.py', '/socket.py', '/ssl.py'))),
    ('database (peewee, sqlite3, models.py)', lambda f: f.endswith(('/peewee.py', 'models.py'))
     or '/playhouse/' in f),
    ('field building (tasks.py, json)', lambda f: f.endswith('tasks.py') or '/json/' in f),
)


def category(func):
    filename, _, name = func
    if filename == '~':
        if 'sha256' in name or 'hexdigest' in name:
            return 'blob hashing (sha256)'
        return None   # a builtin: charged to its callers
    for label, matches in CATEGORIES:
        if matches(filename):
            return label
    return 'other'


def time_by_category(stats):
    """Own time per category; a C builtin's time goes to the categories of its callers."""
    totals = {}
    for func, (_, _, tottime, _, callers) in stats.stats.items():
        label = category(func)
        if label is not None:
            totals[label] = totals.get(label, 0.0) + tottime
            continue
        for caller, caller_stats in callers.items():
            label = category(caller) or 'other'
            totals[label] = totals.get(label, 0.0) + caller_stats[2]
    return sorted(totals.items(), key=lambda item: -item[1])


def print_profile(title, profile, wall, top):
    stats = pstats.Stats(profile)
    print(f'--- {title}: {wall:.2f} s under cProfile (profiling slows Python-heavy code more than C)')
    print('time by category (own time; builtins charged to their callers):')
    total = sum(t for _, t in time_by_category(stats))
    for label, seconds in time_by_category(stats):
        print(f'  {label:48} {seconds:7.2f} s  {seconds / total * 100:5.1f}%')
    for order in ('cumulative', 'tottime'):
        out = io.StringIO()
        pstats.Stats(profile, stream=out).strip_dirs().sort_stats(order).print_stats(top)
        body = out.getvalue()
        print(f'top {top} by {order}:')
        print(body[body.index('   ncalls'):].rstrip())


def run_child_profile(args):
    import models
    from taskq import ledger
    import tasks
    from mailkit import logs
    models.migrate()
    tenant_id, user_id, client_id = make_account(models, tasks, args.user, args.port)
    func = tasks.sync_emails.task_class.func
    results = []
    for title, top in (('full sync', 25), ('no-change resync', 15)):
        task_id = f'profile-{title.replace(" ", "-")}'
        ledger.insert(task_id, name='sync_emails', state=ledger.RUNNING, tenant_id=tenant_id, user_id=user_id)
        logs.task_id.set(task_id)   # report_progress writes to this ledger row
        profile = cProfile.Profile()
        with models.tenant_scope(tenant_id):
            start = time.perf_counter()
            profile.enable()
            result = func(client_id, tenant_id, user_id)
            profile.disable()
            wall = time.perf_counter() - start
        print_profile(title, profile, wall, top)
        print(f'result: {result}')
        results.append(result)
    if results[0]['messages_synced'] != args.count:
        raise SystemExit(f'profiled sync stored {results[0]["messages_synced"]} of {args.count} messages')


# ---------------------------------------------------------------- parent: mailboxes, mbsync, report

def child_env(workdir, name):
    from cryptography.fernet import Fernet
    var = workdir / name
    var.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith('EMAILSVC_')}
    env.update(EMAILSVC_VAR=str(var), EMAILSVC_SERVER_SECRET=os.urandom(24).hex(), EMAILSVC_LOG_LEVEL='WARNING',
               EMAILSVC_CONFIG=str(workdir / 'absent.ini'),
               EMAILSVC_SECURITY_CREDENTIAL_KEYS=Fernet.generate_key().decode(),
               EMAILSVC_DATABASE_URL=f'sqlite:///{var}/emailsvc.db', EMAILSVC_QUEUE_URL=f'sqlite:///{var}/queue.db',
               EMAILSVC_SECURITY_ALLOWED_NETWORKS='127.0.0.0/8')   # the local Dovecot
    if 'EMAILSVC_MAIL_SYNC_BATCH' in os.environ:   # default 500, from mailkit/settings.py
        env['EMAILSVC_MAIL_SYNC_BATCH'] = os.environ['EMAILSVC_MAIL_SYNC_BATCH']
    return env


def run_child(mode, workdir, dovecot, count, args, capture=True):
    cmd = [sys.executable, __file__, '--child', mode, '--user', f'sync{count}', '--port', str(dovecot.imap_port),
           '--count', str(count), '--resyncs', str(args.resyncs)]
    done = subprocess.run(cmd, env=child_env(workdir, f'{mode}-{count}'), cwd=ROOT, timeout=3 * DEADLINE,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        log = workdir / f'{mode}-{count}' / 'consumer.log'
        tail = log.read_text(errors='replace')[-2000:] if log.exists() else ''
        raise RuntimeError(f'emailsvc {mode} child failed:\n{done.stderr[-3000:]}\nconsumer.log: {tail}')
    return json.loads(done.stdout.strip().splitlines()[-1]) if capture else None


def inbox_status(dovecot, user):
    with imap.ImapSession(dovecot.host, dovecot.imap_port, 'none', user, PASSWORD) as session:
        typ, data = session.conn.status('INBOX', '(MESSAGES UIDNEXT UIDVALIDITY HIGHESTMODSEQ)')
        if typ != 'OK':
            raise RuntimeError(f'STATUS INBOX of {user}: {data}')
        return data[0].decode()


MBSYNCRC = """FSync {fsync}

IMAPAccount bench
Host {host}
Port {port}
User {user}
Pass {password}
SSLType None
AuthMechs LOGIN

IMAPStore remote
Account bench

MaildirStore local
Path {home}/
Inbox {home}/INBOX

Channel bench
Far :remote:
Near :local:
Patterns INBOX
Create Near
Sync Pull
SyncState *
"""


def mbsync_once(rc):
    start = time.perf_counter()
    done = subprocess.run([MBSYNC, '-c', str(rc), '-a'], capture_output=True, text=True, timeout=DEADLINE)
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f'mbsync exited with {done.returncode}: {(done.stderr or done.stdout)[-2000:]}')
    return elapsed


def run_mbsync(workdir, dovecot, count, resyncs, fsync=True):
    """(full sync seconds, [no-change resync seconds]) into a fresh Maildir."""
    home = workdir / f'mbsync-{count}-{"fsync" if fsync else "nofsync"}'
    home.mkdir()
    rc = home / 'mbsyncrc'
    rc.write_text(MBSYNCRC.format(fsync='yes' if fsync else 'no', host=dovecot.host, port=dovecot.imap_port,
                                  user=f'sync{count}', password=PASSWORD, home=home))
    settle()
    full = mbsync_once(rc)
    files = sum(1 for sub in ('cur', 'new') for _ in (home / 'INBOX' / sub).iterdir())
    if files != count:
        raise RuntimeError(f'mbsync left {files} messages in {home / "INBOX"}, expected {count}')
    settle()
    return full, [mbsync_once(rc) for _ in range(resyncs)]


def build_mailboxes(dovecot, sizes):
    """One Dovecot user per size, its INBOX written straight into the Maildir, then indexed by a SELECT."""
    targets = {}
    for count in sizes:
        user = f'sync{count}'
        dovecot.add_user(user, PASSWORD)
        with imap.ImapSession(dovecot.host, dovecot.imap_port, 'none', user, PASSWORD) as session:
            session.select('INBOX')   # makes Dovecot create the Maildir
        targets[dovecot.maildir(user) / 'cur'] = count
    start = time.perf_counter()
    message_sizes = mailgen.write_maildirs(targets, max(sizes), dovecot.mail_user.pw_uid, dovecot.mail_user.pw_gid)
    built = time.perf_counter() - start
    top = max(sizes)
    ordered = sorted(message_sizes)
    print(f'built {top:,} messages once ({mb(sum(message_sizes)):.0f} MB, median {ordered[len(ordered) // 2] / 1e3:.1f} KB, '
          f'{sum(s >= 100_000 for s in message_sizes) / top * 100:.1f}% of 100 KB or more), '
          f'written into {len(sizes)} Maildir(s) in {built:.1f} s')
    for count in sizes:
        start = time.perf_counter()
        with imap.ImapSession(dovecot.host, dovecot.imap_port, 'none', f'sync{count}', PASSWORD) as session:
            state = session.select('INBOX', readonly=False)   # a plain SELECT: Dovecot indexes the new files
        if state.exists != count:
            raise RuntimeError(f'Dovecot sees {state.exists} messages for sync{count}, expected {count}')
        print(f'  sync{count}: {count:,} messages, {mb(sum(message_sizes[:count])):.1f} MB; '
              f'first login + SELECT (Dovecot indexes): {time.perf_counter() - start:.2f} s')
    settle()
    return {count: sum(message_sizes[:count]) for count in sizes}


def imap_floor(dovecot, user, runs):
    """Seconds for the IMAP commands of our no-change resync alone (connect, login, ENABLE
    QRESYNC, LIST, EXAMINE with QRESYNC per folder, LOGOUT): what Dovecot and the wire cost."""
    context = ssl.create_default_context()   # made once, outside the timing
    known = {}
    with imap.ImapSession(dovecot.host, dovecot.imap_port, 'none', user, PASSWORD, ssl_context=context) as session:
        for folder in session.folders():
            if folder.selectable:
                state = session.select(folder.raw_name, readonly=True)
                known[folder.raw_name] = (state.uidvalidity, state.highestmodseq)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        with imap.ImapSession(dovecot.host, dovecot.imap_port, 'none', user, PASSWORD,
                              ssl_context=context) as session:
            for folder in session.folders():
                if folder.selectable:
                    session.select(folder.raw_name, readonly=True, qresync=known.get(folder.raw_name))
        times.append(time.perf_counter() - start)
    return times


def measure(workdir, dovecot, count, args):
    user = f'sync{count}'
    before = inbox_status(dovecot, user)
    ours = run_child('sync', workdir, dovecot, count, args)
    floor = imap_floor(dovecot, user, max(args.resyncs, 1))
    between = inbox_status(dovecot, user)
    full, resyncs = run_mbsync(workdir, dovecot, count, args.resyncs)
    nofsync_full, _ = run_mbsync(workdir, dovecot, count, 0, fsync=False)
    after = inbox_status(dovecot, user)
    if not before == between == after:
        raise RuntimeError(f'the mailbox changed during the bench: {before} / {between} / {after}')
    if ours['stored']['messages'] != count or ours['full']['result']['messages_synced'] != count:
        raise RuntimeError(f'emailsvc stored {ours["stored"]["messages"]} of {count} messages')
    for run in ours['resyncs']:
        result = run['result']
        if result['messages_synced'] or result['messages_updated'] or result['messages_deleted']:
            raise RuntimeError(f'a no-change resync changed something: {result}')
    return {'ours': ours, 'imap_floor': floor, 'mbsync_full': full, 'mbsync_resyncs': resyncs, 'mbsync_nofsync_full': nofsync_full,
            'status': before}


def report(results, totals, args):
    verdicts = []

    def verdict(ok):
        verdicts.append(ok)
        return 'met' if ok else 'NOT MET'

    print(f'\nPython {sys.version.split()[0]}, embedded mode (SQLite queue + database), 2 process workers, '
          f'sync batch {os.environ.get("EMAILSVC_MAIL_SYNC_BATCH", "500")}; mbsync {mbsync_version()}')
    resync_best = {}
    for count, r in sorted(results.items()):
        ours, full = r['ours'], r['ours']['full']
        wall = full['wall_s']
        rss_mb = max(full['hwm_kb'], full['rss_sampled_kb']) * 1024 / 1e6
        ratio = wall / r['mbsync_full']
        line = (f'full sync {count:,} msgs ({mb(totals[count]):.0f} MB): emailsvc {wall:.1f} s '
                f'({count / wall:.0f} msg/s, {mb(totals[count]) / wall:.1f} MB/s, worker peak RSS {rss_mb:.0f} MB)  '
                f'mbsync {r["mbsync_full"]:.1f} s  ratio {ratio:.2f}x')
        if count == max(results):
            line += f' (target <= {TARGET_FULL}x: {verdict(ratio <= TARGET_FULL)}); '
            line += f'peak RSS target <= {TARGET_RSS_MB} MB: {verdict(rss_mb <= TARGET_RSS_MB)}'
        print(line)
        print(f'    emailsvc: sync_duration_seconds {full["result"]["sync_duration_seconds"]:.2f} s in the worker; '
              f'worker RSS idle {full["idle_rss_kb"] * 1024 / 1e6:.0f} MB, VmHWM {full["hwm_kb"] * 1024 / 1e6:.0f} MB, '
              f'sampled max {full["rss_sampled_kb"] * 1024 / 1e6:.0f} MB, still {full["rss_after_kb"] * 1024 / 1e6:.0f} MB '
              f'after the resyncs; stored {ours["stored"]["messages"]:,} messages, '
              f'{ours["stored"]["attachments"]:,} attachments, {ours["stored"]["parse_errors"]} with parse_error set; '
              f'database {mb(ours["db_bytes"]):.0f} MB')
        print(f'    mbsync with FSync no: {r["mbsync_nofsync_full"]:.1f} s (ratio {wall / r["mbsync_nofsync_full"]:.2f}x)')
        walls = [run['wall_s'] for run in ours['resyncs']]
        inner = [run['result']['sync_duration_seconds'] for run in ours['resyncs']]
        best, theirs = min(walls), min(r['mbsync_resyncs'])
        resync_best[count] = (best, theirs)
        print(f'    no-change resync runs, ms: emailsvc {", ".join(f"{w * 1e3:.1f}" for w in walls)}; '
              f'mbsync {", ".join(f"{w * 1e3:.1f}" for w in r["mbsync_resyncs"])}')
        print(f'no-change resync {count:,}: emailsvc {best * 1e3:.1f} ms (median {statistics.median(walls) * 1e3:.1f} ms; '
              f'sync_duration {min(inner) * 1e3:.1f} ms)  mbsync {theirs * 1e3:.1f} ms '
              f'(median {statistics.median(r["mbsync_resyncs"]) * 1e3:.1f} ms)  ratio {best / theirs:.2f}x '
              f'(target <= {TARGET_RESYNC}x: {verdict(best / theirs <= TARGET_RESYNC)})')
        print(f'    measured apart: the same IMAP commands alone (mailkit.imap, no queue, no database) '
              f'{min(r["imap_floor"]) * 1e3:.1f} ms')
    if len(resync_best) > 1:
        small, large = min(resync_best), max(resync_best)
        growth = resync_best[large][0] / resync_best[small][0]
        print(f'no-change resync {small:,} -> {large:,} messages: emailsvc x{growth:.2f}, '
              f'mbsync x{resync_best[large][1] / resync_best[small][1]:.2f} '
              f'(target: flat, within {TARGET_FLAT}x: {verdict(growth <= TARGET_FLAT)})')
    print(f'(best of {args.resyncs} resyncs; emailsvc times are the ledger\'s enqueued_at -> finished_at, '
          f'mbsync\'s the process run; mbsync\'s first resync after a full sync sleeps 1 s in its Maildir code; '
          f'STATUS INBOX unchanged throughout)')
    return all(verdicts)


def mbsync_version():
    done = subprocess.run([MBSYNC, '--version'], capture_output=True, text=True)
    return done.stdout.strip() or done.stderr.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', default='1000,10000', help='mailbox sizes, comma-separated')
    parser.add_argument('--resyncs', type=int, default=5, help='no-change resyncs per tool and size (best counts)')
    parser.add_argument('--profile', action='store_true', help='profile the full sync of the largest size in-process')
    parser.add_argument('--child', choices=('sync', 'profile'), help=argparse.SUPPRESS)
    parser.add_argument('--user', help=argparse.SUPPRESS)
    parser.add_argument('--port', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--count', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == 'sync':
        return run_child_sync(args)
    if args.child == 'profile':
        return run_child_profile(args)
    sizes = sorted({int(s.replace('_', '')) for s in args.sizes.split(',') if s.strip()})
    if not sizes or min(sizes) < 1:
        parser.error('--sizes needs positive numbers, e.g. 1000,10000')
    if not os.path.exists(MBSYNC):
        raise SystemExit(f'{MBSYNC} not found: apt-get install isync')
    started = time.perf_counter()
    busy_before = cpu_seconds()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix='syncb-'))   # short: Dovecot's socket paths
    dovecot = None
    try:
        dovecot = services.start_dovecot(workdir)
        totals = build_mailboxes(dovecot, sizes)
        if args.profile:
            run_child('profile', workdir, dovecot, max(sizes), args, capture=False)
            ok = True
        else:
            results = {}
            for count in sizes:
                results[count] = measure(workdir, dovecot, count, args)
            ok = report(results, totals, args)
    finally:
        if dovecot is not None:
            dovecot.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    wall = time.perf_counter() - started
    busy_after = cpu_seconds()
    # Dovecot, the consumers and mbsync are reaped children: their CPU time is ours. What is
    # left is other work on this machine (and kernel writeback), which makes every figure noisy.
    others = (busy_after[0] - busy_before[0]) - (busy_after[1] - busy_before[1])
    share = others / (wall * os.cpu_count())
    print(f'bench took {wall:.0f} s; other processes used {max(others, 0):.0f} CPU-seconds meanwhile '
          f'({max(share, 0) * 100:.0f}% of {os.cpu_count()} CPUs)'
          + (': the machine was busy, figures are noisy' if share > 0.1 else ''))
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
