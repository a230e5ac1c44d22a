"""The schema as version 1 created it, frozen, to test upgrades in place.

Never edit this to follow models.py: it is what old databases look like.
"""
import datetime

import peewee as pw


def create_v1(db):
    """Create version 1's tables in `db` and stamp it version 1."""
    class Base(pw.Model):
        class Meta:
            database = db
            legacy_table_names = False

    class Tenant(Base):
        name = pw.CharField(unique=True, max_length=100)
        created_at = pw.DateTimeField(default=datetime.datetime.utcnow)

    class User(Base):
        tenant_id = pw.IntegerField(index=True)
        name = pw.CharField(max_length=100)
        created_at = pw.DateTimeField(default=datetime.datetime.utcnow)

        class Meta:
            indexes = ((('tenant_id', 'name'), True),)

    class ApiKey(Base):
        key_hash = pw.CharField(unique=True, max_length=64)
        prefix = pw.CharField(max_length=16)
        tenant_id = pw.IntegerField(null=True, index=True)
        user_id = pw.IntegerField(null=True)
        is_operator = pw.BooleanField(default=False)
        created_at = pw.DateTimeField(default=datetime.datetime.utcnow)
        revoked_at = pw.DateTimeField(null=True)

    class EmailClient(Base):
        tenant_id = pw.IntegerField(index=True)
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
        sync_state = pw.CharField(max_length=16, default='idle')
        last_sync_at = pw.DateTimeField(null=True)
        last_error = pw.TextField(null=True)
        created_at = pw.DateTimeField(default=datetime.datetime.utcnow)
        updated_at = pw.DateTimeField(default=datetime.datetime.utcnow)

    class Credential(Base):
        tenant_id = pw.IntegerField(index=True)
        client = pw.ForeignKeyField(EmailClient, backref='credentials', on_delete='CASCADE')
        kind = pw.CharField(max_length=10)
        secret = pw.TextField()
        updated_at = pw.DateTimeField(default=datetime.datetime.utcnow)

        class Meta:
            indexes = ((('client', 'kind'), True),)

    class TaskRecord(Base):
        id = pw.CharField(primary_key=True, max_length=64)
        tenant_id = pw.IntegerField(null=True, index=True)
        user_id = pw.IntegerField(null=True)
        name = pw.CharField(max_length=64, index=True)
        state = pw.CharField(max_length=10, index=True, default='pending')
        priority = pw.IntegerField(default=0)
        attempts = pw.IntegerField(default=0)
        enqueued_at = pw.DateTimeField(default=datetime.datetime.utcnow, index=True)
        started_at = pw.DateTimeField(null=True)
        finished_at = pw.DateTimeField(null=True, index=True)
        worker = pw.CharField(max_length=100, null=True)
        progress_done = pw.IntegerField(null=True)
        progress_total = pw.IntegerField(null=True)
        result = pw.TextField(null=True)
        error = pw.TextField(null=True)
        traceback = pw.TextField(null=True)
        request_id = pw.CharField(max_length=64, null=True)
        args = pw.TextField(default='{}')

    class ConsumerHeartbeat(Base):
        id = pw.CharField(primary_key=True, max_length=100)
        host = pw.CharField(max_length=100)
        pid = pw.IntegerField()
        consumer_pid = pw.IntegerField()
        started_at = pw.DateTimeField(default=datetime.datetime.utcnow)
        last_seen = pw.DateTimeField(default=datetime.datetime.utcnow, index=True)

    class SchemaVersion(Base):
        version = pw.IntegerField()

    tables = [Tenant, User, ApiKey, EmailClient, Credential, TaskRecord, ConsumerHeartbeat, SchemaVersion]
    db.create_tables(tables)
    SchemaVersion.create(version=1)
    Tenant.create(name='old-tenant')
    TaskRecord.create(id='old-task', name='noop', state='succeeded')
    return tables
