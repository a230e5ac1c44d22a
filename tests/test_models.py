"""Tenant scope, ids and schema migrations."""
import itertools
import threading

import peewee as pw
import pytest

import models
from tests import schema_v1
from tests.conftest import MODE, STATE


@pytest.fixture
def two_tenants(unique):
    ids = []
    for suffix in ('a', 'b'):
        tenant = models.Tenant.create(name=unique + suffix)
        with models.tenant_scope(tenant.id):
            models.EmailClient.create(user_id=1, email=f'{suffix}@example.com', incoming_protocol='imap',
                                      incoming_host='h', incoming_port=993, incoming_security='tls',
                                      incoming_username='u')
        ids.append(tenant.id)
    return ids


def test_tenant_data_outside_any_scope_is_refused():
    with pytest.raises(models.ScopeError):
        models.EmailClient.select().count()
    with pytest.raises(models.ScopeError):
        models.EmailClient.update(sync_interval=1).execute()
    with pytest.raises(models.ScopeError):
        models.EmailClient.delete().execute()


def test_scoped_queries_carry_the_tenant_predicate(two_tenants):
    a, b = two_tenants
    with models.tenant_scope(a):
        sql, params = models.EmailClient.select().sql()
        assert '"tenant_id" = ' in sql and a in params
        assert [c.email for c in models.EmailClient.select()] == ['a@example.com']
        assert models.EmailClient.get_or_none(models.EmailClient.tenant_id == b) is None


def test_update_and_delete_cannot_reach_another_tenant(two_tenants):
    a, b = two_tenants
    with models.tenant_scope(a):
        models.EmailClient.update(sync_interval=999).execute()
        models.EmailClient.delete().where(models.EmailClient.email == 'b@example.com').execute()
    with models.tenant_scope(b):
        client = models.EmailClient.get()
        assert (client.email, client.sync_interval) == ('b@example.com', 300)


def test_saving_another_tenants_row_is_refused(two_tenants):
    a, b = two_tenants
    with models.tenant_scope(b):
        client = models.EmailClient.get()
    with models.tenant_scope(a), pytest.raises(models.ScopeError):
        client.save()


def test_all_tenants_sees_everything(two_tenants):
    with models.all_tenants():
        emails = {c.email for c in models.EmailClient.select().where(models.EmailClient.tenant_id.in_(two_tenants))}
    assert emails == {'a@example.com', 'b@example.com'}


def test_find_and_change_stay_inside_the_tenant(two_tenants):
    a, b = two_tenants
    with models.tenant_scope(b):
        theirs = models.EmailClient.get()
    with models.tenant_scope(a):
        mine = models.EmailClient.find(email='a@example.com')
        assert mine.email == 'a@example.com' and mine.created_at is not None   # typed, as get() gives
        assert models.EmailClient.find(id=theirs.id) is None
        assert models.EmailClient.change(theirs.id, sync_interval=1) == 0
        assert models.EmailClient.change(mine.id, sync_interval=7) == 1
    with models.tenant_scope(b):
        assert models.EmailClient.get().sync_interval == 300
    with models.all_tenants():
        assert models.EmailClient.find(id=theirs.id).email == 'b@example.com'
        assert models.EmailClient.get_by_id(mine.id).sync_interval == 7


def test_a_transaction_that_read_first_still_writes_after_a_concurrent_commit(two_tenants):
    """SQLite: a deferred transaction that read, then writes after another writer committed,
    fails at once with "database is locked" (its snapshot is stale; no busy timeout helps).
    Transactions there begin IMMEDIATE, so the other writer waits instead."""
    a, b = two_tenants
    read, other_committed, errors = threading.Event(), threading.Event(), []

    def other_writer():
        read.wait(10)
        try:
            with models.tenant_scope(b):
                models.EmailClient.update(sync_interval=11).execute()
            other_committed.set()
        except Exception as exc:   # reported by the assertion below
            errors.append(exc)
        finally:
            models.database.close()

    thread = threading.Thread(target=other_writer)
    thread.start()
    with models.tenant_scope(a), models.database.atomic():
        assert models.EmailClient.select().count() == 1
        read.set()
        # Deferred, the other write commits now; IMMEDIATE, it waits for us (and this times out).
        other_committed.wait(1)
        models.EmailClient.update(sync_interval=12).execute()
    thread.join(20)
    assert errors == [] and other_committed.is_set()
    with models.all_tenants():
        assert sorted(c.sync_interval for c in models.EmailClient.select().where(
            models.EmailClient.tenant_id.in_(two_tenants))) == [11, 12]


def integer_id_tables():
    return [m._meta.table_name for m in models.MODELS if isinstance(m._meta.primary_key, models.NeverReusedIdField)]


def ids_never_reused(db, table):
    """The schema promises it: SQLite's AUTOINCREMENT, or a PostgreSQL sequence as the id's default."""
    if isinstance(db, pw.SqliteDatabase):
        (sql,) = db.execute_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
        return 'AUTOINCREMENT' in sql
    (default,) = db.execute_sql("SELECT column_default FROM information_schema.columns "
                                "WHERE table_name = %s AND column_name = 'id'", (table,)).fetchone()
    return (default or '').startswith('nextval(')


def test_every_integer_id_is_never_given_twice_by_the_schema():
    tables = integer_id_tables()
    assert {'email_message', 'email_folder', 'email_client', 'attachment', 'upload', 'outbox'} <= set(tables)
    assert [t for t in tables if not ids_never_reused(models.database.obj, t)] == []


def test_the_id_of_a_deleted_newest_row_is_not_given_again(unique):
    """SQLite without AUTOINCREMENT gave the next row max(id) + 1: the id a client still held for the
    message just deleted would have reached the next one stored."""
    tenant = models.Tenant.create(name=unique)
    made = itertools.count()
    with models.tenant_scope(tenant.id):
        client = models.EmailClient.create(user_id=1, email='a@example.com', incoming_protocol='imap',
                                           incoming_host='h', incoming_port=993, incoming_security='tls',
                                           incoming_username='u')
        folder = models.EmailFolder.create(client=client.id, name='INBOX', raw_name='INBOX')
        message = models.EmailMessage.create(client=client.id, folder=folder.id, blob='0' * 64)
        makers = {
            models.EmailClient: lambda: models.EmailClient.create(
                user_id=1, email='b@example.com', incoming_protocol='imap', incoming_host='h', incoming_port=993,
                incoming_security='tls', incoming_username='u'),
            models.EmailFolder: lambda: models.EmailFolder.create(client=client.id, name='f',
                                                                  raw_name=f'f{next(made)}'),
            models.EmailMessage: lambda: models.EmailMessage.create(client=client.id, folder=folder.id, blob='0' * 64),
            models.Attachment: lambda: models.Attachment.create(message=message.id, content_type='text/plain', size=1,
                                                                blob='0' * 64),
            models.Upload: lambda: models.Upload.create(user_id=1, filename='a', content_type='text/plain', size=1,
                                                        blob='0' * 64),
            models.Outbox: lambda: models.Outbox.create(client=client.id, user_id=1, task_id=f'{unique}-{next(made)}',
                                                        message_id='<m@x>'),
            models.User: lambda: models.User.create(name=f'u{next(made)}'),
        }
        for model, make in makers.items():
            newest = make()
            newest.delete_instance()
            assert make().id > newest.id, model.__name__
    newest = models.Tenant.create(name=unique + '-gone')
    newest.delete_instance()
    assert models.Tenant.create(name=unique + '-next').id > newest.id


def fresh_database(name):
    if MODE == 'scaleout':
        return models.open_database(STATE['postgres'].create_database(name))
    return models.open_database(f'sqlite:///{STATE["workdir"]}/{name}.db')


def columns(db):
    return {table: sorted(c.name for c in db.get_columns(table)) for table in db.get_tables()}


def test_a_version_1_database_upgrades_in_place(unique):
    old_db, new_db = fresh_database(f'v1_{unique}'), fresh_database(f'new_{unique}')
    v1 = {model.__name__: model for model in schema_v1.create_v1(old_db)}
    old_client = v1['EmailClient'].create(tenant_id=1, user_id=1, email='a@example.com', incoming_protocol='imap',
                                          incoming_host='h', incoming_port=993, incoming_security='tls',
                                          incoming_username='u')
    v1['Credential'].create(tenant_id=1, client=old_client.id, kind='incoming', secret='s')
    original = models.database.obj
    try:
        models.database.initialize(old_db)
        assert models.migrate() == (1, models.LATEST)
        assert models.migrate() == (models.LATEST, models.LATEST)  # a second run changes nothing
        models.database.initialize(new_db)
        assert models.migrate() == (0, models.LATEST)
        assert columns(old_db) == columns(new_db)
        models.database.initialize(old_db)
        with models.all_tenants():
            old_task = models.TaskRecord.get_by_id('old-task')
        assert (old_task.state, old_task.retries_left, old_task.next_retry_at) == ('succeeded', 0, None)
        assert models.Tenant.get(models.Tenant.name == 'old-tenant')
        # Version 11 rebuilt the SQLite tables of version 1 with AUTOINCREMENT, keeping their rows (dropping
        # email_client with foreign keys on would have cascaded to its credentials).
        with models.all_tenants():
            assert models.Credential.get(models.Credential.client == old_client.id).secret == 's'
        assert [t for t in integer_id_tables() if not ids_never_reused(old_db, t)] == []
        newest = models.Tenant.create(name='newest')
        newest.delete_instance()
        assert models.Tenant.create(name='next').id > newest.id
    finally:
        models.database.initialize(original)
        old_db.close()
        new_db.close()


def test_the_database_clock_reads_the_same_as_a_timestamp_and_as_epoch_seconds():
    import datetime
    row = models.database.execute_sql(f'SELECT {models.clock_sql()}, {models.clock_sql(epoch=True)}, '
                                      f'{models.clock_sql(-30, epoch=True)}, {models.clock_sql(-30)}').fetchone()
    stamp, seconds, earlier_seconds, earlier_stamp = row
    as_time = [value if isinstance(value, datetime.datetime) else pw.format_date_time(value, pw.DateTimeField.formats)
               for value in (stamp, earlier_stamp)]
    epoch = [t.replace(tzinfo=datetime.timezone.utc).timestamp() for t in as_time]   # naive UTC
    assert abs(epoch[0] - seconds) < 0.5 and abs(epoch[1] - earlier_seconds) < 0.5
    assert abs(seconds - earlier_seconds - 30) < 0.5
    assert abs(seconds - datetime.datetime.now(datetime.timezone.utc).timestamp()) < 5   # one host here
