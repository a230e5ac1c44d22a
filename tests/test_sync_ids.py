"""Ids that never change under a client, and a first sync under the user's control (issue 14, items 4 and 5)."""
import datetime
import threading

import models
from tests.conftest import assert_api_error, wait_for, wait_for_state
from tests.test_sync import FIRST_SYNC, add_account, mailbox, message, messages, sync, user  # noqa: F401 (fixtures)


def by_subject(api, **filters):
    return {m['subject']: m for m in messages(api, **filters)}


def score_all(api, account):
    """Spam verdicts for every message of the account, by the real check_spam task; {id: score}."""
    ids = [m['id'] for m in messages(api, account_id=account)]
    for task_id in [api.post(f'/api/v1/messages/{i}/spam-check').json['task_id'] for i in ids]:
        wait_for_state(task_id, 'succeeded', timeout=30)
    return {i: api.get(f'/api/v1/messages/{i}').json['spam']['score'] for i in ids}


def assert_kept(api, before, after, scores, subjects):
    """These messages kept their ids, and the spam verdicts stored under them."""
    for subject in subjects:
        assert after[subject]['id'] == before[subject]['id'], subject
        assert api.get(f'/api/v1/messages/{after[subject]["id"]}').json['spam']['score'] == \
            scores[before[subject]['id']]


def folder_of(api, account, name):
    return next(f for f in api.get(f'/api/v1/accounts/{account}/folders').json['items'] if f['name'] == name)


def test_force_full_sync_keeps_ids_and_verdicts_and_counts_only_real_deletions(user, mailbox, consumer):
    uids = mailbox.append(*(message(n) for n in range(4)))
    account = add_account(user, mailbox)
    sync(user, account)
    before = by_subject(user, account_id=account)
    scores = score_all(user, account)
    reported = before['message 2']['id']
    resp = user.post(f'/api/v1/messages/{reported}/report', {'verdict': 'ham'})
    wait_for_state(resp.json['task_id'], 'succeeded')
    mailbox.change('INBOX', lambda s: (s.expunge_uids([uids[0]]), s.store_flags([uids[1]], add=[r'\Seen'])))
    mailbox.append(message(9))
    result = sync(user, account, force_full_sync=True)
    assert (result['messages_deleted'], result['messages_updated'], result['messages_synced']) == (1, 1, 1)
    after = by_subject(user, account_id=account)
    assert sorted(after) == ['message 1', 'message 2', 'message 3', 'message 9']
    assert_kept(user, before, after, scores, ('message 1', 'message 2', 'message 3'))
    assert after['message 1']['is_read']
    assert user.get(f'/api/v1/messages/{reported}').json['spam']['is_spam'] is False   # the user's report holds
    assert user.get(f'/api/v1/messages/{before["message 0"]["id"]}').status == 404
    assert sync(user, account, force_full_sync=True)['messages_deleted'] == 0


def recreate_folder(mailbox, name, raws):
    """Delete the folder and create it again: the server gives it a new UIDVALIDITY."""
    def recreate(s):
        s.conn.close()
        s.conn.state = 'AUTH'
        s.conn.delete(name)
        s.create_folder(name)
    mailbox.change(name, recreate)
    mailbox.append(*raws, folder=name)


def test_after_a_uidvalidity_change_the_same_messages_keep_their_ids_and_verdicts(user, mailbox, consumer):
    raws = [message(n) for n in range(4)]
    mailbox.append(*raws, folder='Projects')
    account = add_account(user, mailbox)
    sync(user, account)
    projects = folder_of(user, account, 'Projects')['id']
    before = by_subject(user, folder_id=projects)
    scores = score_all(user, account)
    with models.all_tenants():
        old_validity = models.EmailFolder.get_by_id(projects).uidvalidity
    # The same messages come back (in another order, so their UIDs differ), but one, and one new one.
    recreate_folder(mailbox, 'Projects', [raws[3], raws[1], raws[2], message(7)])
    result = sync(user, account)
    assert (result['messages_deleted'], result['messages_synced']) == (1, 1)
    after = by_subject(user, folder_id=projects)
    assert sorted(after) == ['message 1', 'message 2', 'message 3', 'message 7']
    assert_kept(user, before, after, scores, ('message 1', 'message 2', 'message 3'))
    assert (before['message 3']['uid'], after['message 3']['uid']) == (4, 1)   # it came back first
    with models.all_tenants():
        assert models.EmailFolder.get_by_id(projects).uidvalidity != old_validity
    # The new UIDs are the server's: an incremental sync finds nothing to change.
    result = sync(user, account)
    assert (result['messages_deleted'], result['messages_synced'], result['messages_updated']) == (0, 0, 0)


def test_a_reader_never_sees_the_folder_shrink_during_a_full_sync(user, mailbox, consumer):
    with mailbox.session() as s:
        for n in range(300):
            s.append('INBOX', message(n, body='x' * 3000))
    account = add_account(user, mailbox)
    sync(user, account)
    with mailbox.session() as s:   # more to fetch, so the full sync runs long enough to be watched
        for n in range(300, 900):
            s.append('INBOX', message(n, body='x' * 3000))
    seen, done = [], threading.Event()

    def read_counts():   # a real concurrent client, over HTTP, as fast as it can
        while not done.is_set() and len(seen) < 100_000:
            seen.append(folder_of(user, account, 'INBOX')['total'])
    reader = threading.Thread(target=read_counts)
    reader.start()
    try:
        wait_for(lambda: seen, timeout=10)
        result = sync(user, account, force_full_sync=True)
        wait_for(lambda: seen[-1] == 900, timeout=10)
    finally:
        done.set()
        reader.join(timeout=30)
    assert result['messages_synced'] == 600 and result['messages_deleted'] == 0
    assert seen[0] >= 300 and all(b >= a for a, b in zip(seen, seen[1:])), sorted(set(seen))[:10]
    assert len(set(seen)) > 2, 'the reader saw the sync while it ran'


def dated(n, day):
    return message(n), datetime.datetime.combine(day, datetime.time(12), datetime.timezone.utc)


def append_dated(mailbox, *pairs):
    with mailbox.session() as s:
        for raw, when in pairs:
            s.append('INBOX', raw, date=when)


def test_sync_since_skips_older_mail_until_moved_back(user, mailbox, consumer):
    append_dated(mailbox, dated(1, datetime.date(2025, 6, 1)), dated(2, datetime.date(2025, 12, 31)),
                 dated(3, datetime.date(2026, 1, 1)), dated(4, datetime.date(2026, 2, 1)))
    account = add_account(user, mailbox, sync_since='2026-01-01')
    assert user.get(f'/api/v1/accounts/{account}').json['sync_since'] == '2026-01-01'
    assert sync(user, account)['messages_synced'] == 2
    assert sorted(by_subject(user, account_id=account)) == ['message 3', 'message 4']
    append_dated(mailbox, dated(5, datetime.date(2024, 1, 1)), dated(6, datetime.date(2026, 3, 1)))
    assert sync(user, account)['messages_synced'] == 1   # new UIDs are filtered too
    assert sync(user, account, force_full_sync=True)['messages_synced'] == 0
    ids = {s: m['id'] for s, m in by_subject(user, account_id=account).items()}

    resp = user.patch(f'/api/v1/accounts/{account}', {'sync_since': '2025-07-01'})
    assert resp.status == 200 and resp.json['sync_since'] == '2025-07-01'
    wait_for(lambda: len(messages(user, account_id=account)) == 4, timeout=30)
    # The next PATCH after that sync has ended: one that lands in a running sync's last moment (after its
    # last look at sync_since) waits for the next periodic sync, which this suite does not run.
    started = resp.json['sync_task_id']
    wait_for(lambda: user.get(f'/api/v1/tasks/{started}').json['state'] in ('succeeded', 'failed', 'dead'),
             timeout=30, message=f'sync {started} to end')
    resp = user.patch(f'/api/v1/accounts/{account}', {'sync_since': None})
    assert resp.json['sync_since'] is None
    wait_for(lambda: len(messages(user, account_id=account)) == 6, timeout=30)
    after = {s: m['id'] for s, m in by_subject(user, account_id=account).items()}
    assert {s: after[s] for s in ids} == ids


def test_sync_since_is_validated_and_refused_for_pop3(user, mailbox):
    for bad in ('2026-13-01', '01/02/2026', 20260101, '1969-12-31', ''):
        resp = user.post('/api/v1/accounts', {'email': 'a@example.com', 'sync_since': bad, 'incoming': {
            'protocol': 'imap', 'host': '127.0.0.1', 'port': 1, 'security': 'none', 'username': 'u',
            'password': 'p'}})
        assert_api_error(resp, 422, 'validation_failed')
        assert 'sync_since' in resp.json['fields']
    resp = user.post('/api/v1/accounts', {'email': 'a@example.com', 'sync_since': '2026-01-01', 'incoming': {
        'protocol': 'pop3', 'host': '127.0.0.1', 'port': 1, 'security': 'none', 'username': 'u', 'password': 'p'}})
    assert_api_error(resp, 422, 'not_supported')
    account = add_account(user, mailbox, 'pop3')
    assert_api_error(user.patch(f'/api/v1/accounts/{account}', {'sync_since': '2026-01-01'}), 422, 'not_supported')
    assert user.patch(f'/api/v1/accounts/{account}', {'sync_since': None}).status == 200


def test_first_sync_stores_the_newest_mail_first(user, mailbox, consumer):
    with mailbox.session() as s:
        uids = [s.append('INBOX', message(n)) for n in range(120)]
    account = add_account(user, mailbox)
    result = sync(user, account)
    assert result['messages_synced'] == 120
    with models.all_tenants():   # ids are handed out in the order rows are stored
        stored = [m.uid for m in models.EmailMessage.select(models.EmailMessage.uid)
                  .where(models.EmailMessage.client == account).order_by(models.EmailMessage.id)]
    first_batch = stored[:50]   # tests run with mail.sync_batch = 50
    assert sorted(first_batch) == sorted(uids)[-50:]
    assert min(stored[:50]) > max(stored[50:100]) > max(stored[100:])


def test_pop3_stores_the_newest_mail_first_and_force_full_sync_keeps_ids(user, mailbox, consumer):
    mailbox.append(*(message(n) for n in range(3)))
    account = add_account(user, mailbox, 'pop3')
    assert sync(user, account)['messages_synced'] == 3
    stored = sorted(messages(user, account_id=account), key=lambda m: m['id'])
    assert [m['subject'] for m in stored] == ['message 2', 'message 1', 'message 0']
    result = sync(user, account, force_full_sync=True)
    assert (result['messages_synced'], result['messages_deleted']) == (0, 0)
    assert sorted(m['id'] for m in messages(user, account_id=account)) == sorted(m['id'] for m in stored)


def test_a_folder_renamed_on_the_server_keeps_its_messages_ids(user, mailbox, consumer):
    mailbox.append(message(1), message(2), folder='Projects')
    account = add_account(user, mailbox)
    sync(user, account)
    projects = folder_of(user, account, 'Projects')['id']
    before = by_subject(user, folder_id=projects)
    scores = score_all(user, account)
    mailbox.change('Projects', lambda s: (s.conn.close(), setattr(s.conn, 'state', 'AUTH'),
                                          s.conn.rename('Projects', '"Projects 2026"')))
    result = sync(user, account)
    assert (result['messages_deleted'], result['messages_synced']) == (0, 0)
    assert folder_of(user, account, 'Projects 2026')['id'] == projects
    assert_kept(user, before, by_subject(user, folder_id=projects), scores, ('message 1', 'message 2'))
