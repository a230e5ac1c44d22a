"""The change feed: events written with their changes, read per tenant, long-polled, expired past retention."""
import threading
import time

import models
from tests.conftest import STATE, WebServer, assert_api_error, wait_for
from tests.test_sync import Mailbox, add_account, message, messages, sync, user  # noqa: F401 (fixture)


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
    alice, bob = client.as_key(make_key(unique, 'alice')), client.as_key(make_key(unique + 'b', 'bob'))
    for api in (alice, bob):
        api.ids = tuple(getattr(models.ApiKey.lookup(api.key), f) for f in ('tenant_id', 'user_id'))
    start = events(alice, after='now')['next_cursor']
    emit(alice, marker='alice')
    emit(bob, marker='bob')
    assert [e['data'] for e in events(alice, after=start)['items']] == [{'marker': 'alice'}]
    assert [e['data'] for e in events(bob, after=start)['items']] == [{'marker': 'bob'}]


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
