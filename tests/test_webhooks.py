"""Webhooks: endpoints over the API, deliveries signed per Standard Webhooks (checked with the independent
`standardwebhooks` package) to a real HTTP receiver on loopback, in order, across a receiver restart."""
import datetime
import ssl
import typing

import pytest

import contract
import emailsvc
import models
import tasks
from tests import services
from tests.conftest import STATE, assert_api_error, record, wait_for, wait_for_state
from tests.test_dashboard import fill_maildir
from tests.test_events import emit, events
from tests.test_sync import FIRST_SYNC, Mailbox, add_account, message, sync, user  # noqa: F401 (fixture)
from tests.webhook_receiver import Receiver


@pytest.fixture
def receiver():
    server = Receiver(services.free_port()).start()
    yield server
    if server.server is not None:
        server.stop()


def add_webhook(api, receiver, path='/hook', **body):
    resp = api.post('/api/v1/webhooks', dict({'url': receiver.url + path}, **body))
    assert resp.status == 201, resp.text
    receiver.secrets[path] = [resp.json['secret']]
    return resp.json


def wake(api):
    """Events written outside a task (here, by the test) wake deliveries as a task's end would."""
    tasks.wake_webhooks({api.ids})


def emit_many(api, count, start=0):
    for n in range(start, start + count):
        emit(api, n=n)
    wake(api)


def event_ids_of(api, after, count):
    return [e['id'] for e in events(api, after=after, limit=1000)['items']][:count]


def deliveries(api, hook_id):
    resp = api.get(f'/api/v1/webhooks/{hook_id}/deliveries?limit=500')
    assert resp.status == 200, resp.text
    return resp.json['items']


def first_seen_order(ids):
    return list(dict.fromkeys(ids))


def test_secret_is_shown_once_and_stored_sealed(user, receiver):
    hook = add_webhook(user, receiver, events=['message.created', 'send.succeeded'])
    assert hook['secret'].startswith('whsec_') and hook['enabled'] and hook['events'] == ['message.created',
                                                                                          'send.succeeded']
    listed = user.get('/api/v1/webhooks').json['items']
    assert [h['id'] for h in listed] == [hook['id']] and 'secret' not in listed[0]
    assert 'secret' not in user.get(f'/api/v1/webhooks/{hook["id"]}').json
    with models.all_tenants():
        row = models.Webhook.get_by_id(hook['id'])
    assert hook['secret'] not in row.secret and hook['secret'][6:] not in row.secret
    assert tasks.decrypt(row.secret) == hook['secret']


def test_bad_webhooks_are_422(user):
    for body, field in (({'url': 'ftp://example.com/'}, 'url'), ({'url': 'http://u:p@example.com/'}, 'url'),
                        ({'url': 'http://example.com/', 'events': ['message.exploded']}, 'events'),
                        ({'url': 'http://example.com/', 'enabled': 'yes'}, 'enabled'),
                        ({'url': 'http://example.com/', 'colour': 'red'}, 'colour')):
        resp = user.post('/api/v1/webhooks', body)
        assert_api_error(resp, 422, 'validation_failed')
        assert any(name == field or name.startswith(field + '[') for name in resp.json['fields']), resp.json


def test_other_users_webhooks_are_404(user, client, make_key, unique, receiver):
    hook = add_webhook(user, receiver)
    other = client.as_key(make_key(unique + 'x', 'mallory'))
    for resp in (other.get(f'/api/v1/webhooks/{hook["id"]}'), other.patch(f'/api/v1/webhooks/{hook["id"]}', {}),
                 other.get(f'/api/v1/webhooks/{hook["id"]}/deliveries'),
                 other.post(f'/api/v1/webhooks/{hook["id"]}/rotate'),
                 other.delete(f'/api/v1/webhooks/{hook["id"]}')):
        assert_api_error(resp, 404, 'not_found')
    assert other.get('/api/v1/webhooks').json['items'] == []


def test_every_event_arrives_signed_and_in_order_across_a_receiver_restart(user, receiver, consumer):
    hook = add_webhook(user, receiver)
    start = events(user, after='now')['next_cursor']
    emit_many(user, 30)
    wait_for(lambda: len(receiver.ids('/hook')) >= 30, timeout=20, message='the first 30 deliveries')
    receiver.stop()   # mid-stream: the next deliveries fail and are retried with backoff
    emit_many(user, 30, start=30)
    wait_for(lambda: any(d['status'] == 'failed' for d in deliveries(user, hook['id'])), timeout=20,
             message='a failed delivery while the receiver is down')
    receiver.start()
    emit_many(user, 10, start=60)
    expected = event_ids_of(user, start, 70)
    wait_for(lambda: set(receiver.ids('/hook')) >= set(expected), timeout=30,
             message=lambda: f'all 70 events delivered (got {len(set(receiver.ids("/hook")))})')
    assert first_seen_order(receiver.ids('/hook')) == expected   # in feed order, none skipped
    assert receiver.all_valid('/hook')
    # The log commits a moment after the posts it records.
    log = wait_for(lambda: (rows := deliveries(user, hook['id'])) and set(expected) <= {
        d['event_id'] for d in rows if d['status'] == 'succeeded'} and rows, timeout=10, message='the delivery log')
    failed = [d for d in log if d['status'] == 'failed']
    assert failed and failed[0]['response_code'] is None and failed[0]['attempt'] >= 1
    retried = [d for d in log if d['status'] == 'succeeded' and d['attempt'] > 1]
    assert len(retried) == 1 and retried[0]['attempt'] == len(failed) + 1   # only the event the outage held
    assert user.get(f'/api/v1/webhooks/{hook["id"]}').json['failures'] == 0   # recovered


def test_a_sync_s_new_mail_reaches_the_webhook(user, unique, receiver, consumer):
    add_webhook(user, receiver, events=['message.created'])
    mailbox = Mailbox(STATE['dovecot'], unique)
    mailbox.append(message(1))
    account = add_account(user, mailbox)
    sync(user, account)
    wait_for(lambda: receiver.ids('/hook'), timeout=20, message='the message.created delivery')
    (_, _, valid, body, _), = receiver.received
    assert valid and b'"type":"message.created"' in body and f'"account_id":{account}'.encode() in body


def test_a_long_sync_s_first_messages_are_delivered_before_it_ends(user, unique, receiver, consumer):
    hook = add_webhook(user, receiver, events=['message.created'])
    dovecot, total = STATE['dovecot'], 1500
    mailbox = Mailbox(dovecot, unique)
    fill_maildir(dovecot, unique, total)   # a first sync of 30 batches (mail.sync_batch 50 in tests)
    account = add_account(user, mailbox)
    first_sync = FIRST_SYNC[account]
    sync(user, account)
    synced = record(first_sync)
    wait_for(lambda: len(set(receiver.ids('/hook'))) >= total, timeout=60,
             message=lambda: f'{total} deliveries (got {len(set(receiver.ids("/hook")))})')
    with models.tenant_scope(user.ids[0]):
        first = models.WebhookDelivery.select(models.pw.fn.MIN(models.WebhookDelivery.created_at)).where(
            models.WebhookDelivery.webhook_id == hook['id']).scalar()
    # Woken by the commit of each batch, not by the end of the task that stored them.
    assert first < synced.finished_at, (first, synced.finished_at)
    assert receiver.all_valid('/hook')


def test_deleting_an_account_is_one_account_deleted_event_delivered_to_its_owner_only(
        user, client, make_key, unique, receiver, consumer):
    other = client.as_key(make_key(unique + 'x', 'olga'))   # another tenant, with an endpoint of its own
    add_webhook(user, receiver, '/owner')
    add_webhook(other, receiver, '/other')
    mailbox = Mailbox(STATE['dovecot'], unique)
    mailbox.append(message(1), message(2))
    account = add_account(user, mailbox)
    sync(user, account)
    start, other_start = (events(api, after='now')['next_cursor'] for api in (user, other))
    assert user.delete(f'/api/v1/accounts/{account}').status == 204
    feed = events(user, after=start)['items']
    assert [(e['type'], e['account_id'], e['data']) for e in feed] == [('account.deleted', account, {})]
    # Woken by the request itself, not by the minute's sweep.
    wait_for(lambda: feed[0]['id'] in receiver.ids('/owner'), timeout=5, message='the account.deleted delivery')
    assert receiver.all_valid('/owner')
    assert events(other, after=other_start)['items'] == []
    assert not any(b'account.deleted' in body for path, _, _, body, _ in receiver.received if path == '/other')
    operator = client.as_key(make_key(operator=True))   # an operational event: operators read it too
    assert feed[0]['id'] in [e['id'] for e in events(operator, after=start, types='account.deleted')['items']]
    assert typing.get_args(contract.EventType) == models.EVENT_TYPES   # the webhooks' types are the feed's


def test_rotation_signs_with_both_secrets_for_a_while(user, receiver, consumer):
    hook = add_webhook(user, receiver)
    old = receiver.secrets['/hook'][0]
    resp = user.post(f'/api/v1/webhooks/{hook["id"]}/rotate')
    assert resp.status == 200 and resp.json['secret'] != old and resp.json['previous_secret_expires_at']
    receiver.secrets['/hook'] = [old, resp.json['secret']]   # each alone must verify the delivery
    emit_many(user, 1)
    wait_for(lambda: receiver.ids('/hook'), timeout=20, message='a delivery after rotation')
    assert receiver.all_valid('/hook')
    assert len(receiver.received) == 1   # one delivery, verified under each secret alone: both signatures in it
    with models.all_tenants():   # 24 hours later
        models.Webhook.update(previous_secret_until=models.utcnow() - datetime.timedelta(seconds=1)) \
            .where(models.Webhook.id == hook['id']).execute()
    emit_many(user, 1)
    wait_for(lambda: len(receiver.ids('/hook')) == 2, timeout=20, message='a delivery after the grace')
    *_, body, headers = receiver.received[1]
    assert Receiver.verifies(resp.json['secret'], headers, body) and not Receiver.verifies(old, headers, body)
    assert len(headers['webhook-signature'].split()) == 1


def test_a_patch_or_rotation_writes_only_its_own_fields(user, receiver):
    """A delivery run moves the cursor and lease while a PATCH or rotation holds the row it read:
    saving that whole row would put the cursor back (every event after it delivered again)."""
    hook = add_webhook(user, receiver)
    with models.all_tenants():
        as_read = models.Webhook.get_by_id(hook['id'])
        models.Webhook.update(cursor=41, lease_owner='a-run').where(models.Webhook.id == hook['id']).execute()
        emailsvc.save_only(as_read, {'enabled': False})
        after = models.Webhook.get_by_id(hook['id'])
    assert (after.cursor, after.lease_owner, after.enabled) == (41, 'a-run', False)
    assert user.patch(f'/api/v1/webhooks/{hook["id"]}', {'events': ['message.created']}).status == 200
    assert user.post(f'/api/v1/webhooks/{hook["id"]}/rotate').status == 200
    with models.all_tenants():
        assert models.Webhook.get_by_id(hook['id']).cursor == 41


def test_no_secret_reaches_a_log_or_an_event(user, receiver, consumer, web):
    hook = add_webhook(user, receiver)
    rotated = user.post(f'/api/v1/webhooks/{hook["id"]}/rotate').json['secret']
    emit_many(user, 1)
    wait_for(lambda: deliveries(user, hook['id']), timeout=20, message='a delivery')
    logs = (STATE['workdir'] / 'consumer.log').read_text() + web.log.read_text()
    feed = str(events(user, limit=1000)) + str(deliveries(user, hook['id']))
    for secret in (hook['secret'], rotated):
        assert secret[6:] not in logs and secret[6:] not in feed and secret[6:].encode() not in receiver.received[0][3]


def test_redeliver_posts_the_event_again(user, receiver, consumer):
    hook = add_webhook(user, receiver)
    emit_many(user, 1)
    wait_for(lambda: deliveries(user, hook['id']), timeout=20, message='a delivery')
    (first,) = deliveries(user, hook['id'])
    resp = user.post(f'/api/v1/webhooks/{hook["id"]}/deliveries/{first["id"]}/redeliver')
    assert resp.status == 202, resp.text
    wait_for_state(resp.json['task_id'], 'succeeded')
    assert receiver.ids('/hook') == [first['event_id']] * 2
    assert [d['redelivery'] for d in deliveries(user, hook['id'])] == [True, False]
    assert_api_error(user.post(f'/api/v1/webhooks/{hook["id"]}/deliveries/999999999/redeliver'), 404, 'not_found')


def test_an_endpoint_failing_for_three_days_is_disabled_and_says_why(user, receiver, consumer):
    hook = add_webhook(user, receiver)
    receiver.stop()
    with models.all_tenants():
        models.Webhook.update(failing_since=models.utcnow() - datetime.timedelta(hours=73), failures=40) \
            .where(models.Webhook.id == hook['id']).execute()
    emit_many(user, 1)
    wait_for(lambda: not user.get(f'/api/v1/webhooks/{hook["id"]}').json['enabled'], timeout=20,
             message='the endpoint to be disabled')
    shown = user.get(f'/api/v1/webhooks/{hook["id"]}').json
    assert 'every delivery failed since' in shown['disabled_reason'] and 'refused' in shown['disabled_reason']
    receiver.start()
    resp = user.patch(f'/api/v1/webhooks/{hook["id"]}', {'enabled': True})
    assert resp.json['enabled'] and resp.json['disabled_reason'] is None and resp.json['failures'] == 0
    wait_for(lambda: receiver.ids('/hook'), timeout=20, message='delivery after re-enabling')


def test_targets_obey_the_egress_policy(user, receiver, consumer):
    resp = user.post('/api/v1/webhooks', {'url': 'http://169.254.169.254/latest/meta-data/'})
    assert resp.status == 201   # judged where it counts: on the resolved address, at connect time
    emit_many(user, 1)
    wait_for(lambda: deliveries(user, resp.json['id']), timeout=20, message='the refused attempt')
    (attempt,) = deliveries(user, resp.json['id'])[:1]
    assert attempt['status'] == 'failed' and attempt['error'].startswith('destination_not_allowed')


def test_the_sweep_delivers_what_no_wake_up_announced(user, receiver, consumer):
    hook = add_webhook(user, receiver)
    with models.all_tenants():   # as a worker SIGKILLed mid-run leaves it: claimed, marked queued, lease lapsed
        models.Webhook.update(lease_owner='a-dead-run', lease_until=models.utcnow() - datetime.timedelta(seconds=1),
                              wanted_at=models.utcnow() - datetime.timedelta(minutes=5)) \
            .where(models.Webhook.id == hook['id']).execute()
    emit(user, n=1)   # no wake-up
    wait_for_state(tasks.sweep_webhooks().id, 'succeeded')
    wait_for(lambda: receiver.ids('/hook'), timeout=20, message='the swept delivery')


def test_an_https_target_must_have_a_trusted_certificate(user, consumer, tmp_path):
    receiver = Receiver(services.free_port())
    receiver.start()
    cert, key = services.make_cert(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    receiver.server.socket = context.wrap_socket(receiver.server.socket, server_side=True)
    try:
        resp = user.post('/api/v1/webhooks', {'url': f'https://127.0.0.1:{receiver.port}/hook'})
        emit_many(user, 1)
        wait_for(lambda: deliveries(user, resp.json['id']), timeout=20, message='the refused attempt')
        attempt = deliveries(user, resp.json['id'])[-1]
        assert attempt['status'] == 'failed' and attempt['error'].startswith('certificate_untrusted'), attempt
        assert receiver.received == []
    finally:
        receiver.stop()
