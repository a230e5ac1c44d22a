"""Blobs: stored once per tenant, never shared between tenants, kept while anything refers to them."""
import base64
import email
import email.policy
import os

import models
from tests.conftest import STATE, wait_for_state
from tests.test_send import upload
from tests.test_sync import PASSWORD, Mailbox, add_account, messages, sync


def with_attachment(data, filename='report.pdf'):
    body = base64.encodebytes(data).replace(b'\n', b'\r\n')
    return (b'From: Ann <ann@example.org>\r\nTo: bob@example.com\r\nSubject: the report\r\n'
            b'Message-ID: <r.' + os.urandom(4).hex().encode() + b'@example.org>\r\nMIME-Version: 1.0\r\n'
            b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
            b'Content-Type: text/plain\r\n\r\nattached\r\n--b1\r\n'
            b'Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n'
            b'Content-Disposition: attachment; filename="' + filename.encode() + b'"\r\n\r\n'
            + body + b'--b1--\r\n')


def tenant_api(client, make_key, name):
    api = client.as_key(make_key(name))
    api.tenant_id = models.ApiKey.lookup(api.key).tenant_id
    return api


def sending_account(api, name):
    """An account of `api`'s user that sends through the suite's SMTP server; its id."""
    smtp_server = STATE['smtp']
    smtp_server.add_user(name, PASSWORD)
    resp = api.post('/api/v1/accounts', {
        'email': f'{name}@example.com', 'sync_enabled': False,
        'incoming': {'protocol': 'imap', 'host': '127.0.0.1', 'port': STATE['dovecot'].imap_port,
                     'security': 'none', 'username': name, 'password': PASSWORD},
        'smtp': {'host': '127.0.0.1', 'port': smtp_server.port, 'security': 'starttls',
                 'username': name, 'password': PASSWORD}})
    assert resp.status == 201, resp.text
    return resp.json['id']


def send_with(api, account, upload_id):
    resp = api.post(f'/api/v1/accounts/{account}/send', {'to': ['carol@example.net'], 'subject': 'report',
                                                         'body_text': 'see attached', 'attachment_ids': [upload_id]})
    assert resp.status == 202, resp.text
    return wait_for_state(resp.json['task_id'], 'succeeded', 'failed', 'dead', timeout=20)


def test_a_delete_in_one_tenant_keeps_the_same_bytes_in_another(client, make_key, unique, consumer):
    smtp_server = STATE['smtp']
    smtp_server.clear()
    data = b'%PDF-1.4 shared bytes ' + os.urandom(16)
    alice = tenant_api(client, make_key, f'{unique}a')
    bob = tenant_api(client, make_key, f'{unique}b')

    # Tenant A uploads the file and has an account to send it from.
    alice_account = sending_account(alice, f'{unique}a')
    uploaded = upload(alice, data, 'report.pdf')

    # Tenant B receives the same bytes as an attachment, then deletes that message for good.
    mailbox = Mailbox(STATE['dovecot'], f'{unique}b')
    mailbox.append(with_attachment(data))
    bob_account = add_account(bob, mailbox)
    sync(bob, bob_account)
    (received,) = messages(bob, account_id=bob_account)
    with models.all_tenants():
        bob_blob = models.Attachment.get(models.Attachment.message == received['id']).blob
        alice_blob = models.Upload.get_by_id(uploaded['id']).blob
    assert models.Blob.content(bob_blob) == data == models.Blob.content(alice_blob)
    assert bob_blob != alice_blob   # no cross-tenant dedupe: that row would be shared, and a side channel
    resp = bob.post('/api/v1/messages/delete', {'email_ids': [received['id']], 'permanent': True})
    assert resp.status == 202, resp.text
    assert wait_for_state(resp.json['task_id'], 'succeeded', 'failed', timeout=20).state == 'succeeded'
    assert models.Blob.get_or_none(models.Blob.id == bob_blob) is None   # B's copy went with B's message

    # A's send still carries A's upload.
    row = send_with(alice, alice_account, uploaded['id'])
    assert row.state == 'succeeded', row.error
    (sent,) = smtp_server.received()
    parsed = email.message_from_bytes(sent['data'], policy=email.policy.default)
    (attachment,) = parsed.iter_attachments()
    assert attachment.get_filename() == 'report.pdf' and attachment.get_content() == data


def test_one_tenants_copies_are_stored_once_and_kept_while_an_upload_refers_to_them(make_key, unique):
    make_key(unique)
    tenant = models.Tenant.get(models.Tenant.name == unique)
    data = os.urandom(64)
    with models.tenant_scope(tenant.id):
        first, again = models.store_blobs([data, data])
        assert first == again == models.store_blobs([data], tenant.id)[0]
        assert len(first) == 64 and first != models.blob_id(tenant.id + 1, data)
        upload = models.Upload.create(user_id=0, filename='x.bin', content_type='application/octet-stream',
                                      size=len(data), blob=first)
    models.drop_unreferenced_blobs([first])   # what a permanent delete of a message with these bytes runs
    assert models.Blob.content(first) == data
    with models.tenant_scope(tenant.id):
        models.Upload.delete().where(models.Upload.id == upload.id).execute()
    models.drop_unreferenced_blobs([first])
    assert models.Blob.get_or_none(models.Blob.id == first) is None


def test_a_send_whose_upload_lost_its_bytes_fails_at_once(client, make_key, unique, consumer):
    alice = tenant_api(client, make_key, unique)
    account = sending_account(alice, unique)
    uploaded = upload(alice, os.urandom(32), 'gone.bin')
    with models.all_tenants():
        blob = models.Upload.get_by_id(uploaded['id']).blob
    models.Blob.delete().where(models.Blob.id == blob).execute()   # as the cross-tenant delete used to
    row = send_with(alice, account, uploaded['id'])
    assert (row.state, row.attempts) == ('failed', 1) and 'upload them again' in row.error
