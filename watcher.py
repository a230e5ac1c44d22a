"""The watcher: IMAP IDLE push for every account that allows it (`./run.sh watcher`).

Periodic sync finds new mail within minutes; the watcher hears of it within
a second. It holds one IDLE connection (mailkit.idle) on the INBOX of every
IMAP account with `push` and sync on, all on one asyncio loop in one thread,
and when the server announces a change (EXISTS, EXPUNGE, FETCH) it queues
one sync of that folder. Periodic sync keeps running as the safety net.

One sync, not a pile
--------------------
A change marks the account dirty; the queueing loop takes the dirty
accounts a moment later and asks tasks.queue_sync, whose claim on the
account (the ledger) admits one queued or running sync per account. A burst
of announcements becomes one sync. Only a claim that cannot cover the change
is tried again, after a pause: a sync already *running* may have read the
folder before the new message came, and a waiting sync of another folder
will not read INBOX. A waiting sync of INBOX (or of the whole account)
covers it: the change is dropped.

Each connection that reaches IDLE also compares what EXAMINE said (UIDVALIDITY,
UIDNEXT, HIGHESTMODSEQ) with what the last sync stored, and queues a sync
when they differ: mail that came while nobody watched (start-up, a
takeover, a reconnect) is not left to periodic sync.

Many watchers: leases
---------------------
Each account is watched by exactly one watcher, the holder of its
`WatchLease` row. Each watcher holds about its share: the watchable
accounts divided by the live watchers (`WatcherBeat` rows, renewed with the
leases), rounded up; one above its share lets the excess go for a newcomer
to take. A lease lasts `watcher.recovery_grace` seconds by the
database's clock (never a host's: hosts' clocks disagree) and the holder
renews all of its leases with one UPDATE every `watcher.heartbeat_seconds`.
On the same beat every watcher inserts leases for watchable accounts that
have none and takes over leases that expired: a dead watcher's accounts move
to a live one within the grace plus a beat. Both are single conditional
statements (INSERT ... ON CONFLICT DO NOTHING; UPDATE ... WHERE expires <
now), so two watchers racing for an account cannot both win it. A watcher
that stops cleanly deletes its leases, and another takes them at its next
beat.

Connections
-----------
The beat also reads every held account again: a changed server, username or
stored password (a PATCH) restarts its connection with the new settings; an
account deleted, or with push or sync turned off, is let go. A failed
connection is tried again after a pause that doubles from 1 s up to
`watcher.max_backoff`, drawn between half and all of it (jitter), so a
server that restarts is not met by every watcher at the same instant. A
rejected login (auth_error) is not tried again until the credentials change;
a server without IDLE stays on periodic sync. Only the tasks layer decrypts:
this module sits above it and asks tasks.decrypt. The lease row's `state`
(connecting, idling, backoff, auth_error, unsupported, error) is what the
account API shows as `push_state`.
"""
import argparse
import asyncio
import logging
import math
import os
import random
import resource
import signal
import socket
import typing

import peewee as pw

import models
import tasks
from mailkit import idle, logs
from mailkit.credentials import CredentialError
from mailkit.errors import AuthenticationFailed, MailError
from taskq import ledger

SETTINGS = tasks.SETTINGS
logger = logging.getLogger('emailsvc.watcher')
# A takeover of thousands of accounts opens this many connections at a time, not all at once.
CONNECTING_AT_ONCE = 50
# A change that a running sync may have missed is tried again after this many seconds.
RETRY_SECONDS = 0.5
# A takeover looks this long after the lease it waits for expires (by the database's clock).
TAKEOVER_MARGIN = 0.1
# Connection states are written this long after the first of a batch changed.
STATE_BATCH_SECONDS = 0.2
# A connection that lived this long was healthy: its failure starts the backoff from 1 s again.
HEALTHY_SECONDS = 60.0


class Account(typing.NamedTuple):
    """What watching an account needs; any change of it (a PATCH) means a new connection."""
    id: int
    host: str
    port: int
    security: str
    username: str
    secret: str        # the stored, encrypted password: decrypted only to log in


class Watcher:
    """The accounts this process holds, their connections, and the syncs their changes queue."""

    def __init__(self, settings):
        self.holder = f'{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}'[:100]
        self.beat = settings['watcher.heartbeat_seconds']
        self.grace = settings['watcher.recovery_grace']
        self.idle_seconds = settings['watcher.idle_seconds']
        self.max_backoff = settings['watcher.max_backoff']
        self.timeout = settings['mail.timeout']
        self.watches: dict[int, tuple[Account, asyncio.Task]] = {}
        self.dirty: dict[int, float] = {}          # account id -> when to try queueing its sync
        self.states: dict[int, tuple[str, str | None]] = {}   # lease states still to write
        self.checks: dict[int, idle.FolderStatus] = {}         # first IDLEs' folder states, to compare
        self.wake = asyncio.Event()               # a change to queue a sync for
        self.news = asyncio.Event()               # a state to write
        self.connecting = asyncio.Semaphore(CONNECTING_AT_ONCE)

    # -------------------------------------------------- the beat

    async def run(self, stop: asyncio.Event):
        logger.info('watcher %s started', self.holder)
        queuing = asyncio.create_task(self.queue_syncs())
        loop = asyncio.get_running_loop()
        next_beat = loop.time()
        try:
            while not stop.is_set():
                try:
                    if loop.time() >= next_beat:
                        held, expiring = self.hold_leases()
                        self.reconcile(held)
                        # Look again just after the next lease of another watcher's could lapse: a dead
                        # watcher's accounts move at the end of its grace, not up to a beat later.
                        next_beat = loop.time() + min(self.beat, expiring + TAKEOVER_MARGIN)
                    self.flush_states()
                except Exception:   # a database outage must not end the watcher: its connections live on
                    logger.exception('watcher beat failed; trying again in %ss', self.beat)
                await self.until_beat_or_news(stop, next_beat - loop.time())
        finally:
            queuing.cancel()
            await self.let_go(list(self.watches))
            self.release_leases()
            logger.info('watcher %s stopped', self.holder)

    async def until_beat_or_news(self, stop, seconds):
        """Sleep until the next beat, or a little after a connection's state changed (connected,
        failed), so what the lease rows say follows within a moment, not a beat."""
        if not self.states:
            self.news.clear()
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.news.wait())]
            await asyncio.wait(waits, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
        if self.states and not stop.is_set():
            await asyncio.sleep(STATE_BATCH_SECONDS)   # one UPDATE for many connections that change together

    def note(self, account_id, state, detail=None):
        """Record a connection's state for its lease row; written within STATE_BATCH_SECONDS."""
        self.states[account_id] = (state, detail)
        self.news.set()

    def hold_leases(self):
        """Renew, take and drop leases; returns ({account id: Account} of the accounts held now,
        seconds until the first lease another watcher holds expires unless renewed)."""
        lease, now = models.WatchLease, pw.SQL(models.clock_sql(epoch=True))
        with models.database.connection_context(), models.all_tenants():
            wanted = watchable_accounts()
            share = math.ceil(len(wanted) / self.live_watchers(now))
            with models.database.atomic():
                lease.update(expires=now + self.grace).where(lease.holder == self.holder).execute()
                leased = dict(lease.select(lease.client, lease.holder).tuples())
                mine = sorted(i for i, holder in leased.items() if holder == self.holder and i in wanted)
                # Accounts no longer watchable go; so do those above our share, for a watcher that
                # has less (it takes them at its next beat, and its first IDLE syncs what came meanwhile).
                dropped = [i for i, holder in leased.items() if holder == self.holder and i not in wanted] + \
                    mine[share:]
                for chunk in models.chunks(dropped, 500):
                    lease.delete().where(lease.holder == self.holder, lease.client.in_(chunk)).execute()
            room = share - len(mine)
            free = [i for i in wanted if i not in leased][:max(0, room)]
            for chunk in models.chunks(free, 500):
                lease.insert_many([{'client': i, 'holder': self.holder, 'expires': now + self.grace}
                                   for i in chunk]).on_conflict_ignore().execute()
            taken = [i for i, holder in leased.items() if holder != self.holder and i in wanted]
            took = sum(lease.update(holder=self.holder, expires=now + self.grace, state='connecting', detail=None)
                       .where(lease.client.in_(chunk), lease.expires < now).execute()
                       for chunk in models.chunks(taken[:max(0, room - len(free))], 500))
            if took:
                logger.info('took over %s accounts whose watcher stopped renewing its leases', took)
            held = {i for (i,) in lease.select(lease.client).where(lease.holder == self.holder).tuples()}
            expiring = lease.select(pw.fn.MIN(lease.expires) - now).where(lease.holder != self.holder).scalar()
        return {i: wanted[i] for i in held if i in wanted}, self.grace if expiring is None else max(0.0, expiring)

    def live_watchers(self, now):
        """Beat (our row says we live until the grace is over) and count the watchers alive by the same test."""
        beat = models.WatcherBeat
        beat.insert(id=self.holder, expires=now + self.grace) \
            .on_conflict(conflict_target=[beat.id], update={beat.expires: now + self.grace}).execute()
        beat.delete().where(beat.expires < now).execute()
        return max(1, beat.select().count())

    def flush_states(self):
        """Write the states connections reached since the last write: one UPDATE per state, on our leases only."""
        pending, self.states = self.states, {}
        by_state = {}
        for account_id, state in pending.items():
            by_state.setdefault(state, []).append(account_id)
        lease = models.WatchLease
        try:
            with models.database.connection_context(), models.database.atomic():
                for (state, detail), ids in by_state.items():
                    for chunk in models.chunks(ids, 500):
                        lease.update(state=state, detail=detail) \
                            .where(lease.client.in_(chunk), lease.holder == self.holder).execute()
        except Exception:
            self.states = {**pending, **self.states}   # newer states win; written at the next try
            raise

    def release_leases(self):
        """A clean stop hands its accounts over at the other watchers' next beat, not after the grace."""
        try:
            with models.database.connection_context():
                models.WatchLease.delete().where(models.WatchLease.holder == self.holder).execute()
                models.WatcherBeat.delete().where(models.WatcherBeat.id == self.holder).execute()
        except Exception:
            logger.exception('could not release the leases; they expire in %ss', self.grace)

    def reconcile(self, held):
        """Start watching newly held accounts, restart changed ones, let go of the rest."""
        stale = [i for i, (account, _) in self.watches.items() if held.get(i) != account]
        for account_id in stale:
            _, task = self.watches.pop(account_id)
            task.cancel()
            self.dirty.pop(account_id, None)
        for account_id, account in held.items():
            if account_id not in self.watches:
                self.watches[account_id] = (account, asyncio.create_task(self.keep_watching(account)))

    async def let_go(self, account_ids):
        tasks_ = [self.watches.pop(i)[1] for i in account_ids]
        for task in tasks_:
            task.cancel()
        await asyncio.gather(*tasks_, return_exceptions=True)

    # -------------------------------------------------- one account's connection

    async def keep_watching(self, account):
        """Watch one account until cancelled, reconnecting with backoff; give up on a rejected login."""
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            self.note(account.id, 'connecting')
            idling_since = None
            await self.connecting.acquire()
            connecting = True   # the slot is held until IDLE begins or the attempt fails

            def idling(status, count):
                nonlocal idling_since, connecting
                if connecting:
                    connecting = False
                    self.connecting.release()
                if count == 1:
                    idling_since = loop.time()
                    self.note(account.id, 'idling')
                    self.checks[account.id] = status   # compared with the stored state in a batch
                    self.wake.set()

            try:
                server = idle.Server(account.host, account.port, account.security, account.username,
                                     tasks.decrypt(account.secret))
                await idle.watch(server, lambda: self.changed(account.id), on_idle=idling,
                                 idle_seconds=self.idle_seconds, timeout=self.timeout,
                                 ssl_context=tasks.mail_ssl_context(), policy=tasks.EGRESS)
            except AuthenticationFailed as exc:
                return self.give_up(account, 'auth_error', exc)
            except idle.IdleUnsupported as exc:
                return self.give_up(account, 'unsupported', exc)
            except CredentialError as exc:
                return self.give_up(account, 'error', exc)
            except MailError as exc:
                self.note(account.id, 'backoff', tasks.error_text(exc))
                logger.info('account %s: IDLE connection failed: %s', account.id, tasks.error_text(exc))
            except Exception as exc:   # a bug must cost one account a reconnect, not the watcher
                self.note(account.id, 'backoff', type(exc).__name__)
                logger.exception('account %s: watching failed', account.id)
            finally:
                if connecting:
                    self.connecting.release()
            if idling_since is not None and loop.time() - idling_since > HEALTHY_SECONDS:
                failures = 0
            failures += 1
            await asyncio.sleep(backoff(failures, self.max_backoff))

    def give_up(self, account, state, exc):
        """Stop trying this account until its settings change (the beat sees a new Account then)."""
        self.note(account.id, state, tasks.error_text(exc))
        logger.warning('account %s: not watching (%s): %s', account.id, state, tasks.error_text(exc))

    def compare_with_stored(self):
        """Mark dirty the accounts whose INBOX changed since their last sync stored it (nobody watched
        meanwhile): one query for every connection that began IDLE since the last look."""
        checks, self.checks = self.checks, {}
        folder = models.EmailFolder
        stored = {}
        with models.database.connection_context(), models.all_tenants():
            for chunk in models.chunks(list(checks), 500):
                rows = folder.select(folder.client, folder.uidvalidity, folder.uidnext, folder.highestmodseq) \
                    .where(folder.client.in_(chunk), folder.role == 'inbox').tuples()
                stored.update((row[0], row[1:]) for row in rows)
        for account_id, status in checks.items():
            known = stored.get(account_id)
            if known is None or known != (status.uidvalidity, status.uidnext or known[1], status.highestmodseq):
                self.changed(account_id)

    # -------------------------------------------------- queueing syncs

    def changed(self, account_id):
        """The server said INBOX changed: a sync soon (one, however many times this is called before it)."""
        self.dirty.setdefault(account_id, 0.0)
        self.wake.set()

    async def queue_syncs(self):
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.checks:
                try:
                    self.compare_with_stored()
                except Exception:
                    logger.exception('comparing folder states failed; periodic sync will catch up')
            now = loop.time()
            for account_id in [i for i, due in self.dirty.items() if due <= now]:
                try:
                    again = self.queue_sync(account_id)
                except Exception:
                    logger.exception('account %s: queueing a sync failed; trying again', account_id)
                    again = True
                if again and account_id in self.watches:
                    self.dirty[account_id] = now + RETRY_SECONDS
                else:
                    self.dirty.pop(account_id, None)
            if self.dirty:
                loop.call_later(max(0.0, min(self.dirty.values()) - now), self.wake.set)

    def queue_sync(self, account_id):
        """Queue a sync of the account's INBOX; True if the claim held by another sync may not cover it."""
        with models.database.connection_context(), models.all_tenants():
            client = models.EmailClient.get_or_none(models.EmailClient.id == account_id)
            if client is None:
                return False
            inbox = inbox_of(client.id)
            folder_id = inbox.id if inbox else None
            # Read first: a waiting sync usually covers the change, and the claim's write lock is not needed.
            holder = sync_record(client.sync_task_id)
            if holder is None or holder.state not in ledger.ACTIVE_STATES:
                task_id, _, queued = tasks.queue_sync(client, client.user_id, folder_id=folder_id)
                if queued:
                    logger.info('account %s: INBOX changed; sync %s queued', account_id, task_id)
                    return False
                holder = sync_record(task_id)
            return holder is not None and (holder.state == ledger.RUNNING or
                                           (holder.args or {}).get('folder_id') not in (None, folder_id))


def sync_record(task_id):
    return models.TaskRecord.get_or_none(models.TaskRecord.id == task_id) if task_id else None


def watchable_accounts():
    """{id: Account} of every IMAP account with push and sync on that has a stored password."""
    client, credential = models.EmailClient, models.Credential
    rows = client.select(client.id, client.incoming_host, client.incoming_port, client.incoming_security,
                         client.incoming_username, credential.secret) \
        .join(credential, on=((credential.client == client.id) & (credential.kind == 'incoming'))) \
        .where(client.push == True, client.sync_enabled == True,  # noqa: E712
               client.incoming_protocol == 'imap').tuples()
    return {row[0]: Account(*row) for row in rows}


def inbox_of(account_id):
    folder = models.EmailFolder
    return folder.get_or_none(folder.client == account_id, folder.role == 'inbox')


def backoff(failures, cap):
    """Seconds before reconnect attempt `failures`: 1, 2, 4 ... up to cap, each drawn from its upper half."""
    return min(cap, 2.0 ** min(failures - 1, 30)) * random.uniform(0.5, 1.0)


# ---------------------------------------------------------------- the process

def raise_open_files_limit():
    """One descriptor per watched account: lift the soft limit (often 1024) to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve():
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):   # either stops cleanly: leases are handed over
        loop.add_signal_handler(signum, stop.set)
    await Watcher(SETTINGS).run(stop)


def main(argv=None):
    argparse.ArgumentParser(prog='watcher', description='Hold IMAP IDLE on the INBOX of every account with push on '
                            'and queue a sync when it changes; watcher.* settings apply. SIGINT or SIGTERM stops '
                            'it and hands its accounts to the other watchers.').parse_args(argv)
    logs.configure(SETTINGS['log.level'])
    models.migrate()
    raise_open_files_limit()
    asyncio.run(serve())


if __name__ == '__main__':
    main()
