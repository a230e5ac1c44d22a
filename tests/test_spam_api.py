"""check_spam in the service: verdicts on messages, per-tenant learning, Junk moves, automatic checks."""

import models
import tasks
from tests.conftest import STATE, assert_api_error, wait_for, wait_for_state
from tests.test_sync import Mailbox, add_account, mailbox, messages, sync, user  # noqa: F401 (fixtures)

PHISH = (b'From: "PayPal Security" <alerts@secure-paypa1-login.com>\r\nTo: bob@example.com\r\n'
         b'Reply-To: collector@another-domain.ru\r\nSubject: Your account is suspended - verify now\r\n'
         b'Message-ID: <p1@secure-paypa1-login.com>\r\nMIME-Version: 1.0\r\n'
         b'Content-Type: text/html; charset=utf-8\r\n\r\n'
         b'<p>Dear customer, your account has been suspended. Confirm your password and credit card '
         b'to restore access.</p><a href="http://192.0.2.7/login.php">https://www.paypal.com/signin</a>\r\n')
HAM = (b'From: Alice <alice@example.org>\r\nTo: bob@example.com\r\nSubject: Lunch on Thursday?\r\n'
       b'Message-ID: <h1@example.org>\r\n\r\nHi Bob, are we still on for lunch on Thursday at noon? Alice\r\n')


def synced(api, mailbox, *raws):
    mailbox.append(*raws)
    account = add_account(api, mailbox)
    sync(api, account)
    return account, {m['subject']: m for m in messages(api, account_id=account)}


def folder_of_role(api, account, role):
    return next(f['id'] for f in api.get(f'/api/v1/accounts/{account}/folders').json['items'] if f['role'] == role)


def check(api, message_id):
    resp = api.post(f'/api/v1/messages/{message_id}/spam-check')
    assert resp.status == 202, resp.text
    return wait_for_state(resp.json['task_id'], 'succeeded', timeout=60).result


def test_phishing_is_spam_with_indicators_and_ham_is_not(user, mailbox, consumer):
    account, listed = synced(user, mailbox, PHISH, HAM)
    phish = check(user, listed['Your account is suspended - verify now']['id'])
    assert phish['is_spam'] and 0.5 <= phish['spam_score'] <= 1
    assert {'ip_url', 'url_text_mismatch', 'reply_to_mismatch'} <= set(phish['indicators'])
    ham = check(user, listed['Lunch on Thursday?']['id'])
    assert not ham['is_spam'] and ham['spam_score'] < 0.5
    shown = user.get(f'/api/v1/messages/{listed["Your account is suspended - verify now"]["id"]}').json['spam']
    assert shown['is_spam'] and shown['indicators'] == phish['indicators']


def test_reports_teach_only_their_own_tenant(user, mailbox, consumer, client, make_key, unique):
    account, listed = synced(user, mailbox, HAM)
    other = client.as_key(make_key(unique + 'b', 'bea'))
    _, theirs = synced(other, Mailbox(STATE['dovecot'], unique + 'b'), HAM)
    before_mine = check(user, listed['Lunch on Thursday?']['id'])['spam_score']
    before_theirs = check(other, theirs['Lunch on Thursday?']['id'])['spam_score']
    for _ in range(3):
        resp = user.post(f'/api/v1/messages/{listed["Lunch on Thursday?"]["id"]}/report', {'verdict': 'spam'})
        assert resp.status == 202, resp.text
    assert check(user, listed['Lunch on Thursday?']['id'])['spam_score'] > before_mine
    assert check(other, theirs['Lunch on Thursday?']['id'])['spam_score'] == before_theirs


def test_report_moves_the_message_to_junk_on_the_server(user, mailbox, consumer):
    account, listed = synced(user, mailbox, HAM)
    resp = user.post(f'/api/v1/messages/{listed["Lunch on Thursday?"]["id"]}/report', {'verdict': 'spam'})
    row = wait_for_state(resp.json['task_id'], 'succeeded', timeout=60)
    assert row.result['moved'] is True
    with mailbox.session() as s:
        assert s.select('INBOX').exists == 0 and s.select('Junk').exists == 1
    # The message keeps its id in Junk at once, and the next sync neither loses it nor copies it.
    message_id = listed['Lunch on Thursday?']['id']
    junk = folder_of_role(user, account, 'junk')
    assert [m['id'] for m in messages(user, folder_id=junk)] == [message_id]
    sync(user, account)
    assert [m['id'] for m in messages(user, folder_id=junk)] == [message_id]
    assert [m['id'] for m in messages(user, account_id=account)] == [message_id]
    assert user.get(f'/api/v1/messages/{message_id}').status == 200
    assert_api_error(user.post(f'/api/v1/messages/{listed["Lunch on Thursday?"]["id"]}/report',
                               {'verdict': 'maybe'}), 422, 'validation_failed')


def test_new_mail_is_checked_automatically_and_spam_moves_when_asked(user, mailbox, consumer):
    account, _ = synced(user, mailbox, HAM)
    assert user.patch(f'/api/v1/accounts/{account}', {'move_spam': True}).json['move_spam'] is True
    mailbox.append(PHISH)
    sync(user, account)
    with models.all_tenants():
        phish = models.EmailMessage.get(models.EmailMessage.client == account,
                                        models.EmailMessage.message_id == 'p1@secure-paypa1-login.com')
    wait_for(lambda: _verdict(phish.id), timeout=15, message='the automatic spam check')
    with mailbox.session() as s:
        wait_for(lambda: s.select('Junk').exists == 1, timeout=10, message='the spam to reach Junk')


def _verdict(message_id):
    with models.all_tenants():
        return models.EmailMessage.get_by_id(message_id).is_spam is not None


def test_spam_check_of_another_tenants_message_is_404(user, mailbox, consumer, client, make_key, unique):
    _, listed = synced(user, mailbox, HAM)
    mallory = client.as_key(make_key(unique + 'm', 'mallory'))
    assert_api_error(mallory.post(f'/api/v1/messages/{listed["Lunch on Thursday?"]["id"]}/spam-check'),
                     404, 'not_found')
    assert tasks.spam_model() is not None
