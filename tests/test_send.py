"""send_email against the real aiosmtpd server: structure, retries, idempotency, never twice."""
import datetime
import email
import email.policy
import os
import signal

import pytest

import models
import tasks
from taskq import ledger
from tests.conftest import STATE, assert_api_error, record, wait_for, wait_for_state
from tests.test_sync import PASSWORD, Mailbox, first_sync_settled, message, sync, user  # noqa: F401 (fixture)


@pytest.fixture
def smtp_server():
    server = STATE['smtp']
    server.clear()
    return server


@pytest.fixture
def sender(user, unique, smtp_server, consumer):   # its first sync needs a consumer
    """An account with IMAP on the private Dovecot and SMTP (STARTTLS + AUTH) on the test server."""
    mailbox = Mailbox(STATE['dovecot'], unique)
    smtp_server.add_user(unique, PASSWORD)
    resp = user.post('/api/v1/accounts', {
        'email': f'{unique}@example.com',
        'incoming': {'protocol': 'imap', 'host': '127.0.0.1', 'port': mailbox.dovecot.imap_port,
                     'security': 'none', 'username': unique, 'password': PASSWORD},
        'smtp': {'host': '127.0.0.1', 'port': smtp_server.port, 'security': 'starttls',
                 'username': unique, 'password': PASSWORD}})
    assert resp.status == 201, resp.text
    first_sync_settled(resp.json['sync_task_id'])
    user.account, user.mailbox, user.address = resp.json['id'], mailbox, f'{unique}@example.com'
    return user


def send(api, body, state='succeeded', headers=None, timeout=20):
    resp = api.post(f'/api/v1/accounts/{api.account}/send', body, headers=headers)
    assert resp.status == 202, resp.text
    row = wait_for_state(resp.json['task_id'], state, timeout=timeout)
    return resp.json['task_id'], row


MAIL = {'to': ['Bob Example <bob@example.net>'], 'cc': ['carol@example.net'], 'bcc': ['dave@example.net'],
        'subject': 'Grüße, привет, 日本 ✓ ' * 3, 'body_text': 'Hello Bob', 'body_html': '<p>Hello <b>Bob</b></p>'}


def upload(api, data, filename, content_type='application/pdf'):
    resp = api.request('POST', f'/api/v1/attachments?filename={filename}', raw=data,
                       headers={'Content-Type': content_type})
    assert resp.status == 201, resp.text
    return resp.json


def test_sent_message_has_the_right_structure_and_bcc_only_in_the_envelope(sender, smtp_server, consumer):
    attachment = upload(sender, b'%PDF-1.4 fake', 'r%C3%A9sum%C3%A9.pdf')
    task_id, row = send(sender, dict(MAIL, attachment_ids=[attachment['id']]))
    result = row.result
    (received,) = smtp_server.received()
    assert received['mail_from'] == sender.address and received['tls'] and received['login']
    assert sorted(received['rcpt_tos']) == ['bob@example.net', 'carol@example.net', 'dave@example.net']
    parsed = email.message_from_bytes(received['data'], policy=email.policy.default)
    assert 'bcc' not in parsed and b'dave@example.net' not in received['data']
    assert parsed['Subject'] == MAIL['subject'].strip() or parsed['Subject'] == MAIL['subject']
    assert parsed['Message-ID'] == result['message_id'] and parsed['Date']
    assert parsed.get_content_type() == 'multipart/mixed'
    alternative, pdf = parsed.iter_parts()
    assert alternative.get_content_type() == 'multipart/alternative'
    assert [p.get_content_type() for p in alternative.iter_parts()] == ['text/plain', 'text/html']
    assert pdf.get_filename() == 'résumé.pdf' and pdf.get_content() == b'%PDF-1.4 fake'
    assert result['recipients_sent'] == ['bob@example.net', 'carol@example.net', 'dave@example.net']
    assert result['sent_timestamp'] > 1_700_000_000_000


def test_sent_copy_is_on_the_imap_server_and_stored_once(sender, smtp_server, consumer):
    _, row = send(sender, MAIL)
    message_id = row.result['message_id']
    with sender.mailbox.session() as s:
        s.select('Sent')
        copies = [m.raw for m in s.fetch(s.uids())]
    assert len(copies) == 1 and message_id.encode() in copies[0]
    sync(sender, sender.account)
    with models.all_tenants():
        stored = models.EmailMessage.select().where(models.EmailMessage.client == sender.account,
                                                    models.EmailMessage.message_id == message_id.strip('<>'))
        assert stored.count() == 1 and stored.get().folder.role == 'sent'


def test_idempotency_key_replays_the_first_task(sender, smtp_server, consumer):
    key = {'Idempotency-Key': f'k-{os.urandom(4).hex()}'}
    first, _ = send(sender, MAIL, headers=key)
    again = sender.post(f'/api/v1/accounts/{sender.account}/send', MAIL, headers=key)
    assert again.status == 202 and again.json == {'task_id': first, 'status': 'succeeded'}
    assert len(smtp_server.received()) == 1


def test_idempotency_key_with_another_body_is_refused(sender, smtp_server, consumer):
    key = {'Idempotency-Key': f'k-{os.urandom(4).hex()}'}
    send(sender, MAIL, headers=key)
    other = sender.post(f'/api/v1/accounts/{sender.account}/send', dict(MAIL, subject='another'), headers=key)
    assert_api_error(other, 422, 'idempotency_key_reused')
    assert len(smtp_server.received()) == 1


def test_idempotency_key_still_being_accepted_is_409_then_replayed(sender, smtp_server, consumer):
    key = f'k-{os.urandom(4).hex()}'
    first, _ = send(sender, MAIL, headers={'Idempotency-Key': key})
    with models.all_tenants():   # as the row stands between the first request's commit and its enqueue
        models.Outbox.update(state='accepting').where(models.Outbox.task_id == first).execute()
    busy = sender.post(f'/api/v1/accounts/{sender.account}/send', MAIL, headers={'Idempotency-Key': key})
    assert_api_error(busy, 409, 'idempotency_key_in_use')
    with models.all_tenants():
        models.Outbox.update(state='sent').where(models.Outbox.task_id == first).execute()
    again = sender.post(f'/api/v1/accounts/{sender.account}/send', MAIL, headers={'Idempotency-Key': key})
    assert again.status == 202 and again.json['task_id'] == first


def test_idempotency_key_expires(sender, smtp_server, consumer):
    key = {'Idempotency-Key': f'k-{os.urandom(4).hex()}'}
    first, _ = send(sender, MAIL, headers=key)
    with models.all_tenants():   # older than api.idempotency_hours (24)
        models.Outbox.update(created_at=models.utcnow() - datetime.timedelta(hours=25)) \
            .where(models.Outbox.task_id == first).execute()
    second, _ = send(sender, dict(MAIL, subject='a new message under an old key'), headers=key)
    assert second != first and len(smtp_server.received()) == 2


def test_an_accepted_send_and_sync_insert_their_ledger_rows_once(sender, smtp_server, consumer, monkeypatch):
    inserts = []
    execute_sql = models.database.obj.execute_sql
    ledger_insert = ledger._prepared_form(ledger._insert_sql('%s', ledger.RECORD_COLUMNS))[0] \
        if models.database.obj.param == '%s' else None

    def counting(sql, *args, **kwargs):
        # On PostgreSQL the ledger's INSERT runs as a prepared statement: EXECUTE <its name>.
        if sql.startswith('INSERT INTO "task_record"') or ledger_insert and sql.startswith(f'EXECUTE {ledger_insert}'):
            inserts.append(sql)
        return execute_sql(sql, *args, **kwargs)
    monkeypatch.setattr(models.database.obj, 'execute_sql', counting)
    tenant_id, user_id = sender.ids
    with models.tenant_scope(tenant_id):
        client = models.EmailClient.get_by_id(sender.account)
        send_id = tasks.queue_send(client, user_id, {'to': ['bob@example.net'], 'cc': [], 'bcc': [],
                                                        'body_text': 'once', 'attachment_ids': []}, None)
        assert len(inserts) == 1
        sync_id, _, _ = tasks.queue_sync(client, user_id)
        assert len(inserts) == 2
    monkeypatch.undo()
    assert wait_for_state(send_id, 'succeeded').attempts == 1
    wait_for_state(sync_id, 'succeeded', timeout=30)


def test_451_reply_is_retried_then_delivered_once(sender, smtp_server, consumer):
    smtp_server.reply_to_data('451 4.3.0 Try again later')
    resp = sender.post(f'/api/v1/accounts/{sender.account}/send', MAIL)
    retrying = wait_for_state(resp.json['task_id'], 'retrying')
    assert 'answered 451' in retrying.error
    row = wait_for_state(resp.json['task_id'], 'succeeded', timeout=20)
    assert row.attempts == 2 and len(smtp_server.received()) == 1


def test_a_connection_cut_at_data_is_retried_and_delivered_once(sender, smtp_server, consumer):
    smtp_server.cut_during_data('at_data')
    resp = sender.post(f'/api/v1/accounts/{sender.account}/send', MAIL)
    retrying = wait_for_state(resp.json['task_id'], 'retrying')
    assert 'connection failure' in retrying.error and 'DATA' in retrying.error
    row = wait_for_state(resp.json['task_id'], 'succeeded', timeout=20)
    assert row.attempts == 2 and len(smtp_server.received()) == 1


def test_a_worker_keeps_its_smtp_session_between_sends(sender, smtp_server, consumer):
    for n in range(4):
        send(sender, dict(MAIL, subject=f'number {n}'))
    received = smtp_server.received()
    assert len(received) == 4
    assert len({m['peer'] for m in received}) <= 2   # two workers: at most one connection each


def test_sessions_the_server_closed_are_replaced_without_a_retry(sender, smtp_server, consumer):
    for n in range(4):
        send(sender, dict(MAIL, subject=f'before {n}'))
    smtp_server.restart()   # every kept session is now closed
    rows = [send(sender, dict(MAIL, subject=f'after {n}'))[1] for n in range(4)]
    assert [row.attempts for row in rows] == [1, 1, 1, 1]
    assert len(smtp_server.received()) == 8


def test_550_reply_fails_at_once(sender, smtp_server, consumer):
    smtp_server.reply_to_data('550 5.7.1 Rejected')
    _, row = send(sender, MAIL, state='failed')
    assert row.attempts == 1 and '550' in row.error and smtp_server.received() == []


def test_a_refused_recipient_is_listed_and_the_rest_receive(sender, smtp_server, consumer):
    smtp_server.script_replies(rcpt={'carol@example.net': '550 5.1.1 No such user'})
    _, row = send(sender, MAIL)
    result = row.result
    assert result['recipients_sent'] == ['bob@example.net', 'dave@example.net']
    assert list(result['recipients_refused']) == ['carol@example.net']
    assert sorted(smtp_server.received()[0]['rcpt_tos']) == ['bob@example.net', 'dave@example.net']


def test_crash_after_the_servers_250_never_sends_twice(sender, smtp_server, consumer):
    workers = consumer.worker_pids()
    smtp_server.freeze_after_data(workers)  # SIGSTOP before the 250 leaves the server
    resp = sender.post(f'/api/v1/accounts/{sender.account}/send', MAIL)
    wait_for(lambda: len(smtp_server.received()) == 1, message='the server to take the message')
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: len(set(consumer.worker_pids()) - set(workers)) >= 2, timeout=20,
             message='the consumer to replace its workers')
    task_id = resp.json['task_id']
    with models.all_tenants():
        assert models.Outbox.get(models.Outbox.task_id == task_id).state == 'sending'
    # Whatever runs the task again (a retry, a re-enqueue, recovery) finds the outbox mid-send.
    row = record(task_id)
    task = tasks.send_email.s(**row.args, id=task_id)
    tasks.huey.enqueue(task)
    row = wait_for_state(task_id, 'failed')
    assert 'not sent again' in row.error
    assert len(smtp_server.received()) == 1


def test_upload_limits_and_unknown_attachments(sender, client, make_key, unique, smtp_server):
    big = b'x' * (1024 * 1024 + 1)
    resp = sender.request('POST', '/api/v1/attachments?filename=big.bin', raw=big)
    assert_api_error(resp, 413, 'too_large')
    form = (b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="../../notes.txt"\r\n'
            b'Content-Type: text/plain\r\n\r\nhello\r\n--XyZ--\r\n')
    resp = sender.request('POST', '/api/v1/attachments', raw=form,
                          headers={'Content-Type': 'multipart/form-data; boundary=XyZ'})
    assert resp.status == 201 and resp.json['filename'] == 'notes.txt' and resp.json['size'] == 5, resp.text
    theirs = upload(client.as_key(make_key(unique + 'z', 'zed')), b'theirs', 'x.pdf')
    resp = sender.post(f'/api/v1/accounts/{sender.account}/send',
                       dict(MAIL, attachment_ids=[resp.json['id'], theirs['id'], 999999]))
    assert_api_error(resp, 422, 'unknown_attachments')
    assert resp.json['fields']['attachment_ids'] == sorted([theirs['id'], 999999])
    assert smtp_server.received() == []


@pytest.mark.parametrize('change, field', [
    ({'to': ['not an address']}, 'to[0]'),
    ({'to': [], 'cc': [], 'bcc': []}, 'to'),
    ({'cc': 'x@example.net'}, 'cc'),
    ({'subject': 'two\nlines'}, 'subject'),
    ({'body_text': 'x' * (36 * 1024 * 1024)}, None),
])
def test_bad_send_bodies_are_refused_before_queueing(sender, change, field):
    resp = sender.post(f'/api/v1/accounts/{sender.account}/send', dict(MAIL, **change))
    if field is None:
        assert resp.status in (413, 422) and resp.json['error'] in ('too_large', 'validation_failed')
    else:
        assert_api_error(resp, 422, 'validation_failed')
        assert field in resp.json['fields']
    with models.all_tenants():
        assert models.Outbox.select().where(models.Outbox.client == sender.account).count() == 0
