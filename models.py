"""Peewee database, models, tenant scope and migrations.

Tenant data is reached only through `TenantModel`, whose select, update and
delete add `tenant_id = <current tenant>`; the current tenant is set with
`tenant_scope(tenant_id)` (a request, a task) or lifted on purpose with
`all_tenants()` (operators, the ledger writer, periodic jobs). Code that forgets
both gets `ScopeError`, not another tenant's rows.
"""
import contextlib
import contextvars
import datetime
import functools
import hashlib
import itertools
import json
import logging
import os
import secrets

import peewee as pw
import psycopg2.extras
from playhouse import db_url
from playhouse import migrate as pw_migrate
from playhouse.pool import PooledPostgresqlDatabase, PooledSqliteDatabase

from mailkit import settings as mailkit_settings
from mailkit.credentials import Sealer

database = pw.DatabaseProxy()
logger = logging.getLogger('emailsvc.models')


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def clock_sql(offset_seconds=0.0, epoch=False):
    """The database's own clock as an SQL expression: naive UTC, as timestamp columns hold it (worker
    heartbeats), or with `epoch`, seconds since the epoch as a double (watch leases).

    Heartbeats, recovery and leases compare times written by different hosts,
    so they stamp and judge them with this one clock, never a host's.
    PostgreSQL's is the server's; SQLite has no server, and its clock is the
    calling process's, which in the embedded mode is the one host's.
    `offset_seconds` moves it.
    """
    offset = float(offset_seconds)
    if isinstance(database.obj, pw.PostgresqlDatabase):
        if epoch:
            return f'(CAST(extract(epoch FROM clock_timestamp()) AS double precision) + {offset!r})'
        return f"(clock_timestamp() AT TIME ZONE 'UTC' + interval '{offset!r} seconds')"
    if epoch:
        return f"((julianday('now') - 2440587.5) * 86400.0 + {offset!r})"
    return f"strftime('%Y-%m-%d %H:%M:%f', 'now', '{offset!r} seconds')"


def database_now():
    """The database's clock now (naive UTC)."""
    value = database.execute_sql(f'SELECT {clock_sql()}').fetchone()[0]
    return value if isinstance(value, datetime.datetime) else pw.format_date_time(value, pw.DateTimeField.formats)


# ---------------------------------------------------------------- database

def open_database(url):
    """A pooled peewee database for a sqlite:/// or postgresql:// URL."""
    if url.startswith('sqlite:'):
        path = mailkit_settings.sqlite_path(url)
        mailkit_settings.make_private_file(path)   # 0600 in a 0700 var/: mail and credentials live here
        # WAL lets the web server read while a worker writes; busy_timeout
        # makes a writer wait for the lock instead of failing with "locked".
        # Transactions begin IMMEDIATE: a deferred one that read first and
        # then writes after another writer committed gets "database is locked"
        # at once, as its snapshot is stale, and no busy timeout helps.
        return PooledSqliteDatabase(
            str(path), max_connections=64, stale_timeout=600, timeout=15, lock_type='IMMEDIATE',
            check_same_thread=False,  # the pool hands a connection to whichever thread asks next
            pragmas={'journal_mode': 'wal', 'synchronous': 'normal',
                     'busy_timeout': 15000, 'foreign_keys': 1,
                     # A sync writes hundreds of MB: checkpoint every 40 MB of WAL,
                     # not every 4 MB, so fewer commits stall on a checkpoint.
                     'wal_autocheckpoint': 10000})
    if url.startswith(('postgres:', 'postgresql:')):
        params = db_url.parse(url)
        return PooledPostgresqlDatabase(
            params.pop('database'), max_connections=64, stale_timeout=300,
            connect_timeout=5, **params)
    raise ValueError(f'unsupported database URL scheme in {url.split(":", 1)[0]!r}; use sqlite:/// or postgresql://')


def init_database(url):
    database.initialize(open_database(url))
    # A forked worker must not reuse its parent's sockets or sqlite handles.
    os.register_at_fork(after_in_child=dispose_connections)
    return database


def dispose_connections():
    if database.obj is not None:
        database.obj.dispose()


def init_credentials(key_source):
    """Give Credential.store where to read the keys it encrypts with, a callable read at each store, so
    a key put in front by rotate-key is used at once. (It can encrypt only: decryption is the workers'.)"""
    global _key_source
    _key_source = key_source


_key_source = None


def check_database():
    """Raise if the database cannot answer a trivial query."""
    with database.connection_context():
        database.execute_sql('SELECT 1')


# ---------------------------------------------------------------- tenant scope

class ScopeError(RuntimeError):
    """Tenant data was touched outside tenant_scope() or all_tenants()."""


_ALL = object()
_scope = contextvars.ContextVar('tenant_scope', default=None)


@contextlib.contextmanager
def tenant_scope(tenant_id):
    token = _scope.set(int(tenant_id))
    try:
        yield
    finally:
        _scope.reset(token)


@contextlib.contextmanager
def all_tenants():
    token = _scope.set(_ALL)
    try:
        yield
    finally:
        _scope.reset(token)


def current_tenant():
    """The scoped tenant id, or None inside all_tenants()."""
    scope = _scope.get()
    if scope is None:
        raise ScopeError('tenant data used outside tenant_scope() or all_tenants()')
    return None if scope is _ALL else scope


class NeverReusedIdField(pw.AutoField):
    """An integer id that is never given to a second row, even after the first is deleted.

    Our ids leave the service (API responses, events, webhooks, clients'
    caches): an old id must never reach different mail. SQLite without
    AUTOINCREMENT numbers a new row max(rowid) + 1, so deleting the newest row
    frees its id for the next insert (sqlite.org/autoinc.html); AUTOINCREMENT
    remembers the highest id ever used in sqlite_sequence. PostgreSQL's SERIAL
    draws from a sequence, which never goes back, so it needs nothing.
    """

    def ddl(self, ctx):
        node = super().ddl(ctx)
        if ctx.state.field_types.get('AUTO') == 'INTEGER':   # SQLite's rendering of an AutoField
            return pw.NodeList((node, pw.SQL('AUTOINCREMENT')))
        return node


class BaseModel(pw.Model):
    id = NeverReusedIdField()   # a model with an id of its own (a task id, a hash) declares it instead

    class Meta:
        database = database
        legacy_table_names = False

    # find() and change() serve the per-request and per-task lookups of the
    # send path, where building each statement with the query builder cost
    # more than running it (0.5 ms of 0.6 ms, cProfile): their SQL is built
    # once per model and column set. On a TenantModel both narrow to the
    # scoped tenant, as select() does.

    @classmethod
    def find(cls, **equals):
        """The first row whose fields equal these values, or None: get_or_none() for equality only."""
        tenant = cls._tenant()
        sql = _find_sql(cls, database.param, tuple(equals), tenant is not None)
        rows = list(cls.raw(sql, *cls._scoped_values(tenant, equals)))
        return rows[0] if rows else None

    @classmethod
    def change(cls, row_id, expect=None, **fields):
        """UPDATE one row by id, only while its fields equal `expect` (a compare-and-set) when given;
        returns the number of rows changed (0: not this tenant's, gone, or no longer as expected)."""
        tenant = cls._tenant()
        where = {'id': row_id, **(expect or {})}
        sql = _change_sql(cls, database.param, tuple(fields), tenant is not None, tuple(where))
        params = [cls._meta.fields[name].db_value(value) for name, value in fields.items()]
        return database.execute_sql(sql, params + cls._scoped_values(tenant, where)).rowcount

    @classmethod
    def _scoped_values(cls, tenant, equals):
        values = [cls._meta.fields[name].db_value(value) for name, value in equals.items()]
        return values if tenant is None else [tenant, *values]

    @classmethod
    def _tenant(cls):
        return None


class TenantModel(BaseModel):
    tenant_id = pw.IntegerField(index=True)

    @classmethod
    def _tenant(cls):
        return current_tenant()

    @classmethod
    def _narrow(cls, query):
        tenant = current_tenant()
        return query if tenant is None else query.where(cls.tenant_id == tenant)

    @classmethod
    def select(cls, *fields):  # get(), get_by_id() and back-references come through here too
        return cls._narrow(super().select(*fields))

    @classmethod
    def update(cls, __data=None, **update):
        return cls._narrow(super().update(__data, **update))

    @classmethod
    def delete(cls):
        return cls._narrow(super().delete())

    def save(self, *args, **kwargs):
        tenant = current_tenant()
        if self.tenant_id is None:
            self.tenant_id = tenant
        elif tenant is not None and self.tenant_id != tenant:
            raise ScopeError(f'refusing to write tenant {self.tenant_id} data inside tenant {tenant} scope')
        return super().save(*args, **kwargs)


def _where(model, param, names, scoped):
    columns = (['tenant_id'] if scoped else []) + [model._meta.fields[name].column_name for name in names]
    return ' AND '.join(f'"{column}" = {param}' for column in columns)


@functools.lru_cache(maxsize=256)
def _find_sql(model, param, names, scoped):
    columns = ', '.join(f'"{field.column_name}"' for field in model._meta.sorted_fields)
    return (f'SELECT {columns} FROM "{model._meta.table_name}" '
            f'WHERE {_where(model, param, names, scoped)} LIMIT 1')


@functools.lru_cache(maxsize=256)
def _change_sql(model, param, names, scoped, where=('id',)):
    sets = ', '.join(f'"{model._meta.fields[name].column_name}" = {param}' for name in names)
    return f'UPDATE "{model._meta.table_name}" SET {sets} WHERE {_where(model, param, where, scoped)}'


# ---------------------------------------------------------------- models

class JSONField(pw.TextField):
    """A JSON document in a text column: Python values in, Python values out."""

    # json.dumps(value, default=str) with its encoder built once (dumps builds one per call
    # when given any option): every task's record and result are written through here.
    _encode = json.JSONEncoder(default=str).encode

    def db_value(self, value):
        return None if value is None else self._encode(value)

    def python_value(self, value):
        return None if value is None else json.loads(value)


class Tenant(BaseModel):
    name = pw.CharField(unique=True, max_length=100)
    created_at = pw.DateTimeField(default=utcnow)


class User(TenantModel):
    name = pw.CharField(max_length=100)
    created_at = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((('tenant_id', 'name'), True),)


def hash_key(key):
    # API keys are 256-bit random tokens, so one SHA-256 is enough: there is
    # nothing to brute-force that a slow password hash would protect.
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKey(BaseModel):
    """A bearer key, stored as its hash; the key itself is shown once."""
    key_hash = pw.CharField(unique=True, max_length=64)
    prefix = pw.CharField(max_length=16)  # enough to recognise a key in a listing
    tenant_id = pw.IntegerField(null=True, index=True)
    user_id = pw.IntegerField(null=True)
    is_operator = pw.BooleanField(default=False)
    created_at = pw.DateTimeField(default=utcnow)
    revoked_at = pw.DateTimeField(null=True)
    last_used_at = pw.DateTimeField(null=True)  # to the minute: see lookup()

    @classmethod
    def issue(cls, tenant_id=None, user_id=None, operator=False):
        """Create a key; returns (row, the key in clear, never stored)."""
        key = 'esk_' + secrets.token_urlsafe(32)
        row = cls.create(key_hash=hash_key(key), prefix=key[:12], tenant_id=tenant_id,
                         user_id=user_id, is_operator=operator)
        return row, key

    @classmethod
    def lookup(cls, key):
        """The live key row for `key`, or None."""
        row = cls.find(key_hash=hash_key(key))
        if row is None or row.revoked_at is not None:
            return None
        now = utcnow()
        # One write a minute per key at most, so a busy client costs no write a request.
        if row.last_used_at is None or now - row.last_used_at > KEY_USE_RESOLUTION:
            cls.change(row.id, last_used_at=now)
        return row


KEY_USE_RESOLUTION = datetime.timedelta(minutes=1)


class EmailClient(TenantModel):
    """One mail account: incoming (IMAP or POP3), outgoing SMTP, sync settings."""
    user_id = pw.IntegerField(index=True)
    email = pw.CharField(max_length=320)
    incoming_protocol = pw.CharField(max_length=8)
    incoming_host = pw.CharField(max_length=255)
    incoming_port = pw.IntegerField()
    incoming_security = pw.CharField(max_length=10)
    incoming_username = pw.CharField(max_length=320)
    smtp_host = pw.CharField(max_length=255, null=True)
    smtp_port = pw.IntegerField(null=True)
    smtp_security = pw.CharField(max_length=10, null=True)
    smtp_username = pw.CharField(max_length=320, null=True)
    sync_enabled = pw.BooleanField(default=True)
    sync_interval = pw.IntegerField(default=300)
    sync_state = pw.CharField(max_length=16, default='idle')  # idle | syncing | error | auth_error
    sync_task_id = pw.CharField(max_length=64, null=True)  # the sync queued or running, if any
    copy_sent = pw.BooleanField(default=True)  # append sent mail to the IMAP Sent folder
    move_spam = pw.BooleanField(default=False)  # move mail scored as spam to Junk on the server
    push = pw.BooleanField(default=True)  # a watcher holds IMAP IDLE on INBOX, where the server offers it
    last_sync_at = pw.DateTimeField(null=True)
    last_error = pw.TextField(null=True)
    created_at = pw.DateTimeField(default=utcnow)
    updated_at = pw.DateTimeField(default=utcnow)
    # When periodic sync takes the account next: interval after a success, a doubling
    # backoff after failures in a row, never (None) after a rejected login until the
    # credentials change.
    next_sync_at = pw.DateTimeField(null=True, default=utcnow, index=True)
    failures = pw.IntegerField(default=0)
    sync_since = pw.DateField(null=True)   # mail that arrived before this day is not fetched (IMAP only)

    @classmethod
    def ids_of_user(cls, user_id):
        """The ids of a user's accounts, as a subquery."""
        return cls.select(cls.id).where(cls.user_id == user_id)

    def delete_instance(self, *args, **kwargs):
        """Delete the account with its folders and mail (the database cascades), announced by one
        account.deleted: an application following the feed drops what it holds of the account, rather
        than reading a message.deleted for every message and a folder.deleted for every folder."""
        with database.atomic():
            result = super().delete_instance(*args, **kwargs)
            emit('account.deleted', self)
        return result


def sync_since_moved_back(before, after):
    """True if sync_since `after` asks for mail that `before` left on the server (None: all mail)."""
    return before is not None and (after is None or after < before)


class Credential(TenantModel):
    """An account password, Fernet-encrypted; `kind` is incoming or smtp."""
    client = pw.ForeignKeyField(EmailClient, backref='credentials', on_delete='CASCADE')
    kind = pw.CharField(max_length=10)
    secret = pw.TextField()
    updated_at = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((('client', 'kind'), True),)

    def __repr__(self):
        return f'<Credential {self.kind} of client {self.client_id}>'

    @classmethod
    def store(cls, client, kind, password):
        """Keep `password` encrypted as the account's `kind` (incoming, smtp) password, replacing any."""
        secret = Sealer(_key_source()).encrypt(password)
        cls.insert(tenant_id=client.tenant_id, client=client.id, kind=kind, secret=secret, updated_at=utcnow()) \
            .on_conflict(conflict_target=[cls.client, cls.kind],
                         update={cls.secret: pw.EXCLUDED.secret, cls.updated_at: pw.EXCLUDED.updated_at}).execute()

    @classmethod
    def forget(cls, client, kind=None):
        """Drop the account's stored passwords (of one kind, or all)."""
        query = cls.delete().where(cls.client == client.id)
        return (query if kind is None else query.where(cls.kind == kind)).execute()


class TaskRecord(TenantModel):
    """The ledger: one row per task id, the source of GET /api/v1/tasks; written by taskq.ledger only."""
    id = pw.CharField(primary_key=True, max_length=64)
    tenant_id = pw.IntegerField(null=True)  # None: the service's own periodic work
    user_id = pw.IntegerField(null=True)
    name = pw.CharField(max_length=64)
    state = pw.CharField(max_length=10)  # taskq.ledger.TASK_STATES
    priority = pw.IntegerField(default=0)
    attempts = pw.IntegerField(default=0)
    retries_left = pw.IntegerField(default=0)
    enqueued_at = pw.DateTimeField(default=utcnow, index=True)
    started_at = pw.DateTimeField(null=True)
    finished_at = pw.DateTimeField(null=True, index=True)
    next_retry_at = pw.DateTimeField(null=True)
    worker = pw.CharField(max_length=100, null=True)
    progress_done = pw.IntegerField(null=True)
    progress_total = pw.IntegerField(null=True)
    result = JSONField(null=True)
    error = pw.TextField(null=True)
    traceback = pw.TextField(null=True)
    request_id = pw.CharField(max_length=64, null=True)
    args = JSONField(default=dict)
    stop_requested_at = pw.DateTimeField(null=True)  # a person asked a running task to stop
    history = pw.TextField(null=True)  # JSON lines, appended: earlier attempts, people's actions

    class Meta:
        # Each filter of the task history walks its own (column, enqueued_at)
        # index newest first, so a page costs the same at any depth; they
        # replace the single-column indexes, so the hot path keeps its index count.
        indexes = ((('state', 'enqueued_at'), False), (('tenant_id', 'enqueued_at'), False),
                   (('name', 'enqueued_at'), False))

    def to_dict(self):
        return {
            'task_id': self.id, 'name': self.name, 'state': self.state,
            'attempts': self.attempts, 'priority': self.priority,
            'tenant_id': self.tenant_id, 'user_id': self.user_id,
            'enqueued_at': iso(self.enqueued_at), 'started_at': iso(self.started_at),
            'finished_at': iso(self.finished_at), 'next_retry_at': iso(self.next_retry_at),
            'worker': self.worker,
            'progress': ({'done': self.progress_done, 'total': self.progress_total}
                         if self.progress_total is not None else None),
            'result': self.result, 'error': self.error, 'request_id': self.request_id, 'args': self.args,
        }


class ConsumerHeartbeat(BaseModel):
    """One row per worker process; `last_seen` moves while it lives."""
    id = pw.CharField(primary_key=True, max_length=100)  # host:pid of the worker
    host = pw.CharField(max_length=100)
    pid = pw.IntegerField()
    consumer_pid = pw.IntegerField()
    started_at = pw.DateTimeField(default=utcnow)
    last_seen = pw.DateTimeField(default=utcnow, index=True)
    tasks_done = pw.IntegerField(default=0)
    current_task = pw.CharField(max_length=64, null=True)
    rss_kb = pw.IntegerField(null=True)


class WatchLease(BaseModel):
    """Which watcher holds IDLE on an account, until when (the database's clock), and how it goes."""
    client = pw.ForeignKeyField(EmailClient, primary_key=True, on_delete='CASCADE')
    holder = pw.CharField(max_length=100, index=True)  # host:pid:random of the watcher
    # Seconds since the epoch by the database's clock, renewed while the holder lives. Double: FloatField
    # is REAL on PostgreSQL, whose 24-bit mantissa rounds epoch seconds to 128 s steps.
    expires = pw.DoubleField()
    state = pw.CharField(max_length=16, default='connecting')  # connecting | idling | backoff | auth_error | ...
    detail = pw.TextField(null=True)  # the last failure, as tasks.error_text words it


class WatcherBeat(BaseModel):
    """A live watcher: how many there are sets each one's fair share of the accounts."""
    id = pw.CharField(primary_key=True, max_length=100)  # the holder name its leases carry
    expires = pw.DoubleField()  # as WatchLease.expires: the database's clock, renewed at each beat


class DashboardSession(BaseModel):
    """A signed-in dashboard visitor; the cookie holds a random token, the row its hash."""
    id = pw.CharField(primary_key=True, max_length=64)  # hash_key(token)
    key_id = pw.IntegerField()
    created_at = pw.DateTimeField(default=utcnow)
    expires_at = pw.DateTimeField(index=True)


class TaskRollup(BaseModel):
    """Tasks that finished in one minute, by final state, for everyone ('all') or one user ('u<id>').

    Written by the dashboard for closed minutes, so its charts and counts read
    a few thousand rows whatever the depth of the ledger.
    """
    scope = pw.CharField(max_length=24)
    minute = pw.IntegerField()  # minutes since the epoch, UTC
    state = pw.CharField(max_length=10)
    count = pw.IntegerField()

    class Meta:
        indexes = ((('scope', 'minute', 'state'), True),)


class Blob(BaseModel):
    """Bytes (raw messages, attachments, uploads), addressed by tenant and content.

    Not a TenantModel: a blob is reached only through a tenant's message,
    attachment or upload row. Its id is the SHA-256 of the tenant and the
    content (blob_id), so a tenant's copies are stored once but two tenants
    never share a row: a shared row let one tenant's delete erase another's
    upload (issue 13), and told a tenant whether another already held a file.
    Rows from before that change (plain SHA-256 ids) stay valid: nothing
    recomputes an id, and drop_unreferenced_blobs counts every tenant's rows.
    """
    id = pw.CharField(primary_key=True, max_length=64)
    data = pw.BlobField()
    size = pw.IntegerField()

    @classmethod
    def content(cls, blob_id):
        return bytes(cls.get_by_id(blob_id).data)  # PostgreSQL hands back a memoryview


class MetricTotal(BaseModel):
    """A counter of /metrics rolled up from the ledger: key is the metric and its labels, tab-separated.

    The row 'watermark' holds the finished_at (epoch seconds) up to which the
    ledger is counted in; records finished later are counted live at each
    scrape (taskq/metrics.py says why).
    """
    key = pw.CharField(primary_key=True, max_length=200)
    value = pw.DoubleField(default=0)


class EmailFolder(TenantModel):
    """A mailbox folder and the IMAP state that makes the next sync incremental."""
    client = pw.ForeignKeyField(EmailClient, backref='folders', on_delete='CASCADE')
    name = pw.CharField(max_length=1000)         # decoded for people
    raw_name = pw.CharField(max_length=1000)     # as the server names it (modified UTF-7)
    role = pw.CharField(max_length=10, null=True)
    uidvalidity = pw.BigIntegerField(null=True)
    # Every UID below this is stored (or was skipped); None while a first sync or a reconciliation
    # fills the folder newest first, when no such bound holds: the next sync reconciles again.
    uidnext = pw.BigIntegerField(null=True)
    highestmodseq = pw.BigIntegerField(null=True)
    last_synced_at = pw.DateTimeField(null=True)
    sync_since = pw.DateField(null=True)         # the account's sync_since when the folder was last filled

    class Meta:
        indexes = ((('client', 'raw_name'), True),)

    def save(self, *args, **kwargs):
        """A new folder is announced (folder.created) in the transaction that stores it."""
        if self.id is not None and not kwargs.get('force_insert'):
            return super().save(*args, **kwargs)
        with database.atomic():
            result = super().save(*args, **kwargs)
            self.announce('folder.created')
        return result

    def delete_instance(self, *args, **kwargs):
        with database.atomic():
            result = super().delete_instance(*args, **kwargs)
            self.announce('folder.deleted')
        return result

    def announce(self, type_):
        account = EmailClient.find(id=self.client_id)
        if account is not None:
            emit(type_, account, {'folder_id': self.id, 'name': self.name, 'role': self.role})

    @classmethod
    def by_role(cls, client_id, role):
        """The account's folder with `role` (inbox, sent, trash, junk, ...), or None."""
        return cls.find(client=client_id, role=role)


class EmailMessage(TenantModel):
    client = pw.ForeignKeyField(EmailClient, backref='messages', on_delete='CASCADE')
    folder = pw.ForeignKeyField(EmailFolder, backref='messages', on_delete='CASCADE')
    uid = pw.BigIntegerField(null=True)          # IMAP UID within the folder's UIDVALIDITY
    pop3_uid = pw.CharField(max_length=255, null=True)  # POP3 UIDL
    message_id = pw.CharField(max_length=1000, null=True, index=True)
    subject = pw.TextField(default='')
    from_name = pw.TextField(default='')
    from_addr = pw.CharField(max_length=320, default='', index=True)
    to_addrs = JSONField(default=list)           # [[name, address], ...]
    cc_addrs = JSONField(default=list)
    reply_to = JSONField(default=list)
    date = pw.DateTimeField(null=True, index=True)
    in_reply_to = pw.TextField(null=True)
    references = JSONField(default=list)
    flags = pw.TextField(default='')             # space-separated IMAP flags
    is_read = pw.BooleanField(default=False)
    is_flagged = pw.BooleanField(default=False)
    size = pw.IntegerField(default=0)
    snippet = pw.TextField(default='')
    text = pw.TextField(null=True)
    html = pw.TextField(null=True)
    headers = JSONField(default=list)            # [[name, value], ...]
    blob = pw.CharField(max_length=64)           # Blob id of the raw RFC 822 bytes
    parse_error = pw.TextField(null=True)
    is_deleted = pw.BooleanField(default=False)
    created_at = pw.DateTimeField(default=utcnow)
    is_spam = pw.BooleanField(null=True)          # None until scored
    spam_score = pw.FloatField(null=True)
    spam_indicators = JSONField(null=True)        # list of indicator codes

    class Meta:
        indexes = ((('folder', 'uid'), True), (('folder', 'pop3_uid'), True), (('client', 'date'), False))


class Attachment(TenantModel):
    message = pw.ForeignKeyField(EmailMessage, backref='attachments', on_delete='CASCADE')
    filename = pw.TextField(null=True)
    content_type = pw.CharField(max_length=255)
    content_id = pw.TextField(null=True)
    disposition = pw.CharField(max_length=20, null=True)
    size = pw.IntegerField()
    blob = pw.CharField(max_length=64)


class Upload(TenantModel):
    """A file uploaded for sending, referenced by send_email's attachment_ids."""
    user_id = pw.IntegerField(index=True)
    filename = pw.TextField()
    content_type = pw.CharField(max_length=255)
    size = pw.IntegerField()
    blob = pw.CharField(max_length=64)
    created_at = pw.DateTimeField(default=utcnow)


class Outbox(TenantModel):
    """One row per accepted send: its Message-ID and how far delivery got.

    accepting (an Idempotency-Key request until its task is queued) -> queued
    -> sending (the message is about to get its end-of-data mark) -> sent | failed | unknown;
    sending -> queued when the transaction surely failed (a retry may send).
    A retry that finds `sent` returns the stored result; one that finds
    `sending` cannot know whether the server took the message, and refuses
    to send it again (state `unknown`) rather than risk a duplicate.
    `attempt` counts the runs that took the row to `sending`; every move is a
    compare-and-set on (state, attempt) (tasks.py, send and outbox).
    """
    client = pw.ForeignKeyField(EmailClient, on_delete='CASCADE')
    user_id = pw.IntegerField()
    task_id = pw.CharField(max_length=64, unique=True)
    idempotency_key = pw.CharField(max_length=255, null=True)
    request_hash = pw.CharField(max_length=64, null=True)  # of the request that used the key
    message_id = pw.CharField(max_length=255)
    state = pw.CharField(max_length=10, default='queued')
    attempt = pw.IntegerField(default=0)
    recipients = JSONField(default=list)
    refused = JSONField(default=dict)
    error = pw.TextField(null=True)
    created_at = pw.DateTimeField(default=utcnow)
    sent_at = pw.DateTimeField(null=True)

    class Meta:
        indexes = ((('tenant_id', 'user_id', 'idempotency_key'), True),)


class SpamLearning(TenantModel):
    """A tenant's spam reports, as the additive delta it scores with on top of the base model."""
    tenant_id = pw.IntegerField(unique=True)
    data = JSONField(default=dict)
    updated_at = pw.DateTimeField(default=utcnow)


class NeverReusedBigIdField(NeverReusedIdField, pw.BigAutoField):
    """NeverReusedIdField as a 64-bit id: event ids are cursors and webhook-id headers, and the feed
    writes many more rows than any other table."""


EVENT_TYPES = ('message.created', 'message.updated', 'message.deleted', 'folder.created', 'folder.deleted',
               'send.succeeded', 'send.failed', 'send.unknown', 'account.sync_failed', 'account.auth_error',
               'account.recovered', 'account.deleted', 'task.dead')
EVENT_PREFIX = 'evt_'


class Event(TenantModel):
    """The change feed: one row per change, written in the transaction of the change (see emit())."""
    id = NeverReusedBigIdField()
    tenant_id = pw.IntegerField(null=True)     # None: the service's own work (a periodic task's task.dead)
    user_id = pw.IntegerField(null=True)       # the account's owner: whose key and webhooks see the event
    account_id = pw.IntegerField(null=True)
    type = pw.CharField(max_length=40)
    created_at = pw.DateTimeField(default=utcnow, index=True)
    data = JSONField(default=dict)

    class Meta:
        indexes = ((('user_id', 'id'), False), (('tenant_id', 'id'), False))

    @property
    def public_id(self):
        return event_id_text(self.id)

    def to_dict(self):
        """The event as the API lists it and a webhook delivers it (its body)."""
        return {'id': self.public_id, 'type': self.type, 'created_at': iso(self.created_at),
                'account_id': self.account_id, 'data': self.data}


def event_id_text(number):
    return f'{EVENT_PREFIX}{number}'


def event_id_number(text):
    """The row id of an event id ('evt_123'), or None when `text` is not one of ours."""
    digits = text[len(EVENT_PREFIX):] if isinstance(text, str) and text.startswith(EVENT_PREFIX) else ''
    return int(digits) if digits.isdigit() and len(digits) <= 18 else None


class EventRetention(BaseModel):
    """One row: the highest event id retention has deleted. A cursor below it has missed events (410)."""
    pruned_through = pw.BigIntegerField(default=0)


class Webhook(TenantModel):
    """A user's webhook endpoint: where its events are POSTed, signed (Standard Webhooks), in order.

    `cursor` is the id of the last event delivered (or passed over as not
    wanted); `secret` and `previous_secret` are Fernet-sealed like account
    passwords, and only the tasks layer opens them. Delivery state: a run
    claims the endpoint with a lease (`lease_owner`, `lease_until`), so one
    delivers at a time and order holds; `wanted_at` says a run is queued.
    """
    id = NeverReusedBigIdField()
    user_id = pw.IntegerField(index=True)
    url = pw.CharField(max_length=2000)
    events = JSONField(default=list)            # types delivered; [] means every type
    enabled = pw.BooleanField(default=True)
    secret = pw.TextField()
    previous_secret = pw.TextField(null=True)   # still signs until previous_secret_until (rotation)
    previous_secret_until = pw.DateTimeField(null=True)
    cursor = pw.BigIntegerField(default=0)
    failures = pw.IntegerField(default=0)        # failed attempts in a row
    failing_since = pw.DateTimeField(null=True)
    last_error = pw.TextField(null=True)
    disabled_reason = pw.TextField(null=True)
    next_attempt_at = pw.DateTimeField(null=True)
    wanted_at = pw.DateTimeField(null=True)
    lease_owner = pw.CharField(max_length=64, null=True)
    lease_until = pw.DateTimeField(null=True)
    created_at = pw.DateTimeField(default=utcnow)
    updated_at = pw.DateTimeField(default=utcnow)

    @classmethod
    def seal(cls, secret):
        """`secret` encrypted as account passwords are: the web process can seal, never open."""
        return Sealer(_key_source()).encrypt(secret)


class WebhookDelivery(TenantModel):
    """One attempt to deliver one event to one endpoint: the delivery log."""
    id = NeverReusedBigIdField()
    webhook_id = pw.BigIntegerField()
    event_id = pw.BigIntegerField()
    event_type = pw.CharField(max_length=40)
    attempt = pw.IntegerField()
    status = pw.CharField(max_length=10)          # succeeded | failed
    response_code = pw.IntegerField(null=True)
    error = pw.TextField(null=True)
    duration_ms = pw.IntegerField(null=True)
    redelivery = pw.BooleanField(default=False)
    created_at = pw.DateTimeField(default=utcnow, index=True)

    class Meta:
        indexes = ((('webhook_id', 'id'), False),)

    def to_dict(self):
        return {'id': self.id, 'webhook_id': self.webhook_id, 'event_id': event_id_text(self.event_id),
                'event_type': self.event_type, 'attempt': self.attempt, 'status': self.status,
                'response_code': self.response_code, 'error': self.error, 'duration_ms': self.duration_ms,
                'redelivery': self.redelivery, 'created_at': iso(self.created_at)}


def iso(value):
    return value.isoformat(timespec='milliseconds') + 'Z' if value else None


MODELS = (Tenant, User, ApiKey, EmailClient, Credential, TaskRecord, ConsumerHeartbeat, WatchLease, WatcherBeat,
          DashboardSession, TaskRollup, MetricTotal, Blob, EmailFolder, EmailMessage, Attachment, Upload, Outbox, SpamLearning,
          Event, EventRetention, Webhook, WebhookDelivery)


# ---------------------------------------------------------------- writes that survive a lost connection

def with_reconnect(operation):
    """Run a one-statement write; after a lost connection, once more on a fresh one."""
    try:
        return operation()
    except (pw.OperationalError, pw.InterfaceError):
        if database.in_transaction():
            raise
        database.close()  # a server restart leaves the pooled socket dead
        return operation()


# ---------------------------------------------------------------- change feed
#
# A transactional outbox: emit() appends events inside the transaction of the
# change they describe, so an event exists exactly when its change committed.
# Readers (GET /api/v1/events, webhook delivery) page by event id, so ids must
# become visible in id order: SQLite has one writer at a time (transactions
# begin IMMEDIATE); PostgreSQL takes a transaction-level advisory lock before
# the insert, so event-writing transactions commit in the order they took ids
# (a reader past id 12 can never later find a committed 11). Callers emit last
# in their transaction, so the lock is held only up to the commit (and no row
# lock is taken while holding it, which could deadlock with a writer waiting for it).
#
# Whoever must act on new events (webhook deliveries) hears of them from
# on_events_committed, once the transaction that wrote them commits: not
# before (a reader would not see them yet), and not only when the task ends
# (a long sync's first messages would wait for its last).

EVENT_WRITER_LOCK = 0x656d61696c   # any fixed number; 'email' in hex
_committed_listeners = []


def on_events_committed(listener):
    """Call `listener({(tenant_id, user_id)})` in the committing thread after each commit of a transaction
    that emitted events for that owner; a transaction rolled back calls nothing."""
    _committed_listeners.append(listener)


def announce_committed(owner):
    for listener in _committed_listeners:
        try:
            listener({owner})
        except Exception:   # the transaction has committed: its caller must not be told it failed
            logger.warning('after-commit listener %s failed for events of %s', listener.__name__, owner,
                           exc_info=True)


def emit(type_, account=None, data=None, **owner):
    """Append one event of `type_` about `account` (an EmailClient) or an explicit tenant_id/user_id/account_id."""
    emit_many(type_, [data or {}], account, **owner)


def emit_many(type_, datas, account=None, tenant_id=None, user_id=None, account_id=None):
    """Append one event per item of `datas`, in order, in the caller's transaction (or one of its own)."""
    if not datas:
        return
    if type_ not in EVENT_TYPES:
        raise ValueError(f'unknown event type {type_!r}')
    if account is not None:
        tenant_id, user_id, account_id = account.tenant_id, account.user_id, account.id
    now = utcnow()
    rows = [{'tenant_id': tenant_id, 'user_id': user_id, 'account_id': account_id, 'type': type_,
             'created_at': now, 'data': data} for data in datas]
    with database.atomic():
        if not isinstance(database.obj, pw.SqliteDatabase):
            database.execute_sql('SELECT pg_advisory_xact_lock(%s)', (EVENT_WRITER_LOCK,))
        bulk_insert(Event, rows)
        database.after_commit(functools.partial(announce_committed, (tenant_id, user_id)))


def last_event_id():
    """The highest event id so far, of any tenant (0 when none): where a new webhook starts."""
    return database.execute_sql('SELECT MAX(id) FROM event').fetchone()[0] or 0


def pruned_through():
    """The highest event id retention has deleted (0: none yet). A cursor below it has missed events."""
    row = EventRetention.get_or_none(EventRetention.id == 1)
    return row.pruned_through if row else 0


def prune_events(cutoff, log_cutoff=None):
    """Delete events created before `cutoff` and delivery log rows before `log_cutoff` (default: the same)."""
    with all_tenants(), database.atomic():
        through = Event.select(pw.fn.MAX(Event.id)).where(Event.created_at < cutoff).scalar()
        removed = Event.delete().where(Event.id <= through).execute() if through else 0
        if through:
            EventRetention.insert(id=1, pruned_through=through).on_conflict(
                conflict_target=[EventRetention.id],
                update={EventRetention.pruned_through: pw.fn.MAX(EventRetention.pruned_through, through)
                        if isinstance(database.obj, pw.SqliteDatabase)
                        else pw.fn.GREATEST(EventRetention.pruned_through, through)}).execute()
        deliveries = WebhookDelivery.delete().where(WebhookDelivery.created_at < (log_cutoff or cutoff)).execute()
    return {'events_removed': removed, 'deliveries_removed': deliveries}


def emit_message_events(type_, rows, **extra):
    """Emit `type_` for messages given as (id, folder id, client id) tuples, with `extra` data each."""
    by_client = {}
    for message_id, folder_id, client_id in rows:
        by_client.setdefault(client_id, []).append(dict(extra, message_id=message_id, folder_id=folder_id))
    for client_id, datas in by_client.items():
        account = EmailClient.find(id=client_id)
        if account is not None:   # None: the account is being deleted with its mail
            emit_many(type_, datas, account)


def emit_outbox(outbox, state, error=None):
    """In the transaction that moves a send to `state`: send.succeeded, send.failed or send.unknown, once."""
    type_ = {'sent': 'send.succeeded', 'failed': 'send.failed', 'unknown': 'send.unknown'}.get(state)
    if type_ is None or outbox.state == state:
        return
    data = {'task_id': outbox.task_id, 'internet_message_id': outbox.message_id}
    if state != 'sent':
        data['error'] = error or outbox.error
    emit(type_, tenant_id=outbox.tenant_id, user_id=outbox.user_id, account_id=outbox.client_id, data=data)


def emit_sync_end(client, state, error_code):
    """In the transaction that records how a sync ended: a failure, a rejected login, or a recovery."""
    if state == 'error':
        emit('account.sync_failed', client, {'error_code': error_code, 'failures': client.failures + 1})
    elif state == 'auth_error':
        emit('account.auth_error', client, {'error_code': error_code})
    elif client.failures or client.sync_state in ('error', 'auth_error'):
        emit('account.recovered', client, {'after_failures': client.failures})


# ---------------------------------------------------------------- mail storage
#
# Sync writes a batch of messages in one transaction, together with the
# folder's new uidnext, so a sync killed midway resumes after the last
# committed batch; (folder, uid) is unique, so a batch written twice stores
# each message once.

def blob_id(tenant_id, data):
    """The tenant's blob id for `data`: still 64 hex digits, never equal to another tenant's."""
    return hashlib.sha256(b'emailsvc-blob\0%d\0' % tenant_id + data).hexdigest()


def store_blobs(datas, tenant_id=None):
    """Store each distinct content once per tenant (default: the scoped one); returns their ids in order."""
    tenant_id = current_tenant() if tenant_id is None else tenant_id
    if tenant_id is None:
        raise ScopeError('store_blobs inside all_tenants() needs a tenant_id')
    ids = [blob_id(tenant_id, d) for d in datas]
    rows = {i: {'id': i, 'data': d, 'size': len(d)} for i, d in zip(ids, datas)}
    existing = set()
    for chunk in chunks(list(rows), 500):
        existing |= {b.id for b in Blob.select(Blob.id).where(Blob.id.in_(chunk))}
    bulk_insert(Blob, [row for i, row in rows.items() if i not in existing], ignore_conflicts=True)
    return ids


def bulk_insert(model, rows, ignore_conflicts=False):
    """Insert many rows with one single-row statement, every column given (defaults filled in).

    Not insert_many: it takes its columns from the first row (a row missing a
    key blanked that column for the whole chunk), costs as much to build as to
    run, and each chunk size is a new statement that sqlite3's cache keeps,
    with its last bound blobs, alive (100 MB in a worker after a large sync).
    """
    if not rows:
        return
    fields = [f for f in model._meta.sorted_fields if not isinstance(f, pw.AutoField)]
    sqlite = isinstance(database.obj, pw.SqliteDatabase)
    sql = _bulk_sql(model, tuple(f.column_name for f in fields), ignore_conflicts, sqlite)
    params = [tuple(f.db_value(row[f.name] if f.name in row else field_default(f)) for f in fields)
              for row in rows]
    if sqlite:
        database.cursor().executemany(sql, params)
    else:  # psycopg2's executemany is a round trip a row; execute_values sends pages of rows
        psycopg2.extras.execute_values(database.cursor(), sql, params, page_size=100)


def field_default(field):
    return field.default() if callable(field.default) else field.default


@functools.lru_cache(maxsize=32)
def _bulk_sql(model, columns, ignore_conflicts, sqlite):
    names = ', '.join(f'"{c}"' for c in columns)
    values = f'({", ".join("?" * len(columns))})' if sqlite else '%s'  # execute_values fills in the rows
    conflict = f' ON CONFLICT ("{model._meta.primary_key.column_name}") DO NOTHING' if ignore_conflicts else ''
    return f'INSERT INTO "{model._meta.table_name}" ({names}) VALUES {values}{conflict}'


def chunks(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def store_messages(folder, items, key='uid', uidnext=None):
    """Insert new messages of one folder with their attachments; returns how many were new.

    `items` are dicts of EmailMessage fields plus 'raw' (bytes) and
    'attachments' (mime.Attachment list); `key` is 'uid' (IMAP) or 'pop3_uid'.
    """
    field = getattr(EmailMessage, key)
    with database.atomic():
        keys = [item[key] for item in items if item[key] is not None]  # no key: nothing to match (Sent copies)
        present = {getattr(m, key) for m in EmailMessage.select(field)
                   .where(EmailMessage.folder == folder.id, field.in_(keys))} if keys else set()
        fresh = [item for item in items if item[key] not in present]
        if fresh:
            raw_ids = store_blobs([item.pop('raw') for item in fresh], folder.tenant_id)
            attachments = [item.pop('attachments') for item in fresh]
            for item, raw_id in zip(fresh, raw_ids):
                item.update(blob=raw_id, folder=folder.id, client=folder.client_id, tenant_id=folder.tenant_id)
            before = database.execute_sql('SELECT MAX(id) FROM email_message').fetchone()[0] or 0
            bulk_insert(EmailMessage, fresh)
            store_attachments(folder, field, fresh, attachments)
        if uidnext is not None:
            EmailFolder.update(uidnext=uidnext).where(EmailFolder.id == folder.id).execute()
        if fresh:   # last in the transaction (see emit_many); ids above `before` in this folder are the new rows
            emit_message_events('message.created', EmailMessage.select(
                EmailMessage.id, EmailMessage.folder, EmailMessage.client).where(
                EmailMessage.folder == folder.id, EmailMessage.id > before).order_by(EmailMessage.id).tuples())
    return len(fresh)


def store_attachments(folder, field, messages, attachments):
    if not any(attachments):
        return
    ids = dict(EmailMessage.select(field, EmailMessage.id)
               .where(EmailMessage.folder == folder.id, field.in_([m[field.name] for m in messages])).tuples())
    blob_ids = iter(store_blobs([a.data for parts in attachments for a in parts], folder.tenant_id))
    rows = [{'message': ids[message[field.name]], 'filename': a.filename, 'content_type': a.content_type,
             'content_id': a.content_id, 'disposition': a.disposition, 'size': len(a.data),
             'blob': next(blob_ids), 'tenant_id': folder.tenant_id}
            for message, parts in zip(messages, attachments) for a in parts]
    bulk_insert(Attachment, rows)


def delete_messages(query):
    """Delete the messages `query` selects, with their attachments; returns how many."""
    rows = list(query.select(EmailMessage.id, EmailMessage.folder, EmailMessage.client).tuples())
    for chunk in chunks(rows, 500):
        with database.atomic():
            remove_messages([row[0] for row in chunk])
            emit_message_events('message.deleted', chunk)
    return len(rows)


def remove_messages(ids):
    """Delete these message rows and their attachments' rows (no event: the caller emits)."""
    if ids:
        Attachment.delete().where(Attachment.message.in_(ids)).execute()
        EmailMessage.delete().where(EmailMessage.id.in_(ids)).execute()


def delete_uids(folder, uids):
    """Delete the folder's messages with these UIDs (expunged on the server); returns how many."""
    return sum(delete_messages(EmailMessage.select().where(EmailMessage.folder == folder.id,
                                                           EmailMessage.uid.in_(chunk)))
               for chunk in chunks(sorted(uids), 500))


def forget_messages(messages, permanent, moved=None):
    """After a delete on the server; returns how many were deleted.

    Permanent drops the rows (and unreferenced blobs). Soft: a message in
    `moved` ({id: (folder id, UID)}) follows its move in place, keeping its id;
    {id: None} was in Trash already and stays; any other is marked deleted
    until the next sync sees it in Trash.
    """
    moved = moved or {}
    ids = [m.id for m in messages]
    if not permanent:
        hidden = [i for i in ids if i not in moved]
        places = {i: place for i, place in moved.items() if place is not None}
        return move_in_place(places) + sum(hide_messages(chunk) for chunk in chunks(hidden, 500))
    blobs = {m.blob for m in messages} | {a.blob for a in Attachment.select(Attachment.blob)
                                           .where(Attachment.message.in_(ids))}
    count = delete_messages(EmailMessage.select().where(EmailMessage.id.in_(ids)))
    drop_unreferenced_blobs(blobs)
    return count


def hide_messages(ids):
    """Mark messages deleted until the next sync finds them in Trash; returns how many were visible."""
    with database.atomic():
        rows = list(EmailMessage.select(EmailMessage.id, EmailMessage.folder, EmailMessage.client)
                    .where(EmailMessage.id.in_(ids), EmailMessage.is_deleted == False).tuples())  # noqa: E712
        EmailMessage.update(is_deleted=True).where(EmailMessage.id.in_([row[0] for row in rows])).execute()
        emit_message_events('message.deleted', rows)
    return len(rows)


def move_in_place(places):
    """Give messages their new folder and UID ({id: (folder id, uid)}) after a move on the server.

    A sync that ran between the move and now may have stored the moved message
    as new; that copy goes, so the message is there once, under its old id.
    Returns how many moved.
    """
    with database.atomic():
        copies, moved = [], []
        for message_id, (folder_id, uid) in places.items():
            duplicates = list(EmailMessage.select(EmailMessage.id, EmailMessage.folder, EmailMessage.client).where(
                EmailMessage.folder == folder_id, EmailMessage.uid == uid, EmailMessage.id != message_id).tuples())
            remove_messages([row[0] for row in duplicates])
            copies += duplicates
            before = EmailMessage.select(EmailMessage.folder, EmailMessage.client) \
                .where(EmailMessage.id == message_id).tuples().first()
            EmailMessage.update(folder=folder_id, uid=uid, is_deleted=False).where(EmailMessage.id == message_id) \
                .execute()
            if before is not None:
                moved.append((message_id, folder_id, before))
        # Events after every row write of the transaction (see emit_many).
        emit_message_events('message.deleted', copies)
        for message_id, folder_id, (previous_folder_id, client_id) in moved:
            emit_message_events('message.updated', [(message_id, folder_id, client_id)],
                                changes=['folder'], previous_folder_id=previous_folder_id)
    return len(places)


def drop_unreferenced_blobs(blob_ids):
    """Delete those of `blob_ids` that no message, attachment or upload of any tenant refers to.

    Every tenant's rows count: blobs stored before ids included the tenant may
    be shared. The outbox refers to bytes only through uploads (a queued
    send's attachment_ids name Upload rows), so counting uploads covers it.
    """
    with all_tenants():
        for chunk in chunks(list(blob_ids), 500):
            used = {m.blob for m in EmailMessage.select(EmailMessage.blob).where(EmailMessage.blob.in_(chunk))}
            used |= {a.blob for a in Attachment.select(Attachment.blob).where(Attachment.blob.in_(chunk))}
            used |= {u.blob for u in Upload.select(Upload.blob).where(Upload.blob.in_(chunk))}
            Blob.delete().where(Blob.id.in_([b for b in chunk if b not in used])).execute()


def update_flags(folder, flags_by_uid):
    """Apply the server's flags to stored messages; returns how many changed."""
    changed = 0
    account = EmailClient.find(id=folder.client_id)
    for chunk in chunks(list(flags_by_uid), 500):
        with database.atomic():
            stored = EmailMessage.select(EmailMessage.id, EmailMessage.uid, EmailMessage.flags) \
                .where(EmailMessage.folder == folder.id, EmailMessage.uid.in_(chunk))
            updated = []
            for message in stored:
                flags = ' '.join(sorted(flags_by_uid[message.uid]))
                if flags != message.flags:
                    EmailMessage.update(**flag_fields(flags_by_uid[message.uid])) \
                        .where(EmailMessage.id == message.id).execute()
                    updated.append({'message_id': message.id, 'folder_id': folder.id, 'changes': ['flags'],
                                    'flags': flags.split()})
            if account is not None:
                emit_many('message.updated', updated, account)   # last in the transaction (see emit_many)
            changed += len(updated)
    return changed


def folder_identities(folder):
    """(id, Message-ID, size, date) of each of the folder's messages: what recognises them under a new UIDVALIDITY."""
    return list(EmailMessage.select(EmailMessage.id, EmailMessage.message_id, EmailMessage.size, EmailMessage.date)
                .where(EmailMessage.folder == folder.id).tuples())


def renumber_folder(folder, uids_by_id, gone_ids, uidvalidity):
    """Give the folder's surviving messages their UIDs under a new UIDVALIDITY and drop the gone ones, in one
    transaction: a reader sees the folder before or after, never emptied. Returns how many were dropped.

    The folder is left without uidnext: the sync that follows reconciles it (fetches what did not match).
    """
    with database.atomic():
        dropped = sum(delete_messages(EmailMessage.select().where(EmailMessage.id.in_(chunk)))
                      for chunk in chunks(list(gone_ids), 500))
        # (folder, uid) is unique and a new UID may be a stale one of another row: clear them all first.
        EmailMessage.update(uid=None).where(EmailMessage.folder == folder.id).execute()
        table = EmailMessage._meta.table_name
        param = database.param
        sql = f'UPDATE "{table}" SET "uid" = {param} WHERE "id" = {param} AND "folder_id" = {param}'
        params = [(uid, message_id, folder.id) for message_id, uid in uids_by_id.items()]
        if isinstance(database.obj, pw.SqliteDatabase):
            database.cursor().executemany(sql, params)
        else:   # a round trip per row otherwise
            psycopg2.extras.execute_batch(database.cursor(), sql, params, page_size=500)
        EmailFolder.update(uidvalidity=uidvalidity, uidnext=None, highestmodseq=None) \
            .where(EmailFolder.id == folder.id).execute()
    return dropped


def message_ids(folder, key, values):
    """Ids of the folder's messages whose `key` (uid or pop3_uid) is in `values`."""
    field = getattr(EmailMessage, key)
    return [m.id for chunk in chunks(list(values), 500)
            for m in EmailMessage.select(EmailMessage.id).where(EmailMessage.folder == folder.id, field.in_(chunk))]


def folder_uids(folder):
    return {uid for (uid,) in EmailMessage.select(EmailMessage.uid)
            .where(EmailMessage.folder == folder.id).tuples()}


def folder_pop3_uids(folder):
    return {uid for (uid,) in EmailMessage.select(EmailMessage.pop3_uid)
            .where(EmailMessage.folder == folder.id).tuples()}


@contextlib.contextmanager
def locked(model, row_id):
    """A transaction holding the row's write lock (SQLite: the database's)."""
    if isinstance(database.obj, pw.SqliteDatabase):   # transactions there begin IMMEDIATE
        with database.atomic():
            yield model.get_by_id(row_id)
    else:
        with database.atomic():
            yield model.select().where(model.id == row_id).for_update().get()


@contextlib.contextmanager
def locked_learning():
    """The scoped tenant's learning row, created if new, locked against a concurrent report."""
    SpamLearning.insert(tenant_id=current_tenant(), data={}).on_conflict_ignore().execute()
    row = SpamLearning.get()
    with locked(SpamLearning, row.id) as locked_row:
        yield locked_row


def due_for_sync(now):
    """Accounts with sync on whose next periodic sync is due, interleaved by tenant so that one
    tenant's many accounts do not queue ahead of every other tenant's."""
    with all_tenants():
        clients = list(EmailClient.select().where(EmailClient.sync_enabled == True,  # noqa: E712
                                                  EmailClient.next_sync_at <= now)
                       .order_by(EmailClient.next_sync_at, EmailClient.id))
    return interleave_by_tenant(clients)


def interleave_by_tenant(clients):
    """A, A, A, B, C -> A, B, C, A, A: each tenant's accounts in their order, tenants taking turns."""
    queues = {}
    for client in clients:
        queues.setdefault(client.tenant_id, []).append(client)
    rounds = itertools.zip_longest(*queues.values())
    return [client for round_ in rounds for client in round_ if client is not None]


def flag_fields(flags):
    return {'flags': ' '.join(sorted(flags)), 'is_read': '\\Seen' in flags, 'is_flagged': '\\Flagged' in flags}


# ---------------------------------------------------------------- migrations
#
# A fresh database gets today's tables and the newest version at once; an
# existing one runs, in order, every migration above its stored version, each
# in its own transaction. A migration never edits an earlier one: a change of
# schema is a new function appended below.

class SchemaVersion(BaseModel):
    version = pw.IntegerField()


MIGRATIONS = []


def migration(version):
    def register(fn):
        assert version == len(MIGRATIONS) + 1, 'migrations are numbered 1, 2, 3, ... in order'
        MIGRATIONS.append(fn)
        return fn
    return register


def missing_columns(migrator, *fields):
    """add_column operations for the fields whose column is not there yet.

    Migration 3 creates its tables from today's models, so a database that
    passed through it already has the columns later versions add to them.
    """
    operations = []
    for field in fields:
        table = field.model._meta.table_name
        if field.column_name not in {c.name for c in database.get_columns(table)}:
            operations.append(migrator.add_column(table, field.column_name, field))
    return operations


@migration(1)
def initial_schema(migrator):
    """Version 1 was created whole; nothing to upgrade to it."""


@migration(2)
def ledger_retry_and_key_use(migrator):
    """Version 2: the ledger shows the next retry, keys show their last use."""
    return [
        migrator.add_column('task_record', 'next_retry_at', TaskRecord.next_retry_at),
        migrator.add_column('task_record', 'retries_left', TaskRecord.retries_left),
        migrator.add_column('api_key', 'last_used_at', ApiKey.last_used_at),
    ]


@migration(3)
def mail_storage(migrator):
    """Version 3: folders, messages, attachments and blobs for sync; the account's running sync."""
    database.create_tables([Blob, EmailFolder, EmailMessage, Attachment])
    return [migrator.add_column('email_client', 'sync_task_id', EmailClient.sync_task_id)]


@migration(4)
def outbox_and_uploads(migrator):
    """Version 4: the send outbox and uploaded attachments; per-account Sent copies."""
    database.create_tables([Upload, Outbox])
    return missing_columns(migrator, EmailClient.copy_sent)


@migration(5)
def spam_verdicts(migrator):
    """Version 5: spam verdicts on messages, per-tenant learning, per-account Junk moves."""
    database.create_tables([SpamLearning])
    return missing_columns(migrator, EmailMessage.is_spam, EmailMessage.spam_score, EmailMessage.spam_indicators,
                           EmailClient.move_spam)


@migration(6)
def dashboard(migrator):
    """Version 6: the dashboard's sessions, rolled-up counts, paging indexes, stop requests and task history;
    heartbeats say what each worker does."""
    database.create_tables([DashboardSession, TaskRollup])
    operations = missing_columns(migrator, TaskRecord.stop_requested_at, TaskRecord.history,
                                 ConsumerHeartbeat.tasks_done, ConsumerHeartbeat.current_task, ConsumerHeartbeat.rss_kb)
    present = {index.name for index in database.get_indexes('task_record')}
    operations += [migrator.drop_index('task_record', f'task_record_{column}')
                   for column in ('state', 'name', 'tenant_id') if f'task_record_{column}' in present]
    operations += [migrator.add_index('task_record', columns) for columns, _ in TaskRecord._meta.indexes
                   if f'task_record_{"_".join(columns)}' not in present]
    return operations


@migration(7)
def accounts_rest_and_keys_remember(migrator):
    """Version 7: periodic sync backs off per failing account; an Idempotency-Key remembers its request."""
    operations = missing_columns(migrator, EmailClient.next_sync_at, EmailClient.failures, Outbox.request_hash)
    pw_migrate.migrate(*operations)
    with all_tenants():
        for client in EmailClient.select(EmailClient.id, EmailClient.last_sync_at, EmailClient.sync_interval):
            due = client.last_sync_at + datetime.timedelta(seconds=client.sync_interval) \
                if client.last_sync_at else utcnow()
            EmailClient.update(next_sync_at=due, failures=0).where(EmailClient.id == client.id).execute()


@migration(8)
def metric_totals(migrator):
    """Version 8: /metrics counters rolled up from the ledger."""
    database.create_tables([MetricTotal])


@migration(9)
def outbox_attempts(migrator):
    """Version 9: the outbox counts attempts, for its compare-and-set moves."""
    return missing_columns(migrator, Outbox.attempt)


@migration(10)
def change_feed_and_webhooks(migrator):
    """Version 10: the change feed (events) and webhook endpoints with their delivery log."""
    database.create_tables([Event, EventRetention, Webhook, WebhookDelivery])


@migration(11)
def ids_never_reused_and_sync_since(migrator):
    """Version 11: no id is ever given twice (SQLite tables rebuilt with AUTOINCREMENT; PostgreSQL's
    sequences never go back); per-account sync_since, and the one each folder was filled under."""
    if isinstance(database.obj, pw.SqliteDatabase):
        for model in MODELS:
            if isinstance(model._meta.primary_key, NeverReusedIdField):
                rebuild_with_autoincrement(model._meta.table_name)
        problems = database.execute_sql('PRAGMA foreign_key_check').fetchall()
        if problems:
            raise RuntimeError(f'foreign keys broken by the rebuild: {problems[:5]}')
    return missing_columns(migrator, EmailClient.sync_since, EmailFolder.sync_since)


SQLITE_PLAIN_ID = '"id" INTEGER NOT NULL PRIMARY KEY'


def rebuild_with_autoincrement(table):
    """Give a SQLite table AUTOINCREMENT, which only CREATE TABLE can: the rebuild of
    sqlite.org/lang_altertable.html#otheralter (new table, copy, drop, rename, indexes), run by
    migrate() with foreign keys off, since dropping the old table would cascade its deletes.

    The stored CREATE statement is reused, so columns added by earlier migrations keep their place.
    sqlite_sequence starts at the highest id copied; an id freed above it before now cannot be known.
    """
    row = database.execute_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
                               (table,)).fetchone()
    if row is None:   # made by a later migration, already with AUTOINCREMENT
        return
    (sql,) = row
    if 'AUTOINCREMENT' in sql.upper():
        return
    if SQLITE_PLAIN_ID not in sql:
        raise RuntimeError(f'{table}: unexpected id column in {sql[:200]!r}')
    indexes = [row[0] for row in database.execute_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL", (table,))]
    rebuilt = f'{table}__rebuilt'
    create = sql.replace(f'CREATE TABLE "{table}"', f'CREATE TABLE "{rebuilt}"', 1)
    database.execute_sql(create.replace(SQLITE_PLAIN_ID, SQLITE_PLAIN_ID + ' AUTOINCREMENT', 1))
    database.execute_sql(f'INSERT INTO "{rebuilt}" SELECT * FROM "{table}"')
    database.execute_sql(f'DROP TABLE "{table}"')
    database.execute_sql(f'ALTER TABLE "{rebuilt}" RENAME TO "{table}"')
    for index in indexes:
        database.execute_sql(index)


@migration(12)
def push_watch(migrator):
    """Version 12: per-account IMAP IDLE push, the watchers' leases on accounts and their beats."""
    database.create_tables([WatchLease, WatcherBeat])
    return missing_columns(migrator, EmailClient.push)


LATEST = len(MIGRATIONS)


def schema_version():
    if not database.table_exists('schema_version'):
        return 0
    row = SchemaVersion.select().order_by(SchemaVersion.version.desc()).first()
    return row.version if row else 0


def migrate():
    """Bring the database to the newest schema; returns (old, new) versions."""
    with database.connection_context():
        old = schema_version()
        if old == 0 and not database.table_exists('tenant'):
            with database.atomic():
                database.create_tables(MODELS + (SchemaVersion,))
                SchemaVersion.create(version=LATEST)
            return 0, LATEST
        migrator = pw_migrate.SchemaMigrator.from_database(database.obj)
        with foreign_keys_off():
            for version in range(old + 1, LATEST + 1):
                with database.atomic():
                    operations = MIGRATIONS[version - 1](migrator) or []
                    pw_migrate.migrate(*operations)
                    SchemaVersion.delete().execute()
                    SchemaVersion.create(version=version)
        return old, LATEST


@contextlib.contextmanager
def foreign_keys_off():
    """SQLite: foreign keys off while migrations run. A table rebuild drops the old table, and with them on
    that drop deletes its rows first, cascading to every row that refers to them; the pragma cannot change
    inside a transaction, so it is set around them. (A migration that rebuilds checks the keys itself.)"""
    sqlite = isinstance(database.obj, pw.SqliteDatabase)
    if sqlite:
        database.execute_sql('PRAGMA foreign_keys = OFF')
    try:
        yield
    finally:
        if sqlite:
            database.execute_sql('PRAGMA foreign_keys = ON')
