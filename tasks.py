"""emailsvc's tasks: `huey` and every task with its workflow.

Run the consumer with `./run.sh consumer [--lanes sync,send]`, which passes the
configured options, or `huey_consumer tasks.huey -k process`: both serve every
lane of config.ini's [lanes] with its worker count (huey_consumer's -w is not
used); each task below names its lane. The queue
machinery under the tasks (the ledger, time limits, heartbeats, recovery)
is the `taskq` package; this module is the only code that opens mail
connections or decrypts stored passwords. Task payloads hold ids and options
only: no secret ever reaches the broker or the ledger's copy of the arguments.

Sections: set-up, accounts and mail sessions, sync, send and outbox, delete,
spam, periodic, webhooks.
"""
import datetime
import functools
import json
import logging
import pathlib
import ssl
import time

from huey import crontab

import models
import taskq
from mailkit import egress, logs, mime, smtp, spam, webhooks
from mailkit import settings as settings_mod
from mailkit.credentials import CredentialError, Vault
from mailkit.errors import AuthenticationFailed, FailNow, MailError, TemporaryMailError
from mailkit.imap import FolderGone, ImapSession
from mailkit.pop3 import Pop3Session
from mailkit.sessions import SessionCache
from taskq import ledger

try:
    SETTINGS = settings_mod.load()
except settings_mod.ConfigError as exc:
    raise SystemExit(f'emailsvc: {exc}') from None

logger = logging.getLogger('emailsvc.tasks')
models.init_database(SETTINGS['database.url'])


def current_keys():
    """The credential keys as configured now: `admin rotate-key` may have put a new one first since start-up."""
    return settings_mod.load()['security.credential_keys']


models.init_credentials(current_keys)

huey = taskq.make_huey(SETTINGS)
taskq.install(huey)
service_task = huey.service_task


# ---------------------------------------------------------------- accounts and mail sessions

imap_sessions = SessionCache()
# SMTP servers drop idle clients sooner than IMAP ones (RFC 5321, 4.5.3.2.7: 5 minutes; some 30 s).
smtp_sessions = SessionCache(check_after=10, expire_after=120)


def account_of(client_id, user_id):
    """The tenant's (scoped) account of this user, or fail at once."""
    client = models.EmailClient.find(id=client_id, user_id=user_id)
    if client is None:
        raise FailNow(f'no account {client_id} for this user')
    return client


def password_of(client, kind):
    return decrypt(secret_of(client, kind))


def decrypt(secret):
    """The one place a stored password is decrypted: to log in to the account's server.

    A secret that no key of ours opens was most likely encrypted under a key
    put in front since this worker started (rotate-key): read the keys again
    once, instead of failing every sync and send until a restart.
    """
    try:
        return vault().decrypt(secret)
    except CredentialError:
        keys = current_keys()
        if keys == SETTINGS['security.credential_keys']:
            raise
        logger.info('credential keys changed since start-up; using the new set')
        SETTINGS['security.credential_keys'] = keys
        vault.cache_clear()
        return vault().decrypt(secret)


@functools.cache
def vault():
    """Built on first use, so a web process, which only stores passwords, never holds it."""
    return Vault(SETTINGS['security.credential_keys'])


def reencrypt_credentials(keys):
    """Re-encrypt every stored password under the newest of `keys` (admin rotate-key); returns how many."""
    rotating = Vault(keys)
    count = 0
    with models.all_tenants(), models.database.atomic():
        for row in models.Credential.select():
            models.Credential.change(row.id, secret=rotating.rotate(row.secret))
            count += 1
        count += reencrypt_webhook_secrets(rotating)
    return count


def reencrypt_webhook_secrets(rotating):
    """Webhook signing secrets are sealed like passwords: rotate-key re-encrypts them too."""
    count = 0
    for row in models.Webhook.select():
        models.Webhook.change(row.id, secret=rotating.rotate(row.secret), previous_secret=(
            rotating.rotate(row.previous_secret) if row.previous_secret else None))
        count += 1
    return count


def secret_of(client, kind):
    """The stored (encrypted) password: a session cache key, decrypted only to log in."""
    row = models.Credential.find(client=client.id, kind=kind)
    if row is None:
        raise FailNow(f'account {client.id} has no {kind} password')
    return row.secret


# Where mail servers may be: checked on the resolved address at connect time
# (so a name that resolves elsewhere later cannot pass), refusing loopback,
# link-local and cloud metadata addresses unless security.allowed_networks says.
EGRESS = egress.Policy(settings_mod.listed(SETTINGS['security.allowed_networks']),
                       settings_mod.listed(SETTINGS['security.denied_networks']))


@functools.cache
def mail_ssl_context():
    """One per process: building it reads the system's CA bundle (25 ms measured)."""
    context = ssl.create_default_context()
    for path in settings_mod.listed(SETTINGS['mail.ca_files']):
        context.load_verify_locations(path)
    return context


def open_incoming(client):
    """A session with the account's incoming server: IMAP ones are kept open between tasks."""
    if client.incoming_protocol == 'imap':
        secret = secret_of(client, 'incoming')
        key = (client.id, client.incoming_host, client.incoming_port, client.incoming_security,
               client.incoming_username, secret)
        return imap_sessions.session(key, lambda: ImapSession(
            client.incoming_host, client.incoming_port, client.incoming_security, client.incoming_username,
            decrypt(secret), timeout=SETTINGS['mail.timeout'], ssl_context=mail_ssl_context(), egress=EGRESS))
    # POP3 holds the maildrop locked while connected and deletes only at QUIT: never kept.
    return Pop3Session(client.incoming_host, client.incoming_port, client.incoming_security,
                       client.incoming_username, password_of(client, 'incoming'),
                       timeout=SETTINGS['mail.timeout'], ssl_context=mail_ssl_context(), egress=EGRESS)


def open_smtp(client):
    """A session with the account's SMTP server, kept open between sends of this worker."""
    secret = secret_of(client, 'smtp') if client.smtp_username else None
    key = (client.id, client.smtp_host, client.smtp_port, client.smtp_security, client.smtp_username, secret)
    return smtp_sessions.session(key, lambda: smtp.SmtpConnection(
        client.smtp_host, client.smtp_port, client.smtp_security, client.smtp_username,
        decrypt(secret) if secret else None, timeout=SETTINGS['mail.timeout'],
        ssl_context=mail_ssl_context(), egress=EGRESS))



# ---------------------------------------------------------------- sync

# The sync lane's priorities: a sync a user asked for (or a new account's first) goes before the
# periodic ones, so a periodic storm never holds it; periodic_sync queues tenants interleaved.
USER_SYNC, PERIODIC_SYNC = 10, 9


@service_task(priority=USER_SYNC, retries=5, lane='sync')
def sync_emails(email_client_id, tenant_id, user_id, folder_id=None, force_full_sync=False):
    """Sync an account's mail from its IMAP or POP3 server into the database."""
    client = account_of(email_client_id, user_id)
    started = time.monotonic()
    counts = {'messages_synced': 0, 'messages_updated': 0, 'messages_deleted': 0}
    models.EmailClient.update(sync_state='syncing').where(models.EmailClient.id == client.id).execute()
    try:
        with open_incoming(client) as session:
            if client.incoming_protocol == 'imap':
                sync_imap(session, client, counts, folder_id, force_full_sync)
                follow_sync_since(session, client, counts, folder_id)
            else:
                sync_pop3(session, client, counts, force_full_sync)
    except AuthenticationFailed as exc:
        end_sync(client, 'auth_error', error_text(exc))
        raise
    except Exception as exc:
        end_sync(client, 'error', error_text(exc))
        raise
    end_sync(client, 'idle', None)
    return dict(counts, status='success', sync_duration_seconds=round(time.monotonic() - started, 3),
                timestamp=int(time.time() * 1000))


def error_text(exc):
    """An account's last_error: 'code: what happened: what to do' for a known failure (the API shows the
    code apart, mailkit.errors lists them), 'ExceptionName: message' for anything else."""
    code = getattr(exc, 'code', None)
    return f'{code}: {exc}' if code else f'{type(exc).__name__}: {exc}'


def end_sync(client, state, error, now=None):
    """Record how the sync ended and when periodic sync takes the account next.

    A success is due again after its interval; a failure after a backoff that
    doubles with each failure in a row, up to sync.max_backoff; a rejected
    login never, until its credentials change (a PATCH), so that a wrong
    password is not tried every few minutes for ever. (The claim on the
    account lapses with the task's ledger state.)
    """
    now = now or models.utcnow()
    fields = {'sync_state': state, 'last_error': error}
    if state == 'idle':
        fields.update(last_sync_at=now, failures=0, next_sync_at=now + datetime.timedelta(seconds=client.sync_interval))
    elif state == 'auth_error':
        fields.update(failures=client.failures + 1, next_sync_at=None)
    else:
        fields.update(failures=client.failures + 1, next_sync_at=now + retry_after(client, client.failures + 1))
    with models.database.atomic():
        models.EmailClient.update(**fields).where(models.EmailClient.id == client.id).execute()
        models.emit_sync_end(client, state, error and error.partition(': ')[0])


def retry_after(client, failures):
    """The pause before periodic sync tries a failing account again: its interval doubled per failure, capped."""
    seconds = client.sync_interval * 2 ** min(failures, 20)
    return datetime.timedelta(seconds=min(seconds, SETTINGS['sync.max_backoff']))


#
# IMAP (RFC 3501, 7162): a folder's UIDs mean something only under its
# UIDVALIDITY; we store UIDVALIDITY, the next UID still to fetch (uidnext,
# committed with each batch, so a killed sync resumes there) and
# HIGHESTMODSEQ. Next time: an unchanged UIDVALIDITY, UIDNEXT and
# HIGHESTMODSEQ means nothing happened (no further command); otherwise new
# UIDs are fetched, flags changed since our modseq are applied (CONDSTORE),
# and expunged UIDs come from QRESYNC's VANISHED or, without it, from
# comparing UID sets.
#
# A message keeps its id while the server keeps the message. A first sync,
# force_full_sync, a sync_since moved back and a changed UIDVALIDITY all
# reconcile the folder in place: what is gone on the server goes, flags are
# refreshed, what is missing is fetched newest first, and the rest is never
# touched, so readers never see the folder emptied. A changed UIDVALIDITY
# first matches stored messages to the server's by Message-ID, size and Date
# and gives them their new UIDs. While a folder fills newest first its
# uidnext is None (no "everything below" bound holds): a killed fill resumes
# by comparing UID sets. Mail that arrived before the account's sync_since is
# never fetched (SEARCH SINCE); what was stored before it was set stays.
#
# POP3 (RFC 1939): only INBOX, keyed by UIDL; what the server no longer lists
# was deleted elsewhere. It cannot search by date, so sync_since is IMAP only.

def sync_imap(session, client, counts, folder_id, force_full_sync):
    folders = refresh_folders(session, client, counts)
    if folder_id is not None:
        folders = [f for f in folders if f.id == folder_id]
        if not folders:
            raise FailNow(f'no folder {folder_id} in account {client.id}')
    plans = []
    for folder in folders:
        try:
            state = session.select(folder.raw_name, readonly=True,
                                   qresync=qresync_of(session, client, folder, force_full_sync))
        except FolderGone:  # deleted on the server since LIST: the next sync drops it
            continue
        plans.append((folder, state, plan_folder(session, client, folder, state, counts, force_full_sync)))
    plans.sort(key=lambda plan: plan[0].role != 'inbox')  # the inbox's mail is the first a user wants to read
    progress = Progress(sum(len(uids) for _, _, uids in plans))
    for folder, state, uids in plans:
        if uids:
            initial = folder.last_synced_at is None  # a resumed first sync is history too
            try:
                session.select(folder.raw_name, readonly=True)
            except FolderGone:  # deleted on the server a moment ago: the next sync drops it
                continue
            fetch_new(session, folder, uids, counts, progress)
            if folder.role == 'inbox' and not initial:  # new mail, not a mailbox's history
                queue_spam_checks(client, models.message_ids(folder, 'uid', uids))
        models.EmailFolder.update(uidvalidity=state.uidvalidity, highestmodseq=state.highestmodseq,
                                  uidnext=max(state.uidnext or 1, folder.uidnext or 1), sync_since=client.sync_since,
                                  last_synced_at=models.utcnow()).where(models.EmailFolder.id == folder.id).execute()


def follow_sync_since(session, client, counts, folder_id):
    """A PATCH that moved sync_since back while this sync ran found it running and queued no other:
    fetch the older mail now rather than at the next periodic sync (a few times at most)."""
    for _ in range(3):
        latest = models.EmailClient.get_by_id(client.id).sync_since
        if not models.sync_since_moved_back(client.sync_since, latest):
            return
        client.sync_since = latest
        sync_imap(session, client, counts, folder_id, force_full_sync=False)


def refresh_folders(session, client, counts):
    """Match the server's folders: new ones added, renamed ones followed, vanished ones dropped with their
    messages."""
    remote = [f for f in session.folders() if f.selectable]
    local = {f.raw_name: f for f in models.EmailFolder.select().where(models.EmailFolder.client == client.id)}
    follow_renames(session, local, remote)
    for gone in set(local) - {f.raw_name for f in remote}:
        counts['messages_deleted'] += models.delete_messages(
            models.EmailMessage.select().where(models.EmailMessage.folder == local[gone].id))
        local.pop(gone).delete_instance()
    for folder in remote:
        row = local.get(folder.raw_name)
        if row is None:
            local[folder.raw_name] = models.EmailFolder.create(client=client.id, name=folder.name,
                                                               raw_name=folder.raw_name, role=folder.role)
        elif (row.name, row.role) != (folder.name, folder.role):
            row.name, row.role = folder.name, folder.role
            row.save()
    return [local[f.raw_name] for f in remote]


def follow_renames(session, local, remote):
    """A folder renamed on the server looks like one vanished and one new; most servers keep a renamed
    folder's UIDVALIDITY (Dovecot does). A new folder with the UIDVALIDITY of a vanished one takes over its
    row, so its messages keep their ids. Its stored UIDVALIDITY becomes 0, which no server sends (RFC 3501:
    nz-number), so the sync matches its messages by Message-ID, size and Date: two folders that happen to
    share a UIDVALIDITY cost a fetch, and never show one message under another's id."""
    names = {f.raw_name for f in remote}
    vanished = {row.uidvalidity: row for raw_name, row in local.items() if raw_name not in names and row.uidvalidity}
    for folder in remote:
        if not vanished:
            return
        if folder.raw_name in local:
            continue
        row = vanished.pop(session.uidvalidity_of(folder.raw_name), None)
        if row is not None:
            del local[row.raw_name]
            row.name, row.raw_name, row.role, row.uidvalidity = folder.name, folder.raw_name, folder.role, 0
            row.save()
            local[folder.raw_name] = row


def qresync_of(session, client, folder, force_full_sync):
    if needs_reconciling(client, folder, force_full_sync) or not (folder.uidvalidity and folder.highestmodseq) \
            or 'QRESYNC' not in session.capabilities:
        return None
    return folder.uidvalidity, folder.highestmodseq


def needs_reconciling(client, folder, force_full_sync):
    """True when the folder must be compared with the server whole: asked for, never (or not completely)
    filled, or the account's sync_since moved back past what the folder was filled with."""
    return force_full_sync or folder.uidnext is None or models.sync_since_moved_back(folder.sync_since,
                                                                                   client.sync_since)


def plan_folder(session, client, folder, state, counts, force_full_sync):
    """Apply flag changes and deletions; return the UIDs still to fetch (newest first when reconciling)."""
    if folder.uidvalidity is not None and folder.uidvalidity != state.uidvalidity:
        # A UID means nothing without its UIDVALIDITY (RFC 3501, 2.3.1.1): if
        # the server changed it, every UID stored for this folder is stale.
        counts['messages_deleted'] += rematch_folder(session, folder, state)
        folder.uidvalidity, folder.uidnext, folder.highestmodseq = state.uidvalidity, None, None
    if needs_reconciling(client, folder, force_full_sync):
        return reconcile_folder(session, client, folder, state, counts)
    if state.highestmodseq and state.highestmodseq == folder.highestmodseq and state.uidnext == folder.uidnext:
        return []  # CONDSTORE: nothing was added, changed or expunged since we last looked
    stored = models.folder_uids(folder)
    if state.highestmodseq and folder.highestmodseq and 'QRESYNC' in session.enabled:
        # Membership, not a set: VANISHED may name a range of billions of UIDs (mailkit.imap.UidSet).
        gone, changed = {uid for uid in stored if uid in state.vanished}, state.changed
    else:
        gone = stored - set(session.uids())
        changed = (session.changed_flags(folder.highestmodseq) if state.highestmodseq and folder.highestmodseq
                   else session.all_flags())
    counts['messages_deleted'] += models.delete_uids(folder, gone & stored)
    counts['messages_updated'] += models.update_flags(folder, {u: f for u, f in changed.items() if u in stored})
    start = folder.uidnext or 1
    return [uid for uid in session.uids_since(start, since=client.sync_since) if uid >= start] if state.exists else []


def reconcile_folder(session, client, folder, state, counts):
    """Compare the folder with the server in place: drop what is gone, refresh flags, and return the missing
    UIDs, newest first. Until they are all stored the folder has no uidnext, so a killed sync comes back here."""
    models.EmailFolder.update(uidvalidity=state.uidvalidity, uidnext=None, highestmodseq=None) \
        .where(models.EmailFolder.id == folder.id).execute()
    folder.uidnext = None
    listed = set(session.uids()) if state.exists else set()
    stored = models.folder_uids(folder) - {None}
    gone = stored - listed
    counts['messages_deleted'] += models.delete_uids(folder, gone)
    if stored - gone:
        flags = session.all_flags()
        counts['messages_updated'] += models.update_flags(folder, {u: f for u, f in flags.items() if u in stored})
    wanted = set(session.uids(since=client.sync_since)) if client.sync_since and listed else listed
    return sorted(wanted - stored, reverse=True)


def rematch_folder(session, folder, state):
    """After a UIDVALIDITY change: the stored messages that the server still has (same Message-ID, size and
    Date) take their new UIDs and keep their ids, spam verdicts and reports; the others are dropped.
    Returns how many were dropped (really gone from the server)."""
    on_server = {}
    for found in session.identities(session.uids()) if state.exists else ():
        on_server.setdefault(identity(found.raw, found.size), []).append(found.uid)
    renumbered, gone = {}, []
    for message_id, header_id, size, date in models.folder_identities(folder):
        candidates = on_server.get((header_id, size, date)) if header_id or date else None
        if candidates:
            renumbered[message_id] = candidates.pop(0)
        else:
            gone.append(message_id)
    logger.info('folder %s: UIDVALIDITY %s -> %s, %d messages matched, %d gone', folder.id, folder.uidvalidity,
                state.uidvalidity, len(renumbered), len(gone))
    return models.renumber_folder(folder, renumbered, gone, state.uidvalidity)


def identity(header_lines, size):
    """(Message-ID, size, Date) of a message, as message_fields stores them, from its Message-ID and Date lines."""
    fields = message_fields(bytes(header_lines) + b'\r\n')
    return fields.get('message_id'), size, fields.get('date')


class Progress:
    def __init__(self, total):
        self.total, self.done = total, 0
        ledger.report_progress(0, total)

    def add(self, count):
        self.done += count
        ledger.report_progress(self.done, self.total)
        ledger.raise_if_stop_requested()  # after a committed batch: the one safe point to stop a sync


def fetch_new(session, folder, uids, counts, progress):
    """Fetch and store in batches; each batch commits with the folder's new uidnext, unless the folder is
    filling newest first (no uidnext: nothing below a bound is complete until it is done)."""
    newest_first = folder.uidnext is None
    batch = []
    for message in session.fetch(uids, batch=SETTINGS['mail.sync_batch'], newest_first=newest_first):
        batch.append(message)
        if len(batch) == SETTINGS['mail.sync_batch']:
            store_imap_batch(folder, batch, counts, progress, newest_first)
            batch = []
    if batch:
        store_imap_batch(folder, batch, counts, progress, newest_first)


def store_imap_batch(folder, batch, counts, progress, newest_first):
    items = [dict(message_fields(m.raw), uid=m.uid, **models.flag_fields(m.flags)) for m in batch]
    if not newest_first:
        folder.uidnext = max(m.uid for m in batch) + 1
    counts['messages_synced'] += models.store_messages(folder, items, 'uid', uidnext=folder.uidnext)
    progress.add(len(batch))


def message_fields(raw):
    """The stored fields of one raw message; a message that cannot be parsed is kept raw with the reason."""
    try:
        parsed = mime.parse(raw)
    except mime.ParseError as exc:
        logger.warning('message of %d bytes stored unparsed: %s', len(raw), exc)
        return {'raw': raw, 'attachments': [], 'size': len(raw), 'parse_error': no_nul(str(exc))[:2000]}
    sender = parsed.from_[0] if parsed.from_ else ('', '')
    for attachment in parsed.attachments:
        attachment.filename, attachment.content_id = no_nul(attachment.filename), no_nul(attachment.content_id)
        attachment.content_type = no_nul(attachment.content_type)[:255]
    fields = {
        'raw': raw, 'attachments': parsed.attachments, 'size': len(raw),
        'subject': parsed.subject, 'from_name': sender[0], 'from_addr': sender[1][:320],
        'to_addrs': parsed.to, 'cc_addrs': parsed.cc, 'reply_to': parsed.reply_to,
        'date': parsed.date.astimezone(datetime.timezone.utc).replace(tzinfo=None) if parsed.date else None,
        'message_id': (parsed.message_id or '')[:1000] or None, 'in_reply_to': parsed.in_reply_to,
        'references': parsed.references, 'snippet': parsed.snippet,
        'text': parsed.text, 'html': parsed.html, 'headers': parsed.headers,
        'parse_error': '; '.join(parsed.defects)[:2000] or None,
    }
    return {k: no_nul(v) if isinstance(v, str) else v for k, v in fields.items()}


def no_nul(text):
    # PostgreSQL text cannot hold NUL; mail sometimes does. The raw bytes keep it.
    return text.replace('\x00', '\ufffd') if text else text


def sync_pop3(session, client, counts, force_full_sync):
    """Every POP3 sync compares UIDLs whole, so force_full_sync has nothing more to do: what is kept
    keeps its id. New mail is fetched newest first (POP3 numbers messages in arrival order)."""
    folder = pop3_inbox(client)
    listed = session.uidl()
    stored = models.folder_pop3_uids(folder)
    counts['messages_deleted'] += models.delete_messages(
        models.EmailMessage.select().where(models.EmailMessage.folder == folder.id,
                                           models.EmailMessage.pop3_uid.in_(list(stored - set(listed)))))
    new = [uid for uid in reversed(listed) if uid not in stored]
    progress = Progress(len(new))
    for chunk in models.chunks(new, 100):
        items = [dict(message_fields(session.fetch(listed[uid])), pop3_uid=uid) for uid in chunk]
        counts['messages_synced'] += models.store_messages(folder, items, 'pop3_uid')
        progress.add(len(chunk))
    if stored and new:  # new mail, not a mailbox's history
        queue_spam_checks(client, models.message_ids(folder, 'pop3_uid', new))


def pop3_inbox(client):
    folder = models.EmailFolder.get_or_none(models.EmailFolder.client == client.id,
                                            models.EmailFolder.raw_name == 'INBOX')
    return folder or models.EmailFolder.create(client=client.id, name='INBOX', raw_name='INBOX', role='inbox')


def queue_sync(client, user_id, folder_id=None, force_full_sync=False, priority=None):
    """Queue a sync unless one is queued or running; returns (task id, state, queued now)."""
    task = sync_emails.s(client.id, client.tenant_id, user_id, folder_id=folder_id,
                         force_full_sync=force_full_sync, priority=priority)
    claimed, holder = ledger.claim_sync(client.id, task)
    if not claimed:
        return (*holder, False)
    try:
        huey.enqueue(task)
    except Exception:
        ledger.release_sync(client.id, task.id)
        raise
    return task.id, 'pending', True


# ---------------------------------------------------------------- send and outbox
#
# Two runs of one send can meet: a stale run of a worker taken for dead beside
# its re-run, or a broker's duplicate. The outbox row decides which of them may
# deliver. Every move of it is a compare-and-set on the (state, attempt) the
# run last saw: the move to `sending`, made just before the end-of-data mark,
# also takes the next attempt number, so of two runs that read the same row
# exactly one gets there, and the other stops before its end-of-data mark,
# which is the only thing that can make a server deliver. Each later move
# (sent, unknown, failed, back to queued) names the attempt that owns the row.

class SendTaken(TemporaryMailError):
    """Another run of this send moved its outbox row first; this one stopped without delivering.
    Worth retrying: the next attempt finds the other run's outcome."""


def stop_or_mark_sending(outbox):
    """Before the end-of-data mark: the last moment a send can still be stopped, and the first it cannot."""
    ledger.raise_if_stop_requested()
    move_outbox(outbox, 'sending', attempt=outbox.attempt + 1)


@service_task(priority=8, retries=3, lane='send')
def send_email(email_client_id, tenant_id, user_id, to, cc=None, bcc=None, subject='',
               body_text='', body_html=None, attachment_ids=None):
    """Send one message over the account's SMTP server; the outbox row makes it happen at most once."""
    client = account_of(email_client_id, user_id)
    outbox = outbox_of(client, user_id, to, cc, bcc)
    if outbox.state == 'sent':
        return sent_result(outbox)  # a re-run of a finished send: nothing goes out again
    if outbox.state in ('sending', 'unknown'):
        if outbox.state == 'sending':
            move_outbox(outbox, 'unknown', taken_ok=True)
        raise FailNow(f'delivery of {outbox.message_id} is unknown: an earlier attempt stopped during the SMTP '
                      'transaction; not sent again, to avoid a duplicate')
    raw = smtp.compose(sender=('', client.email), to=to, cc=cc or [], bcc=bcc or [], subject=subject,
                       body_text=body_text, body_html=body_html, attachments=uploads_of(attachment_ids or []),
                       message_id=outbox.message_id, date=outbox.created_at.replace(tzinfo=datetime.timezone.utc))
    try:
        with open_smtp(client) as session:
            result = session.send(client.email, outbox.recipients, raw,
                                  before_commit=lambda: stop_or_mark_sending(outbox))
    except SendTaken:
        raise   # the row is the other run's: this one leaves it alone
    except smtp.DeliveryUnknown as exc:
        move_outbox(outbox, 'unknown', taken_ok=True, error=str(exc))
        raise FailNow(f'{exc}; not sent again, to avoid a duplicate') from exc
    except TemporaryMailError as exc:
        # The transaction never completed: a retry is safe. Out of retries, the
        # send has failed: the row says so with send.failed in one transaction
        # (the ledger adds task.dead in its own, as for any task out of retries).
        move_outbox(outbox, 'failed' if taskq.service.last_attempt() else 'queued', taken_ok=True, error=str(exc))
        raise
    except Exception as exc:
        move_outbox(outbox, 'failed', taken_ok=True, error=f'{type(exc).__name__}: {exc}')
        raise
    move_outbox(outbox, 'sent', taken_ok=True, sent_at=models.utcnow(), refused=result.refused)
    copy_to_sent(client, raw)
    return sent_result(outbox)


def outbox_of(client, user_id, to, cc, bcc):
    """The send's outbox row: made by the API with the task; made here for a task queued directly."""
    task_id = logs.task_id.get()
    outbox = models.Outbox.find(task_id=task_id)
    if outbox is None:
        outbox = models.Outbox.create(client=client.id, user_id=user_id, task_id=task_id,
                                      message_id=smtp.make_message_id(domain_of(client)),
                                      recipients=smtp.envelope_recipients(to, cc or [], bcc or []))
    return outbox


def domain_of(client):
    return client.email.rpartition('@')[2] or 'localhost'


def move_outbox(outbox, state, taken_ok=False, **fields):
    """Move the row from the (state, attempt) this run last saw, with its send.* event in the same
    transaction; SendTaken if another run moved it first, unless `taken_ok` (this run is past its
    end-of-data mark or never reached it: nothing to stop).

    A run that finds the row `sending` marks it `unknown` under the same attempt,
    not knowing whether that attempt's run lives; if it does, the outcome is
    still that run's to record, so the owner of `sending` moves `unknown` too."""
    def moved(from_state):
        return models.Outbox.change(outbox.id, expect={'state': from_state, 'attempt': outbox.attempt},
                                    state=state, **fields)
    with models.database.atomic():
        made = moved(outbox.state) or (outbox.state == 'sending' and moved('unknown'))
        if made:
            models.emit_outbox(outbox, state, fields.get('error'))
    if not made:
        if not taken_ok:
            raise SendTaken(f'another run of this send took outbox {outbox.id} first; this one stopped before '
                            'the end-of-data mark')
        logger.warning('outbox %s left as another run of task %s set it (this run ends %s)',
                       outbox.id, outbox.task_id, state)
    outbox.state = state
    for name, value in fields.items():
        setattr(outbox, name, value)


def sent_result(outbox):
    refused = outbox.refused
    recipients = [r for r in outbox.recipients if r not in refused]
    return {'status': 'success', 'message_id': outbox.message_id, 'sent_timestamp': int(outbox.sent_at.replace(
        tzinfo=datetime.timezone.utc).timestamp() * 1000), 'recipients_sent': recipients,
        'recipients_refused': refused}


def uploads_of(ids):
    if not ids:
        return []
    uploads = list(models.Upload.select().where(models.Upload.id.in_(ids)))
    if len(uploads) != len(set(ids)):
        raise FailNow(f'attachments {sorted(set(ids) - {u.id for u in uploads})} no longer exist')
    try:
        return [(u.filename, u.content_type, models.Blob.content(u.blob)) for u in uploads]
    except models.Blob.DoesNotExist:   # retrying cannot bring bytes back
        raise FailNow(f'the content of attachments {sorted(ids)} is gone; upload them again') from None


def copy_to_sent(client, raw):
    """Keep the sent message in the Sent folder, here and (when asked) on the IMAP server.

    A failure here never fails the send: the message is out, and sending it
    again to get a copy would be the duplicate we promise never to make.
    """
    uid = None
    sent = models.EmailFolder.by_role(client.id, 'sent')
    try:
        if client.incoming_protocol == 'imap' and client.copy_sent:
            with open_incoming(client) as session:
                if sent is None:
                    sent = refresh_sent_folder(session, client)
                if sent is not None:
                    uid = session.append(sent.raw_name, raw, flags=('\\Seen',))
    except MailError as exc:
        logger.warning('sent copy of account %s not appended: %s', client.id, exc)
    if sent is None:
        sent = models.EmailFolder.by_role(client.id, 'sent') or models.EmailFolder.create(
            client=client.id, name='Sent', raw_name='Sent', role='sent')
    item = dict(message_fields(raw), uid=uid, **models.flag_fields(('\\Seen',)))
    models.store_messages(sent, [item], 'uid')


def refresh_sent_folder(session, client):
    refresh_folders(session, client, {'messages_deleted': 0})
    return models.EmailFolder.by_role(client.id, 'sent')


def earlier_send(user_id, key, now=None):
    """This user's outbox row with the same Idempotency-Key, if the key is younger than api.idempotency_hours."""
    Outbox = models.Outbox
    return Outbox.get_or_none(Outbox.user_id == user_id, Outbox.idempotency_key == key,
                              Outbox.created_at >= key_cutoff(now))


def key_cutoff(now=None):
    return (now or models.utcnow()) - datetime.timedelta(hours=SETTINGS['api.idempotency_hours'])


class KeyInUse(Exception):
    """Another request took this Idempotency-Key a moment earlier; `outbox` is its row (None if it gave up)."""

    def __init__(self, outbox):
        super().__init__('Idempotency-Key in use')
        self.outbox = outbox


def queue_send(client, user_id, clean, key=None, request_hash=None):
    """Record the outbox row with the task, then queue it; returns the task id.

    With an Idempotency-Key, the row says `accepting` until the task is on the
    broker, so a second request with the key can tell "accepted" (replay it)
    from "still being accepted" (409: a replay now could name a task that never
    reaches the broker). A key older than api.idempotency_hours is released.
    """
    task = send_email.s(client.id, client.tenant_id, user_id, clean['to'], cc=clean['cc'], bcc=clean['bcc'],
                        subject=clean.get('subject') or '', body_text=clean.get('body_text') or '',
                        body_html=clean.get('body_html'), attachment_ids=clean['attachment_ids'])
    recipients = smtp.envelope_recipients(clean['to'], clean['cc'], clean['bcc'])
    Outbox = models.Outbox
    try:
        with models.database.atomic():
            if key:
                Outbox.update(idempotency_key=None).where(Outbox.user_id == user_id, Outbox.idempotency_key == key,
                                                          Outbox.created_at < key_cutoff()).execute()
            ledger.record(task)
            Outbox.create(client=client.id, user_id=user_id, task_id=task.id, idempotency_key=key,
                          request_hash=request_hash, state='accepting' if key else 'queued',
                          message_id=smtp.make_message_id(domain_of(client)), recipients=recipients)
    except models.pw.IntegrityError:
        raise KeyInUse(earlier_send(user_id, key)) from None
    try:
        huey.enqueue(task)
    except Exception:
        Outbox.delete().where(Outbox.task_id == task.id).execute()
        ledger.delete(task.id)
        raise
    if key:
        Outbox.update(state='queued').where(Outbox.task_id == task.id, Outbox.state == 'accepting').execute()
    return task.id


# ---------------------------------------------------------------- delete

@service_task(priority=5, retries=5, lane='delete')
def delete_emails(email_ids, tenant_id, user_id, permanent=False):
    """Move messages to Trash (soft), or expunge them for good (permanent), on the server and here.

    A message moved to Trash keeps its id: its row follows it to the UID the
    server gave it there (COPYUID), so readers find it in Trash at once and the
    next sync neither loses it nor stores it again. Ids already deleted (or
    gone), and a soft delete of what is in Trash already, are skipped, so
    running the same delete twice deletes nothing more and `deleted_count`
    counts each message once.
    """
    Message = models.EmailMessage
    query = Message.select().where(Message.id.in_(list(email_ids)),
                                   Message.client.in_(models.EmailClient.ids_of_user(user_id)))
    if not permanent:
        query = query.where(Message.is_deleted == False)  # noqa: E712
    by_client = {}
    for message in query:
        by_client.setdefault(message.client_id, []).append(message)
    deleted = 0
    for client_id, batch in by_client.items():
        client = models.EmailClient.get_by_id(client_id)
        moved = {}
        with open_incoming(client) as session:
            if client.incoming_protocol == 'imap':
                moved = delete_on_imap(session, client, batch, permanent)
            elif permanent:
                session.delete(pop3_numbers(session, batch))
        deleted += models.forget_messages(batch, permanent, moved)
    return {'status': 'success', 'deleted_count': deleted}


def delete_on_imap(session, client, messages, permanent):
    """One MOVE (or STORE + EXPUNGE) per folder, a UID set per command (RFC 6851, 4315).

    Returns, for a soft delete, {message id: (Trash folder id, its UID there)} for what moved with a
    known UID, and {message id: None} for what is in Trash already (left alone)."""
    trash = models.EmailFolder.by_role(client.id, 'trash')
    by_folder = {}
    for message in messages:
        if message.uid is not None:
            by_folder.setdefault(message.folder_id, []).append(message)
    moved = {}
    for folder_id, batch in by_folder.items():
        if not permanent and trash is not None and folder_id == trash.id:
            moved.update((m.id, None) for m in batch)
            continue
        folder = models.EmailFolder.get_by_id(folder_id)
        try:
            session.select(folder.raw_name, readonly=False)
        except FolderGone:
            continue  # the folder and its messages are gone on the server already
        uids = [m.uid for m in batch]
        if permanent or trash is None:
            session.expunge_uids(uids)
        else:
            new_uids = session.move(uids, trash.raw_name)
            moved.update((m.id, (trash.id, new_uids[m.uid])) for m in batch if m.uid in new_uids)
    return moved


def pop3_numbers(session, messages):
    listed = session.uidl()
    return [listed[m.pop3_uid] for m in messages if m.pop3_uid in listed]


# ---------------------------------------------------------------- spam

# A 25 MB message scores on its first 2 MB: what decides spam is in the
# headers and the first parts, and scoring time and memory stay bounded.
SPAM_READ_LIMIT = 2 * 1024 * 1024
AUTO_CHECK_LIMIT = 500  # automatic checks queued by one sync: new mail, not a mailbox's history


@service_task(priority=3, retries=3, lane='spam')
def check_spam(email_id, tenant_id, user_id):
    """Score one message with the base model and the tenant's learning; store and return the verdict."""
    message = message_of(email_id, user_id)
    parsed = mime.parse(models.Blob.content(message.blob)[:SPAM_READ_LIMIT])
    verdict = spam_model().score(parsed, delta=tenant_learning(), threshold=spam_threshold())
    models.EmailMessage.update(is_spam=verdict.is_spam, spam_score=verdict.spam_score,
                               spam_indicators=verdict.indicators) \
        .where(models.EmailMessage.id == message.id).execute()
    client = models.EmailClient.get_by_id(message.client_id)
    if verdict.is_spam and client.move_spam and client.incoming_protocol == 'imap':
        move_to_role(client, message, 'junk')
    return {'status': 'success', 'is_spam': verdict.is_spam, 'spam_score': round(verdict.spam_score, 4),
            'indicators': verdict.indicators}


@functools.cache
def spam_model():
    path = pathlib.Path(SETTINGS['spam.model_path'])
    return spam.Model.load(path if path.is_absolute() else settings_mod.ROOT / path)


def spam_threshold():
    setting = SETTINGS['spam.threshold']  # checked at start-up: 'model' or a number
    return spam_model().strict_threshold if setting == 'model' else float(setting)


def tenant_learning():
    row = models.SpamLearning.get_or_none()
    return spam.Delta.from_dict(row.data) if row else None


def message_of(email_id, user_id):
    message = models.EmailMessage.get_or_none(models.EmailMessage.id == email_id,
                                              models.EmailMessage.client.in_(models.EmailClient.ids_of_user(user_id)))
    if message is None:
        raise FailNow(f'no message {email_id} for this user')
    return message


def learn_report(message, verdict):
    """Add a user's spam or ham report to the tenant's learning (never another tenant's)."""
    parsed = mime.parse(models.Blob.content(message.blob)[:SPAM_READ_LIMIT])
    with models.locked_learning() as row:
        delta = spam.Delta.from_dict(row.data)
        delta.learn(parsed, verdict, spam_model())
        models.SpamLearning.update(data=delta.to_dict(), updated_at=models.utcnow()) \
            .where(models.SpamLearning.id == row.id).execute()
    models.EmailMessage.update(is_spam=verdict == 'spam').where(models.EmailMessage.id == message.id).execute()


@service_task(priority=3, retries=3, lane='spam')
def file_report(email_id, tenant_id, user_id, verdict):
    """Move a reported message to Junk (spam) or back to the inbox (ham) on the IMAP server."""
    message = message_of(email_id, user_id)
    client = models.EmailClient.get_by_id(message.client_id)
    moved = False
    if client.incoming_protocol == 'imap':
        moved = move_to_role(client, message, 'junk' if verdict == 'spam' else 'inbox')
    return {'status': 'success', 'moved': moved}


def move_to_role(client, message, role):
    """Move one message to the account's folder with `role`; False if it is there already or has none."""
    target = models.EmailFolder.by_role(client.id, role)
    folder = models.EmailFolder.get_by_id(message.folder_id)
    if target is None or folder.id == target.id or message.uid is None:
        return False
    with open_incoming(client) as session:
        session.select(folder.raw_name, readonly=False)
        new_uid = session.move([message.uid], target.raw_name).get(message.uid)
    if new_uid is not None:   # the message keeps its id in its new folder
        models.move_in_place({message.id: (target.id, new_uid)})
    else:   # no UIDPLUS: the next sync finds it in its new folder; until then it is hidden here
        models.EmailMessage.update(is_deleted=True).where(models.EmailMessage.id == message.id).execute()
    return True


def queue_spam_checks(client, message_ids):
    """Score new inbox mail in the background (priority 3), a bounded number per sync."""
    if SETTINGS['spam.auto_check'] != 'on':
        return
    for message_id in message_ids[:AUTO_CHECK_LIMIT]:
        check_spam(message_id, client.tenant_id, client.user_id)


# ---------------------------------------------------------------- periodic

@service_task(priority=10, retries=0, periodic=crontab(minute='*/5'), lane='periodic')
def periodic_sync(now=None):
    """Queue sync_emails for every account with sync on whose interval has passed."""
    now = now or models.utcnow()
    queued = []
    for client in models.due_for_sync(now):
        task_id, _, queued_now = queue_sync(client, client.user_id, priority=PERIODIC_SYNC)
        if queued_now:
            queued.append(task_id)
    return {'status': 'ok', 'task_ids': queued}


@service_task(priority=10, retries=0, periodic=crontab(minute='0'), lane='periodic')
def cleanup_stale_results(now=None):
    """Clear ledger results older than queue.results_ttl; drop records past queue.history_days;
    delete uploads unused for mail.upload_ttl_hours."""
    now = now or models.utcnow()
    results_removed, history_removed = ledger.prune(now, SETTINGS['queue.results_ttl'],
                                                    SETTINGS['queue.history_days'])
    return {'status': 'ok', 'results_removed': results_removed, 'history_removed': history_removed,
            'uploads_removed': expire_uploads(now)}


def expire_uploads(now):
    """Delete uploads older than mail.upload_ttl_hours that no send still to go out names, then their
    blobs unless something else refers to them; returns how many uploads went."""
    cutoff = now - datetime.timedelta(hours=SETTINGS['mail.upload_ttl_hours'])
    Upload, Outbox, Record = models.Upload, models.Outbox, models.TaskRecord
    removed = 0
    with models.all_tenants():
        stale = dict(Upload.select(Upload.id, Upload.blob).where(Upload.created_at < cutoff).tuples())
        if not stale:
            return 0
        # A send names its uploads only in its task arguments: those of a send waiting, running or
        # retrying (by the ledger), or whose outbox row says it has not gone out yet, keep theirs.
        waiting = Outbox.select(Outbox.task_id).where(Outbox.state.in_(('accepting', 'queued', 'sending')))
        unfinished = (Record.name == send_email.name) & Record.state.not_in(ledger.FINAL_STATES)
        for (args,) in Record.select(Record.args).where(Record.id.in_(waiting) | unfinished).tuples().iterator():
            for upload_id in (args or {}).get('attachment_ids') or ():
                stale.pop(upload_id, None)
        for chunk in models.chunks(list(stale), 500):
            removed += Upload.delete().where(Upload.id.in_(chunk)).execute()
        models.drop_unreferenced_blobs(set(stale.values()))
    return removed


@service_task(priority=3, retries=0, lane='periodic')
def noop(tenant_id=None, user_id=None):
    """Do nothing: proves the queue, a worker and the ledger work end to end."""
    return {'status': 'ok'}


# ---------------------------------------------------------------- webhooks
#
# Each endpoint has a cursor (the last event it got) and is served by one
# delivery run at a time, so its events arrive in feed order, each at least
# once, under its event id (webhook-id). A run claims the endpoint with a lease
# (a conditional UPDATE; a dead worker's lease lapses after
# webhooks.lease_seconds), posts the events after the cursor over one kept
# connection, and commits the cursor with the delivery log every few events: a
# run killed between a post and that commit posts those events again
# (duplicates, never gaps). The first failure stops the run and schedules the
# next attempt after a doubling, capped, jittered pause; the endpoint's later
# events wait behind it, so order holds. Failing since
# webhooks.disable_after_hours, the endpoint is disabled and says why.
#
# Who starts runs: as each transaction that wrote events commits, its process
# wakes the endpoints of the users concerned (`wake_webhooks`, through
# models.on_events_committed: a long sync's first messages go out while it
# goes on); `wanted_at` marks a run as queued so a burst of commits queues one
# run, not one each; a run that finds the endpoint claimed leaves it to the
# holder, which looks again before it lets go. `sweep_webhooks` (every minute) is the safety net for runs lost
# with a killed worker. Runs go to the `webhooks` lane (wired by taskq).

WEBHOOK_FLUSH_EVERY = 50          # deliveries logged (and the cursor moved) per commit, at most
WEBHOOK_FLUSH_SECONDS = 0.5       # ... or after this long


def webhook_secrets(hook, now):
    """The secrets that sign a delivery: the current one, and the previous one while its rotation grace lasts."""
    current = [decrypt(hook.secret)]
    if hook.previous_secret and hook.previous_secret_until and hook.previous_secret_until > now:
        current.append(decrypt(hook.previous_secret))
    return current


def event_body(event):
    return json.dumps(event.to_dict(), separators=(',', ':'), ensure_ascii=False).encode()


def webhook_poster(hook):
    return webhooks.Poster(hook.url, SETTINGS['webhooks.timeout'], EGRESS, webhook_ssl_context())


@functools.cache
def webhook_ssl_context():
    """The system's CAs, loaded once a process (25 ms each time otherwise), for https:// targets."""
    return ssl.create_default_context()


def claim_webhook(webhook_id, owner, now):
    """Take the endpoint for this run unless another live run holds it or it is backing off."""
    Hook = models.Webhook
    return Hook.update(lease_owner=owner, lease_until=now + lease_span(), wanted_at=None).where(
        Hook.id == webhook_id, Hook.enabled == True,  # noqa: E712
        Hook.lease_until.is_null() | (Hook.lease_until < now) | (Hook.lease_owner == owner),
        Hook.next_attempt_at.is_null() | (Hook.next_attempt_at <= now)).execute() == 1


def lease_span():
    return datetime.timedelta(seconds=SETTINGS['webhooks.lease_seconds'])


def release_webhook(webhook_id, owner):
    """Let the endpoint go, unless a wake-up came during the run (then the caller goes on). True if let go."""
    Hook = models.Webhook
    return Hook.update(lease_owner=None, lease_until=None).where(
        Hook.id == webhook_id, Hook.lease_owner == owner, Hook.wanted_at.is_null()).execute() == 1


def pending_events(hook, limit):
    """The endpoint's next events after its cursor: its user's, of the types it takes, in feed order."""
    Event = models.Event
    query = Event.select().where(Event.user_id == hook.user_id, Event.id > hook.cursor)
    if hook.events:
        query = query.where(Event.type.in_(hook.events))
    return list(query.order_by(Event.id).limit(limit))


class DeliveryRun:
    """One run over one endpoint: post in order, log and move the cursor in commits, stop at a failure."""

    def __init__(self, hook, owner):
        self.hook, self.owner = hook, owner
        self.poster = webhook_poster(hook)
        self.secrets = webhook_secrets(hook, models.utcnow())   # decrypted once a batch, not once a delivery
        self.log = []
        self.flushed_at = time.monotonic()
        self.delivered = 0

    def post(self, event, redelivery=False, attempt=1):
        """Post one event; returns its delivery row (a dict), status succeeded or failed."""
        now = models.utcnow()
        body = event_body(event)
        started = time.monotonic()
        row = {'tenant_id': self.hook.tenant_id, 'webhook_id': self.hook.id, 'event_id': event.id,
               'event_type': event.type, 'attempt': attempt, 'redelivery': redelivery, 'created_at': now}
        try:
            code = self.poster.post(body, webhooks.headers(self.secrets, event.public_id, body))
            row.update(status='succeeded', response_code=code, error=None)
        except webhooks.DeliveryFailed as exc:
            row.update(status='failed', response_code=exc.status, error=str(exc)[:500])
        row['duration_ms'] = int((time.monotonic() - started) * 1000)
        return row

    def deliver(self, deadline):
        """Deliver until caught up (True), out of time (False); raise LostLease if another run took over."""
        while time.monotonic() < deadline:
            events = pending_events(self.hook, SETTINGS['webhooks.batch'])
            if not events:
                self.flush()
                if release_webhook(self.hook.id, self.owner):
                    return True
                models.Webhook.update(wanted_at=None).where(models.Webhook.id == self.hook.id).execute()
                continue
            # Signed as the endpoint says after these events were written: a run woken again and again
            # by commits can outlive a rotation's grace, and the old secret stops signing when it ends.
            self.secrets = webhook_secrets(models.Webhook.get_by_id(self.hook.id), models.utcnow())
            for event in events:
                if time.monotonic() >= deadline:
                    break
                row = self.post(event, attempt=self.hook.failures + 1)
                if row['status'] == 'failed':
                    self.flush()
                    self.fail(row)
                    return True
                self.log.append(row)
                self.hook.cursor, self.hook.failures = event.id, 0   # the next event is its first attempt
                self.delivered += 1
                if len(self.log) >= WEBHOOK_FLUSH_EVERY or time.monotonic() - self.flushed_at > WEBHOOK_FLUSH_SECONDS:
                    self.flush()
        self.flush()
        return False

    def flush(self):
        """Commit the delivery log so far with the cursor; renew the lease."""
        self.flushed_at = time.monotonic()
        Hook = models.Webhook
        with models.database.atomic():
            changed = Hook.update(cursor=self.hook.cursor, lease_until=models.utcnow() + lease_span(),
                                  **(self.recovered() if self.log else {})).where(
                Hook.id == self.hook.id, Hook.lease_owner == self.owner).execute()
            if not changed:
                raise LostLease(f'webhook {self.hook.id} was taken over by another run')
            models.bulk_insert(models.WebhookDelivery, self.log)
        self.log = []

    @staticmethod
    def recovered():
        return {'failures': 0, 'failing_since': None, 'last_error': None, 'next_attempt_at': None}

    def fail(self, row):
        """Record a failed attempt: back off (the endpoint's later events wait), or disable after too long."""
        hook, now = self.hook, row['created_at']
        failing_since = hook.failing_since or now
        delay = taskq.service.jittered(SETTINGS['webhooks.retry_base'] * 2 ** min(hook.failures, 30),
                                       SETTINGS['webhooks.retry_max'], SETTINGS['retry.jitter'])
        fields = {'failures': hook.failures + 1, 'failing_since': failing_since, 'last_error': row['error'],
                  'next_attempt_at': now + datetime.timedelta(seconds=delay), 'lease_owner': None,
                  'lease_until': None}
        if now - failing_since >= datetime.timedelta(hours=SETTINGS['webhooks.disable_after_hours']):
            fields.update(enabled=False, next_attempt_at=None, disabled_reason=(
                f'disabled at {models.iso(now)}: every delivery failed since {models.iso(failing_since)} '
                f'(last: {row["error"]})'))
        with models.database.atomic():
            models.bulk_insert(models.WebhookDelivery, [row])
            models.Webhook.update(**fields).where(models.Webhook.id == hook.id,
                                                  models.Webhook.lease_owner == self.owner).execute()
        if fields.get('enabled', True):
            deliver_webhook.schedule((hook.id, hook.tenant_id, hook.user_id), delay=delay)


class LostLease(Exception):
    """Another run holds the endpoint now (this one was too slow to renew): stop without writing."""


@service_task(priority=5, retries=0, lane='webhooks')
def deliver_webhook(webhook_id, tenant_id, user_id):
    """Deliver an endpoint's waiting events in order from its cursor, until caught up, failing or out of time."""
    owner = logs.task_id.get() or f'run-{time.monotonic_ns()}'
    if not claim_webhook(webhook_id, owner, models.utcnow()):
        return {'status': 'skipped', 'delivered': 0}   # running elsewhere, disabled, gone, or backing off
    run = DeliveryRun(models.Webhook.get_by_id(webhook_id), owner)
    try:
        caught_up = run.deliver(time.monotonic() + SETTINGS['webhooks.run_seconds'])
    except LostLease as exc:
        logger.warning('%s', exc)
        return {'status': 'lost_lease', 'delivered': run.delivered}
    finally:
        run.poster.close()
    if not caught_up:   # a backlog: hand over to a fresh run at the back of the queue, so other work gets a turn
        if models.Webhook.update(lease_owner=None, lease_until=None, wanted_at=models.utcnow()).where(
                models.Webhook.id == webhook_id, models.Webhook.lease_owner == owner).execute():
            deliver_webhook(webhook_id, tenant_id, user_id)
    return {'status': 'success', 'delivered': run.delivered}


@service_task(priority=5, retries=0, lane='webhooks')
def redeliver_webhook_event(webhook_id, tenant_id, user_id, delivery_id):
    """Post a logged delivery's event once more, now (out of feed order, as asked); log it as a redelivery."""
    hook = models.Webhook.find(id=webhook_id, user_id=user_id)
    earlier = models.WebhookDelivery.find(id=delivery_id, webhook_id=webhook_id)
    if hook is None or earlier is None:
        raise FailNow(f'no delivery {delivery_id} of webhook {webhook_id} for this user')
    event = models.Event.find(id=earlier.event_id)
    if event is None:
        raise FailNow(f'event {models.event_id_text(earlier.event_id)} is past the retention of the change feed')
    run = DeliveryRun(hook, None)
    try:
        row = run.post(event, redelivery=True, attempt=earlier.attempt + 1)
    finally:
        run.poster.close()
    models.bulk_insert(models.WebhookDelivery, [row])
    return {'status': row['status'], 'response_code': row['response_code'], 'error': row['error']}


def wake_webhooks(pairs, now=None):
    """Queue one run for each enabled endpoint of these (tenant, user) pairs that has none queued or running
    and is not backing off; returns how many were queued."""
    now = now or models.utcnow()
    Hook = models.Webhook
    stale = now - 2 * lease_span()   # a run marked queued this long ago was lost (a killed worker's)
    woken = 0
    for tenant_id, user_id in pairs:
        if tenant_id is None or user_id is None:
            continue
        with models.tenant_scope(tenant_id):
            due = (Hook.user_id == user_id) & (Hook.enabled == True) & \
                (Hook.next_attempt_at.is_null() | (Hook.next_attempt_at <= now)) & \
                (Hook.wanted_at.is_null() | (Hook.wanted_at < stale))  # noqa: E712
            for (hook_id,) in Hook.select(Hook.id).where(due).tuples():
                if Hook.update(wanted_at=now).where(Hook.id == hook_id, due).execute():
                    deliver_webhook(hook_id, tenant_id, user_id)
                    woken += 1
    return woken


models.on_events_committed(wake_webhooks)


@service_task(priority=5, retries=0, periodic=crontab(minute='*'), lane='webhooks')
def sweep_webhooks(now=None):
    """The safety net: wake every endpoint with events waiting whose run was lost (a killed worker)."""
    now = now or models.utcnow()
    with models.all_tenants():
        hooks = list(models.Webhook.select().where(models.Webhook.enabled == True))  # noqa: E712
    waiting = set()
    for hook in hooks:
        with models.tenant_scope(hook.tenant_id):
            if pending_events(hook, 1):
                waiting.add((hook.tenant_id, hook.user_id))
    return {'status': 'ok', 'woken': wake_webhooks(waiting, now)}


@service_task(priority=10, retries=0, periodic=crontab(minute='7'), lane='periodic')
def prune_events(now=None):
    """Drop events older than events.retention_hours (remembering how far, for 410s) and delivery log rows
    older than webhooks.log_hours."""
    now = now or models.utcnow()
    return {'status': 'ok', **models.prune_events(now - datetime.timedelta(hours=SETTINGS['events.retention_hours']),
                                                  now - datetime.timedelta(hours=SETTINGS['webhooks.log_hours']))}
