"""delete_emails: soft deletes reach Trash, permanent deletes expunge, batches stay few round trips."""

import models
import tasks
from tests.conftest import STATE, assert_api_error, wait_for_state
from tests.test_imap import count_commands
from tests.test_spam_api import folder_of_role
from tests.test_sync import Mailbox, add_account, mailbox, message, messages, sync, user  # noqa: F401 (fixtures)


def delete(api, ids, permanent=False):
    resp = api.post('/api/v1/messages/delete', {'email_ids': ids, 'permanent': permanent})
    assert resp.status == 202, resp.text
    return wait_for_state(resp.json['task_id'], 'succeeded').result


def server_subjects(mailbox, folder):
    with mailbox.session() as s:
        s.select(folder)
        return sorted(mime_subject(m.raw) for m in s.fetch(s.uids()))


def mime_subject(raw):
    from mailkit import mime
    return mime.parse(raw).subject


def synced(user, mailbox, count=3, protocol='imap'):
    mailbox.append(*(message(n) for n in range(count)))
    account = add_account(user, mailbox, protocol)
    sync(user, account)
    return account, sorted(messages(user, account_id=account), key=lambda m: m['subject'])


def test_soft_delete_moves_to_trash_on_the_server_and_keeps_the_id(user, mailbox, consumer):
    account, listed = synced(user, mailbox)
    assert delete(user, [listed[0]['id']]) == {'status': 'success', 'deleted_count': 1}
    assert server_subjects(mailbox, 'INBOX') == ['message 1', 'message 2']
    assert server_subjects(mailbox, 'Trash') == ['message 0']
    inbox, trash = folder_of_role(user, account, 'inbox'), folder_of_role(user, account, 'trash')
    assert [m['subject'] for m in messages(user, folder_id=inbox)] == ['message 2', 'message 1']
    assert [m['id'] for m in messages(user, folder_id=trash)] == [listed[0]['id']]   # at once, same id
    assert delete(user, [listed[0]['id']])['deleted_count'] == 0  # the same delete again: nothing more
    assert server_subjects(mailbox, 'Trash') == ['message 0']
    result = sync(user, account)
    assert (result['messages_synced'], result['messages_deleted']) == (0, 0)   # neither a copy nor a loss
    assert [m['id'] for m in messages(user, folder_id=trash)] == [listed[0]['id']]
    assert user.get(f'/api/v1/messages/{listed[0]["id"]}').json['folder_id'] == trash


def test_permanent_delete_expunges_and_drops_rows_and_blobs(user, mailbox, consumer):
    account, listed = synced(user, mailbox)
    with models.all_tenants():
        blob = models.EmailMessage.get_by_id(listed[1]['id']).blob
    assert delete(user, [listed[1]['id'], listed[2]['id']], permanent=True)['deleted_count'] == 2
    assert server_subjects(mailbox, 'INBOX') == ['message 0']
    assert [m['subject'] for m in messages(user, account_id=account)] == ['message 0']
    assert models.Blob.get_or_none(models.Blob.id == blob) is None
    # The API refuses ids that no longer exist; the task run again deletes nothing more.
    assert_api_error(user.post('/api/v1/messages/delete', {'email_ids': [listed[1]['id']]}), 404, 'not_found')
    again = tasks.delete_emails([listed[1]['id'], listed[2]['id']], *user.ids, permanent=True)
    assert wait_for_state(again.id, 'succeeded').result['deleted_count'] == 0


def test_pop3_permanent_delete_uses_dele(user, mailbox, consumer):
    account, listed = synced(user, mailbox, 2, 'pop3')
    assert delete(user, [listed[0]['id']], permanent=True)['deleted_count'] == 1
    assert server_subjects(mailbox, 'INBOX') == ['message 1']


def test_batch_with_another_tenants_message_is_refused_whole(user, mailbox, consumer, client, make_key, unique):
    account, listed = synced(user, mailbox, 2)
    other_user = client.as_key(make_key(unique + 'o', 'olga'))
    other_box = Mailbox(STATE['dovecot'], unique + 'o')
    _, theirs = synced(other_user, other_box, 1)
    resp = user.post('/api/v1/messages/delete', {'email_ids': [listed[0]['id'], theirs[0]['id']]})
    assert_api_error(resp, 404, 'not_found')
    assert resp.json['missing_ids'] == [theirs[0]['id']]
    assert len(messages(user, account_id=account)) == 2 and len(messages(other_user)) == 1
    assert server_subjects(mailbox, 'INBOX') == ['message 0', 'message 1']


def test_bad_delete_bodies_get_field_errors(user):
    for body in ({'email_ids': []}, {'email_ids': ['1']}, {'email_ids': [1], 'permanent': 'no'}, {}):
        assert_api_error(user.post('/api/v1/messages/delete', body), 422, 'validation_failed')


def test_deleting_1000_messages_takes_a_few_round_trips(user, mailbox, consumer):
    with mailbox.session() as s:
        for n in range(1000):
            s.append('INBOX', message(n))
    account = add_account(user, mailbox)
    sync(user, account)
    with models.all_tenants():
        client = models.EmailClient.get_by_id(account)
        batch = list(models.EmailMessage.select().where(models.EmailMessage.client == account))
        with tasks.open_incoming(client) as session:
            sent = count_commands(session)
            tasks.delete_on_imap(session, client, batch, permanent=False)
    assert len(batch) == 1000 and len(sent) <= 5, sent
    assert server_subjects(mailbox, 'INBOX') == []
