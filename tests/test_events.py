"""The change feed: events written with their changes, read per tenant, long-polled, expired past retention."""
import threading
import time

import models
import tasks
from tests.conftest import STATE, WebServer, assert_api_error, wait_for_state
from tests.test_send import sender, smtp_server  # noqa: F401 (fixtures)
from tests.test_sync import Mailbox, add_account, mailbox, message, messages, sync, user  # noqa: F401 (fixtures)


def events(api, after='', **params):
    query = '&'.join(f'{k}={v}' for k, v in params.items())
    resp = api.get(f'/api/v1/events?after={after}&{query}')
    assert resp.status == 200, resp.text
    return resp.json


def emit(api, type_='account.recovered', **data):
    """An event for the key's user, written as the tasks write them."""
    tenant_id, user_id = api.ids
    with models.tenant_scope(tenant_id):
        models.emit(type_, tenant_id=tenant_id, user_id=user_id, account_id=None, data=data)


def test_sync_writes_folder_and_message_events_with_the_ids_of_the_api(user, unique, consumer):
    mailbox = Mailbox(STATE['dovecot'], unique)
    mailbox.append(message(1), message(2))
    start = events(user, after='now')['next_cursor']
    account = add_account(user, mailbox)
    sync(user, account)
    feed = events(user, after=start)
    types = [e['type'] for e in feed['items']]
    assert 'folder.created' in types and types.count('message.created') == 2
    stored = {m['id']: m for m in messages(user, account_id=account)}
    created = [e for e in feed['items'] if e['type'] == 'message.created']
    assert {e['data']['message_id'] for e in created} == set(stored)
    assert all(e['account_id'] == account and e['data']['folder_id'] == stored[e['data']['message_id']]['folder_id']
               for e in created)
    ids = [int(e['id'][4:]) for e in feed['items']]
    assert ids == sorted(ids) and feed['next_cursor'] == feed['items'][-1]['id']

    # A flag set and a message expunged on the server: message.updated, then message.deleted.
    mailbox.change('INBOX', lambda s: s.store_flags([1], add=('\\Seen',)))
    sync(user, account, force_full_sync=False)
    mailbox.change('INBOX', lambda s: s.expunge_uids([2]))
    sync(user, account, force_full_sync=False)
    later = events(user, after=feed['next_cursor'], types='message.updated,message.deleted')['items']
    assert [e['type'] for e in later] == ['message.updated', 'message.deleted'], later
    assert later[0]['data']['changes'] == ['flags'] and '\\Seen' in later[0]['data']['flags']
    assert 'password' not in str(feed) + str(later)


def test_a_user_sees_only_its_own_events(client, make_key, unique):
    # carol shares alice's tenant; bob is in another tenant.
    alice, carol = client.as_key(make_key(unique, 'alice')), client.as_key(make_key(unique, 'carol'))
    bob = client.as_key(make_key(unique + 'b', 'bob'))
    for api in (alice, carol, bob):
        api.ids = tuple(getattr(models.ApiKey.lookup(api.key), f) for f in ('tenant_id', 'user_id'))
    start = events(alice, after='now')['next_cursor']
    for api, name in ((alice, 'alice'), (carol, 'carol'), (bob, 'bob')):
        emit(api, marker=name)
    for api, name in ((alice, 'alice'), (carol, 'carol'), (bob, 'bob')):
        assert [e['data'] for e in events(api, after=start)['items']] == [{'marker': name}]


def test_operator_reads_operational_events_only(client, make_key):
    operator = client.as_key(make_key(operator=True))
    assert_api_error(operator.get('/api/v1/events?types=message.created'), 403, 'forbidden')
    assert events(operator, after='now', types='task.dead')['items'] == []


def test_bad_cursor_and_types_are_422(user):
    assert_api_error(user.get('/api/v1/events?after=42'), 422, 'invalid_cursor')
    assert_api_error(user.get('/api/v1/events?types=message.exploded'), 422, 'invalid_filter')
    assert_api_error(user.get('/api/v1/events?wait=-1'), 422, 'invalid_filter')


def test_long_poll_wakes_when_an_event_lands(user):
    start = events(user, after='now')['next_cursor']
    answer = {}

    def poll():
        began = time.monotonic()
        answer['feed'] = events(user, after=start, wait=20)
        answer['seconds'] = time.monotonic() - began

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.5)   # the poll is waiting by now (nothing to return yet); what is measured is the wake-up
    assert 'feed' not in answer
    emit(user, marker='wake')
    poller.join(25)
    assert [e['data'] for e in answer['feed']['items']] == [{'marker': 'wake'}]
    assert answer['seconds'] < 3, answer   # woken by the doorbell, not by the end of the 20 s


def test_long_polls_beyond_the_cap_answer_at_once(make_key, unique):
    web = WebServer(STATE['workdir'], name='web-events-cap', EMAILSVC_EVENTS_MAX_WAITERS='1')
    try:
        api = web.client.as_key(make_key(unique))
        holder = threading.Thread(target=lambda: api.get('/api/v1/events?after=now&wait=3'))
        holder.start()
        time.sleep(0.5)
        began = time.monotonic()
        assert api.get('/api/v1/events?after=now&wait=3').json['items'] == []
        assert time.monotonic() - began < 1.5   # the only waiting place is taken: no thread held for it
        holder.join(10)
    finally:
        web.stop()


def test_a_cursor_past_retention_is_410_with_the_oldest_cursor(user):
    start = events(user, after='now')['next_cursor']
    emit(user, marker='old')
    emit(user, marker='kept')
    with models.all_tenants():
        kept = models.Event.select().order_by(models.Event.id.desc()).first()
        through = kept.id - 1
        models.Event.update(created_at=models.utcnow() - models.datetime.timedelta(days=30)) \
            .where(models.Event.id <= through).execute()
    models.prune_events(models.utcnow() - models.datetime.timedelta(days=7))
    resp = user.get(f'/api/v1/events?after={start}')
    assert_api_error(resp, 410, 'cursor_expired')
    assert resp.json['oldest_cursor'] == models.event_id_text(through)
    assert [e['data'] for e in events(user, after=resp.json['oldest_cursor'])['items']] == [{'marker': 'kept'}]


def test_account_failure_auth_error_and_recovery_are_events(user, mailbox, consumer):
    from tests import services
    from tests.test_sync import PASSWORD
    start = events(user, after='now')['next_cursor']
    account = add_account(user, mailbox, password='wrong-password')
    sync(user, account, state='failed')
    fixed = user.patch(f'/api/v1/accounts/{account}', {'incoming': {'password': PASSWORD}})
    wait_for_state(fixed.json['sync_task_id'], 'succeeded')
    broken = user.patch(f'/api/v1/accounts/{account}', {'incoming': {
        'port': services.free_port(), 'password': PASSWORD}})   # nothing listens there: a temporary failure
    wait_for_state(broken.json['sync_task_id'], 'retrying')
    tasks.huey.revoke_by_id(broken.json['sync_task_id'])
    feed = events(user, after=start, types='account.auth_error,account.recovered,account.sync_failed')['items']
    assert [e['type'] for e in feed] == ['account.auth_error', 'account.recovered', 'account.sync_failed']
    assert all(e['account_id'] == account for e in feed)
    assert feed[2]['data'] == {'error_code': 'refused', 'failures': 1}
    assert 'wrong-password' not in str(feed) and PASSWORD not in str(feed)


def test_send_outcomes_are_events(sender, smtp_server, consumer):
    from tests.test_send import MAIL, send
    start = events(sender, after='now')['next_cursor']
    ok_task, ok = send(sender, MAIL)
    smtp_server.reply_to_data('550 5.7.1 Rejected')
    bad_task, _ = send(sender, MAIL, state='failed')
    feed = events(sender, after=start, types='send.succeeded,send.failed')['items']
    assert [(e['type'], e['data']['task_id']) for e in feed] == [('send.succeeded', ok_task), ('send.failed', bad_task)]
    assert feed[0]['data']['internet_message_id'] == ok.result['message_id']
    assert '550' in feed[1]['data']['error'] and feed[1]['account_id'] == sender.account


def test_a_send_out_of_retries_on_temporary_errors_is_send_failed(sender, smtp_server, consumer):
    from tests.test_send import MAIL, send
    start = events(sender, after='now')['next_cursor']
    smtp_server.reply_to_data('451 4.3.0 Try again later', times=tasks.send_email.task_class.default_retries + 1)
    task_id, row = send(sender, MAIL, state='dead', timeout=30)
    assert row.attempts == tasks.send_email.task_class.default_retries + 1 and smtp_server.received() == []
    feed = events(sender, after=start, types='send.succeeded,send.failed,task.dead')['items']
    assert [(e['type'], e['data']['task_id']) for e in feed] == [('send.failed', task_id), ('task.dead', task_id)]
    assert '451' in feed[0]['data']['error'] and feed[0]['account_id'] == sender.account
    with models.tenant_scope(sender.ids[0]):
        assert models.Outbox.get(models.Outbox.task_id == task_id).state == 'failed'


def test_a_dead_task_is_an_event_for_its_user_and_the_operator(user, client, make_key, consumer):
    from tests import probe_tasks
    operator = client.as_key(make_key(operator=True))
    start = events(user, after='now')['next_cursor']
    task = probe_tasks.always_fails(tenant_id=user.ids[0], user_id=user.ids[1])
    wait_for_state(task.id, 'dead', timeout=20)
    (dead,) = events(user, after=start, types='task.dead')['items']
    assert dead['data'] == {'task_id': task.id, 'name': 'always_fails', 'error_type': 'RuntimeError'}
    # the operator reads every tenant's operational events: other tests' account.* events interleave
    feed = events(operator, after=start, types='task.dead', limit=1000)['items']
    assert task.id in [e['data']['task_id'] for e in feed]


def test_an_event_exists_only_if_its_change_committed(user, mailbox, consumer):
    account = add_account(user, mailbox)
    sync(user, account)
    tenant_id, _ = user.ids
    start = events(user, after='now')['next_cursor']
    with models.tenant_scope(tenant_id):
        folder = models.EmailFolder.by_role(account, 'inbox')
        item = dict(tasks.message_fields(message(9)), uid=999, **models.flag_fields(()))
        try:
            with models.database.atomic():
                assert models.store_messages(folder, [item], 'uid') == 1
                raise RuntimeError('the transaction fails after the store')
        except RuntimeError:
            pass
    assert events(user, after=start)['items'] == []
    assert not [m for m in messages(user, account_id=account) if m['uid'] == 999]


def test_a_message_moved_to_trash_is_updated_and_an_expunged_one_deleted(user, mailbox, consumer):
    from tests.test_delete import delete, synced
    from tests.test_spam_api import folder_of_role
    account, listed = synced(user, mailbox, count=2)
    start = events(user, after='now')['next_cursor']
    delete(user, [listed[0]['id']])
    delete(user, [listed[1]['id']], permanent=True)
    feed = events(user, after=start, types='message.updated,message.deleted')['items']
    assert [(e['type'], e['data']['message_id']) for e in feed] == [
        ('message.updated', listed[0]['id']), ('message.deleted', listed[1]['id'])]
    assert feed[0]['data']['changes'] == ['folder']
    assert feed[0]['data']['folder_id'] == folder_of_role(user, account, 'trash')
    assert feed[0]['data']['previous_folder_id'] == folder_of_role(user, account, 'inbox')


def test_events_become_visible_in_id_order(user):
    """A writer that took a later id commits after one that took an earlier id, so a reader paging by id
    never passes an event that is still to commit (PostgreSQL: the event-writer lock; SQLite: one writer)."""
    tenant_id, user_id = user.ids
    start = events(user, after='now')['next_cursor']
    first_emitted, times = threading.Event(), {}

    def write(name, hold):
        with models.database.connection_context(), models.tenant_scope(tenant_id):
            with models.database.atomic():
                # The moment of the commit, before the other after-commit work (waking webhooks) adds its own.
                models.database.after_commit(lambda: times.setdefault(name, time.monotonic()))
                models.emit('account.recovered', tenant_id=tenant_id, user_id=user_id, data={'w': name})
                first_emitted.set()
                time.sleep(hold)

    slow = threading.Thread(target=write, args=('slow', 1.0))
    slow.start()
    first_emitted.wait(5)
    fast = threading.Thread(target=write, args=('fast', 0))
    fast.start()
    time.sleep(0.3)
    assert events(user, after=start)['items'] == []   # neither committed: nothing to page past yet
    slow.join(10)
    fast.join(10)
    assert times['fast'] >= times['slow']
    assert [e['data']['w'] for e in events(user, after=start)['items']] == ['slow', 'fast']
