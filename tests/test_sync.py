"""sync_emails and periodic_sync against the private Dovecot, and the read API."""
import datetime
import email.utils
import imaplib
import json
import os
import signal
import wsgiref.util
import io

import pytest

import models
import tasks
from taskq import ledger
from mailkit import imap
from tests.conftest import CORPUS, STATE, assert_api_error, every_page, record, wait_for, wait_for_state

PASSWORD = 'dove-pw-1'


def message(n, subject=None, sender='Ann Example <ann@example.org>', body='hello', extra=b''):
    return (f'From: {sender}\r\nTo: Bob <bob@example.com>\r\nSubject: {subject or f"message {n}"}\r\n'
            f'Date: {email.utils.format_datetime(email.utils.localtime())}\r\n'
            f'Message-ID: <m{n}.{os.urandom(3).hex()}@example.org>\r\n').encode() + extra + \
        f'\r\n{body} {n}\r\n'.encode()


WITH_ATTACHMENT = (b'From: =?utf-8?q?J=C3=BCrgen?= <j@example.de>\r\nTo: bob@example.com\r\n'
                   b'Subject: =?utf-8?b?R3LDvMOfZQ==?=\r\nMIME-Version: 1.0\r\n'
                   b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
                   b'Content-Type: text/plain; charset=utf-8\r\n\r\nsee attached\r\n--b1\r\n'
                   b'Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n'
                   b'Content-Disposition: attachment; filename*=UTF-8\'\'../b%C3%A9r.pdf\r\n\r\n'
                   b'JVBERi0xLjQKJcOkw7w=\r\n--b1--\r\n')


class Mailbox:
    """A Dovecot user, reached directly over IMAP to change things behind the service's back."""

    def __init__(self, dovecot, user):
        self.dovecot, self.user = dovecot, user
        dovecot.add_user(user, PASSWORD)

    def session(self):
        return imap.ImapSession(self.dovecot.host, self.dovecot.imap_port, 'none', self.user, PASSWORD)

    def append(self, *raws, folder='INBOX', flags=()):
        with self.session() as s:
            raw_name = s.create_folder(folder) if folder != 'INBOX' else folder
            return [s.append(raw_name, raw, flags) for raw in raws]

    def change(self, folder, action):
        with self.session() as s:
            s.select(folder, readonly=False)
            action(s)


@pytest.fixture
def mailbox(unique):
    return Mailbox(STATE['dovecot'], unique)


@pytest.fixture
def user(client, make_key, unique):
    api = client.as_key(make_key(unique))
    api.ids = tuple(getattr(models.ApiKey.lookup(api.key), f) for f in ('tenant_id', 'user_id'))
    return api


def add_account(api, mailbox, protocol='imap', security='none', port=None, password=PASSWORD, **extra):
    dovecot = mailbox.dovecot
    port = port or {('imap', 'none'): dovecot.imap_port, ('imap', 'starttls'): dovecot.imap_port,
                    ('imap', 'tls'): dovecot.imaps_port, ('pop3', 'none'): dovecot.pop3_port,
                    ('pop3', 'starttls'): dovecot.pop3_port, ('pop3', 'tls'): dovecot.pop3s_port}[protocol, security]
    resp = api.post('/api/v1/accounts', {
        'email': f'{mailbox.user}@example.com',
        'incoming': {'protocol': protocol, 'host': '127.0.0.1', 'port': port, 'security': security,
                     'username': mailbox.user, 'password': password}, **extra})
    assert resp.status == 201, resp.text
    FIRST_SYNC[resp.json['id']] = resp.json['sync_task_id']
    return resp.json['id']


FIRST_SYNC = {}   # account id -> the sync its creation started, until a test's sync() takes it


def first_sync_settled(task_id):
    """Let an account's first sync end (or wait for a retry), so what a test does next starts from a known state."""
    wait_for_state(task_id, 'succeeded', 'failed', 'dead', 'retrying', timeout=60)


def sync(api, account_id, state='succeeded', timeout=60, **body):
    """Sync and wait for `state`; the first call after add_account waits for the sync creation started."""
    task_id = None if body else FIRST_SYNC.pop(account_id, None)
    if task_id is None:
        resp = api.post(f'/api/v1/accounts/{account_id}/sync', body)
        assert resp.status == 202, resp.text
        task_id = resp.json['task_id']
    row = wait_for_state(task_id, state, timeout=timeout)
    return row.result if row.result else row


def messages(api, **filters):
    query = '&'.join(f'{k}={v}' for k, v in filters.items())
    resp = api.get(f'/api/v1/messages?limit=500&{query}')
    assert resp.status == 200, resp.text
    return resp.json['items']


@pytest.mark.parametrize('protocol, security', [('imap', 'none'), ('imap', 'starttls'), ('imap', 'tls'),
                                                ('pop3', 'none'), ('pop3', 'starttls'), ('pop3', 'tls')])
def test_first_sync_over_each_protocol_and_security(user, mailbox, consumer, protocol, security):
    mailbox.append(message(1), message(2), WITH_ATTACHMENT)
    account = add_account(user, mailbox, protocol, security)
    result = sync(user, account)
    assert (result['status'], result['messages_synced'], result['messages_updated'],
            result['messages_deleted']) == ('success', 3, 0, 0)
    assert result['sync_duration_seconds'] >= 0 and result['timestamp'] > 1_700_000_000_000
    subjects = sorted(m['subject'] for m in messages(user, account_id=account))
    assert subjects == ['Grüße', 'message 1', 'message 2']
    assert user.get(f'/api/v1/accounts/{account}').json['sync_state'] == 'idle'


def test_folders_have_roles_and_counts(user, mailbox, consumer):
    mailbox.append(message(1), message(2))
    mailbox.append(message(3), folder='Sent', flags=(r'\Seen',))
    account = add_account(user, mailbox)
    sync(user, account)
    folders = {f['name']: f for f in user.get(f'/api/v1/accounts/{account}/folders').json['items']}
    assert {name: f['role'] for name, f in folders.items()}.items() >= {
        'INBOX': 'inbox', 'Sent': 'sent', 'Trash': 'trash', 'Junk': 'junk', 'Drafts': 'drafts',
        'Archive': 'archive'}.items()
    assert (folders['INBOX']['total'], folders['INBOX']['unread']) == (2, 2)
    assert (folders['Sent']['total'], folders['Sent']['unread']) == (1, 0)


def test_non_ascii_folder_name_is_decoded(user, mailbox, consumer):
    mailbox.append(message(1), folder='Entwürfe.日本')
    account = add_account(user, mailbox)
    sync(user, account)
    names = [f['name'] for f in user.get(f'/api/v1/accounts/{account}/folders').json['items']]
    assert 'Entwürfe.日本' in names


def test_incremental_sync_fetches_only_new_mail(user, mailbox, consumer):
    mailbox.append(*(message(n) for n in range(3)))
    account = add_account(user, mailbox)
    assert sync(user, account)['messages_synced'] == 3
    assert sync(user, account)['messages_synced'] == 0
    mailbox.append(message(3), message(4))
    assert sync(user, account)['messages_synced'] == 2
    uids = [m['uid'] for m in messages(user, account_id=account)]
    assert len(uids) == 5 == len(set(uids))


def test_flag_change_is_picked_up(user, mailbox, consumer):
    uids = mailbox.append(message(1), message(2))
    account = add_account(user, mailbox)
    sync(user, account)
    mailbox.change('INBOX', lambda s: s.store_flags([uids[0]], add=[r'\Seen', r'\Flagged']))
    assert sync(user, account)['messages_updated'] == 1
    by_uid = {m['uid']: m for m in messages(user, account_id=account)}
    assert by_uid[uids[0]]['is_read'] and by_uid[uids[0]]['is_flagged'] and not by_uid[uids[1]]['is_read']
    assert [m['uid'] for m in messages(user, account_id=account, unread='true')] == [uids[1]]
    assert [m['uid'] for m in messages(user, account_id=account, flagged='true')] == [uids[0]]


def test_server_side_deletion_is_counted_and_removed(user, mailbox, consumer):
    uids = mailbox.append(message(1), message(2), message(3))
    account = add_account(user, mailbox)
    sync(user, account)
    mailbox.change('INBOX', lambda s: s.expunge_uids([uids[1]]))
    result = sync(user, account)
    assert result['messages_deleted'] == 1 and result['messages_synced'] == 0
    assert sorted(m['uid'] for m in messages(user, account_id=account)) == [uids[0], uids[2]]


def test_uidvalidity_change_resyncs_without_duplicates_or_orphans(user, mailbox, consumer):
    mailbox.append(message(1), message(2), message(3), folder='Projects')
    account = add_account(user, mailbox)
    sync(user, account)

    def recreate(s):
        s.conn.close()
        s.conn.state = 'AUTH'
        s.conn.delete('Projects')
        s.create_folder('Projects')
    mailbox.change('Projects', recreate)
    mailbox.append(message(7), message(8), folder='Projects')
    result = sync(user, account)
    assert result['messages_deleted'] == 3 and result['messages_synced'] == 2
    folder = next(f for f in user.get(f'/api/v1/accounts/{account}/folders').json['items'] if f['name'] == 'Projects')
    assert sorted(m['subject'] for m in messages(user, folder_id=folder['id'])) == ['message 7', 'message 8']
    with models.all_tenants():
        assert models.Attachment.select().join(models.EmailMessage, models.pw.JOIN.LEFT_OUTER).where(
            models.EmailMessage.id.is_null()).count() == 0


def test_folder_id_limits_the_sync_and_force_full_sync_fetches_what_is_missing(user, mailbox, consumer):
    mailbox.append(message(1))
    account = add_account(user, mailbox)
    sync(user, account)
    mailbox.append(message(2))
    mailbox.append(message(3), folder='Archive')
    archive = next(f for f in user.get(f'/api/v1/accounts/{account}/folders').json['items'] if f['role'] == 'archive')
    assert sync(user, account, folder_id=archive['id'])['messages_synced'] == 1
    result = sync(user, account, force_full_sync=True)
    assert (result['messages_synced'], result['messages_deleted']) == (1, 0)
    assert len(messages(user, account_id=account)) == 3


def test_pop3_fetches_each_message_once_and_notices_deletions(user, mailbox, consumer):
    mailbox.append(message(1), message(2))
    account = add_account(user, mailbox, 'pop3')
    assert sync(user, account)['messages_synced'] == 2
    assert sync(user, account)['messages_synced'] == 0
    mailbox.append(message(3))
    uids = [m['uid'] for m in messages(user, account_id=account)]
    assert uids == [None, None]
    mailbox.change('INBOX', lambda s: s.expunge_uids(s.uids()[:1]))
    result = sync(user, account)
    assert (result['messages_synced'], result['messages_deleted']) == (1, 1)


def test_rejected_login_fails_at_once_and_marks_the_account(user, mailbox, consumer):
    account = add_account(user, mailbox, password='wrong-password')
    row = sync(user, account, state='failed')
    assert row.attempts == 1 and 'AuthenticationFailed' in row.error and 'wrong-password' not in row.error
    body = user.get(f'/api/v1/accounts/{account}').json
    assert body['sync_state'] == 'auth_error' and body['last_error']


def test_refused_connection_is_retried_with_backoff(user, mailbox, consumer):
    from tests import services
    account = add_account(user, mailbox, port=services.free_port())
    row = sync(user, account, state='retrying')
    assert 'TemporaryMailError' in row.error and row.next_retry_at is not None
    assert user.get(f'/api/v1/accounts/{account}').json['sync_state'] == 'error'
    tasks.huey.revoke_by_id(row.id)
    ledger.update(row.id, state=ledger.REVOKED)


def test_second_sync_request_answers_with_the_queued_task(user, mailbox, consumer):
    mailbox.append(message(1))
    account = add_account(user, mailbox)
    consumer.stop()
    try:
        first = user.post(f'/api/v1/accounts/{account}/sync').json
        second = user.post(f'/api/v1/accounts/{account}/sync').json
        assert second['task_id'] == first['task_id'] and second['status'] == 'pending'
    finally:
        consumer.start()
    wait_for_state(first['task_id'], 'succeeded')
    assert user.post(f'/api/v1/accounts/{account}/sync').json['task_id'] != first['task_id']


def test_sync_of_unknown_folder_or_bad_body_is_refused(user, mailbox):
    account = add_account(user, mailbox)
    assert_api_error(user.post(f'/api/v1/accounts/{account}/sync', {'folder_id': 999999}), 404, 'not_found')
    assert_api_error(user.post(f'/api/v1/accounts/{account}/sync', {'force_full_sync': 'yes'}), 422,
                     'validation_failed')


def test_interrupted_sync_resumes_from_the_last_committed_batch(user, mailbox, consumer):
    raws = [message(n, body='x' * 2000) for n in range(1200)]
    with mailbox.session() as s:
        for raw in raws:
            s.append('INBOX', raw)
    account = add_account(user, mailbox)
    task_id = FIRST_SYNC.pop(account)   # creating the account started the sync this test interrupts
    running = wait_for(lambda: (r := record(task_id)) and (r.progress_done or 0) >= 100 and r, timeout=30,
                       interval=0.005, message='the sync to commit a few batches')
    os.kill(int(running.worker.split(':')[1]), signal.SIGKILL)
    stored = stored_count(account)
    assert 0 < stored < 1200 and stored % 50 == 0, stored  # whole batches only
    # Recovery runs the same task again once the dead worker's grace is over.
    row = wait_for_state(task_id, 'succeeded', timeout=60)
    result = row.result
    assert row.attempts >= 2 and result['messages_synced'] <= 1200 - stored
    with models.all_tenants():
        uids = [m.uid for m in models.EmailMessage.select().where(models.EmailMessage.client == account)]
    assert len(uids) == 1200 == len(set(uids))


def stored_count(account):
    with models.all_tenants():
        return models.EmailMessage.select().where(models.EmailMessage.client == account).count()


def test_progress_is_reported_while_syncing(user, mailbox, consumer):
    mailbox.append(*(message(n) for n in range(120)))
    account = add_account(user, mailbox)
    task_id = user.post(f'/api/v1/accounts/{account}/sync').json['task_id']
    row = wait_for_state(task_id, 'succeeded')
    assert user.get(f'/api/v1/tasks/{task_id}').json['progress'] == {'done': 120, 'total': 120}
    assert row.progress_total == 120


def test_periodic_sync_queues_due_accounts_and_skips_syncing_ones(user, mailbox, consumer):
    account = add_account(user, mailbox)   # its first sync has run: due again after its interval
    with models.all_tenants():
        models.EmailClient.update(sync_enabled=False).where(models.EmailClient.id != account).execute()
        assert tasks.periodic_sync.task_class.func()['task_ids'] == []
    consumer.stop()
    due = models.utcnow() + datetime.timedelta(seconds=301)
    try:
        with models.all_tenants():
            first = tasks.periodic_sync.task_class.func(now=due)['task_ids']
            second = tasks.periodic_sync.task_class.func(now=due)['task_ids']
        assert len(first) == 1 and second == [], [(record(t).args, record(t).state) for t in first + second]
        assert record(first[0]).args and record(first[0]).args['email_client_id'] == account
    finally:
        consumer.start()
    wait_for_state(first[0], 'succeeded')
    with models.all_tenants():
        assert tasks.periodic_sync.task_class.func()['task_ids'] == []  # synced just now: not due
        later = models.utcnow() + datetime.timedelta(seconds=301)
        assert len(tasks.periodic_sync.task_class.func(now=later)['task_ids']) == 1


# ---------------------------------------------------------------- read API

def test_message_detail_raw_and_attachment_download(user, mailbox, consumer):
    mailbox.append(WITH_ATTACHMENT)
    account = add_account(user, mailbox)
    sync(user, account)
    (summary,) = messages(user, account_id=account)
    assert summary['from'] == {'name': 'Jürgen', 'address': 'j@example.de'}
    detail = user.get(f'/api/v1/messages/{summary["id"]}').json
    assert detail['text'].strip() == 'see attached'
    (attachment,) = detail['attachments']
    assert (attachment['filename'], attachment['content_type'], attachment['size']) == ('../bér.pdf', 'application/pdf', 14)
    raw = user.get(f'/api/v1/messages/{summary["id"]}/raw')
    assert raw.headers['Content-Type'] == 'message/rfc822' and raw.body == WITH_ATTACHMENT
    download = user.get(f'/api/v1/messages/{summary["id"]}/attachments/{attachment["id"]}')
    assert download.headers['Content-Type'] == 'application/pdf' and download.body.startswith(b'%PDF-1.4')
    assert download.headers['Content-Disposition'] == \
        'attachment; filename="b_r.pdf"; filename*=UTF-8\'\'b%C3%A9r.pdf'


def test_message_filters_and_cursor_paging(user, mailbox, consumer):
    mailbox.append(*(message(n, sender=f'S{n} <s{n % 3}@example.org>') for n in range(7)),
                   message(99, subject='Quarterly invoice'))
    account = add_account(user, mailbox)
    sync(user, account)
    assert [m['subject'] for m in messages(user, account_id=account, q='invoice')] == ['Quarterly invoice']
    assert len(messages(user, account_id=account, **{'from': 's1@example.org'})) == 2
    assert messages(user, account_id=account, since='2999-01-01T00:00:00Z') == []
    assert len(messages(user, account_id=account, until='2999-01-01T00:00:00Z')) == 8
    seen = every_page(user, f'/api/v1/messages?account_id={account}&limit=3', 'id')
    assert len(seen) == 8 == len(set(seen))
    assert_api_error(user.get('/api/v1/messages?unread=maybe'), 422, 'invalid_filter')


def test_other_tenants_messages_are_404(user, mailbox, consumer, client, make_key, unique):
    mailbox.append(WITH_ATTACHMENT)
    account = add_account(user, mailbox)
    sync(user, account)
    (summary,) = messages(user, account_id=account)
    mallory = client.as_key(make_key(unique + 'x', 'mallory'))
    for path in (f'/api/v1/messages/{summary["id"]}', f'/api/v1/messages/{summary["id"]}/raw',
                 f'/api/v1/accounts/{account}/folders', f'/api/v1/accounts/{account}/sync'):
        resp = mallory.post(path) if path.endswith('sync') else mallory.get(path)
        assert_api_error(resp, 404, 'not_found')
    assert mallory.get(f'/api/v1/messages?account_id={account}').json['items'] == []


def wsgi_get(path, key):
    """Call the app in this process, so its queries can be counted."""
    import emailsvc
    environ = {'REQUEST_METHOD': 'GET', 'PATH_INFO': path.split('?')[0],
               'QUERY_STRING': path.partition('?')[2], 'HTTP_AUTHORIZATION': f'Bearer {key}',
               'wsgi.input': io.BytesIO()}
    wsgiref.util.setup_testing_defaults(environ)
    statuses = []
    body = b''.join(emailsvc.app(environ, lambda status, headers, exc_info=None: statuses.append(status)))
    return statuses[0], json.loads(body)


def count_queries(call):
    db = models.database.obj
    original, seen = db.execute_sql, []

    def counting(sql, params=None):
        seen.append(sql)
        return original(sql, params)
    db.execute_sql = counting
    try:
        call()
    finally:
        db.execute_sql = original
    return seen


def test_list_endpoints_run_a_constant_number_of_queries(user, mailbox, consumer):
    mailbox.append(*(message(n) for n in range(30)))
    account = add_account(user, mailbox)
    sync(user, account)
    for path in (f'/api/v1/messages?account_id={account}', f'/api/v1/accounts/{account}/folders',
                 '/api/v1/accounts', '/api/v1/tasks'):
        few = count_queries(lambda: wsgi_get(path + ('&' if '?' in path else '?') + 'limit=2', user.key))
        many = count_queries(lambda: wsgi_get(path + ('&' if '?' in path else '?') + 'limit=30', user.key))
        assert len(few) == len(many) <= 4, (path, many)
    sql = ' '.join(count_queries(lambda: wsgi_get(f'/api/v1/messages?account_id={account}', user.key)))
    assert '"tenant_id" = ' in sql


# ---------------------------------------------------------------- parsing never stops a sync

@pytest.mark.skipif(not (CORPUS / 'mime').is_dir(), reason='../shared/corpus/mime is absent')
def test_every_corpus_message_is_stored(unique):
    files = sorted((CORPUS / 'mime').rglob('*.eml'))
    tenant = models.Tenant.create(name=unique)
    with models.tenant_scope(tenant.id):
        client = models.EmailClient.create(user_id=1, email='c@example.com', incoming_protocol='imap',
                                           incoming_host='h', incoming_port=1, incoming_security='none',
                                           incoming_username='u')
        folder = models.EmailFolder.create(client=client.id, name='Corpus', raw_name='Corpus')
        items = [dict(tasks.message_fields(path.read_bytes()), uid=n + 1) for n, path in enumerate(files)]
        assert models.store_messages(folder, items, 'uid') == len(files) == 426
        stored = models.EmailMessage.select().where(models.EmailMessage.folder == folder.id)
        assert stored.count() == 426
        assert all(isinstance(m.subject, str) for m in stored)
        raw = models.Blob.content(stored.order_by(models.EmailMessage.uid).first().blob)
        assert raw == files[0].read_bytes()


def test_an_unparsed_message_does_not_blank_its_neighbours(unique, monkeypatch):
    tenant = models.Tenant.create(name=unique)
    raws = [message(n) for n in range(3)]
    real_parse = tasks.mime.parse

    def parse_failing_first(raw):
        if raw is raws[0]:
            raise tasks.mime.ParseError('cannot parse this one')
        return real_parse(raw)
    monkeypatch.setattr(tasks.mime, 'parse', parse_failing_first)
    with models.tenant_scope(tenant.id):
        client = models.EmailClient.create(user_id=1, email='c@example.com', incoming_protocol='imap',
                                           incoming_host='h', incoming_port=1, incoming_security='none',
                                           incoming_username='u')
        folder = models.EmailFolder.create(client=client.id, name='F', raw_name='F')
        items = [dict(tasks.message_fields(raw), uid=n + 1) for n, raw in enumerate(raws)]
        assert models.store_messages(folder, items, 'uid') == 3
        rows = list(models.EmailMessage.select().where(models.EmailMessage.folder == folder.id)
                    .order_by(models.EmailMessage.uid))
    assert rows[0].parse_error == 'cannot parse this one' and rows[0].subject == ''
    assert [r.subject for r in rows[1:]] == ['message 1', 'message 2']
    assert all(r.message_id and r.date and r.text for r in rows[1:])
