"""The watcher process (push): real watchers, the session's Dovecot, consumer and web server.

No test here runs periodic_sync: mail that becomes readable came by push.
"""
import json
import subprocess
import time

import pytest

import models
from tests import services
from tests.conftest import STATE, record, wait_for
from tests.test_sync import FIRST_SYNC, add_account, first_sync_settled, mailbox, message, messages, user  # noqa: F401 (fixtures)
from tests.test_webhooks import add_webhook, receiver  # noqa: F401 (fixture)

GRACE = 2.0
WATCHER_ENV = {'EMAILSVC_WATCHER_HEARTBEAT_SECONDS': '0.3', 'EMAILSVC_WATCHER_RECOVERY_GRACE': str(GRACE),
               # Short, so that every test here also runs through DONE and a new IDLE several times.
               'EMAILSVC_WATCHER_IDLE_SECONDS': '1', 'EMAILSVC_WATCHER_MAX_BACKOFF': '2'}


class WatcherProcess(services.PythonChild):
    """`python watcher.py` with this module's settings."""

    def __init__(self, name='watcher'):
        super().__init__(STATE['workdir'] / f'{name}.log', ['watcher.py'], **WATCHER_ENV)

    def started(self):
        return self.alive() and b'started' in self.log.read_bytes()

    def holder(self):
        """Its lease holder name, once it holds anything."""
        row = models.WatchLease.select(models.WatchLease.holder) \
            .where(models.WatchLease.holder.contains(f':{self.proc.pid}:')).first()
        return row.holder if row else None


@pytest.fixture(scope='module', autouse=True)
def only_this_modules_accounts():
    """Accounts other test modules made (hundreds, many on hosts that do not exist) are not watched here."""
    with models.all_tenants():
        models.EmailClient.update(push=False).execute()
    yield


@pytest.fixture
def watcher():
    process = WatcherProcess()
    yield process
    process.stop()


def lease(account_id):
    return models.WatchLease.get_or_none(models.WatchLease.client == account_id)


def push_state(api, account_id):
    return api.get(f'/api/v1/accounts/{account_id}').json['push_state']


def wait_until_idling(api, account_id, timeout=15):
    wait_for(lambda: push_state(api, account_id) == 'idling', timeout,
             message=lambda: f'account {account_id} to be idling (now {push_state(api, account_id)!r})')


def watched_account(api, mailbox):
    """An account whose first sync is over and whose INBOX a watcher idles on."""
    account = add_account(api, mailbox)
    first_sync_settled(FIRST_SYNC.pop(account))
    wait_until_idling(api, account)
    return account


def readable(api, account_id, subject):
    return any(m['subject'] == subject for m in messages(api, account_id=account_id))


def syncs_of(account_id):
    """The account's sync_emails records in the ledger, oldest first."""
    task = models.TaskRecord
    with models.all_tenants():
        rows = task.select().where(task.name == 'sync_emails').order_by(task.enqueued_at)
        return [row for row in rows if (row.args or {}).get('email_client_id') == account_id]


def dovecot_login_failures(user):
    return sum(1 for line in STATE['dovecot'].log.read_text(errors='replace').splitlines()
               if f'({user},' in line and 'Password mismatch' in line)


def stays(condition, seconds):
    """condition() holds throughout `seconds` (checked every 50 ms)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(0.05)
    return True


def test_appended_mail_is_readable_and_its_webhook_delivered_within_seconds(user, mailbox, consumer, watcher,
                                                                          receiver):
    add_webhook(user, receiver, events=['message.created'])
    account = watched_account(user, mailbox)
    already = len(receiver.received)   # the first sync's, if the INBOX had mail
    started = time.monotonic()
    mailbox.append(message(1, 'pushed'))
    wait_for(lambda: readable(user, account, 'pushed'), timeout=5, interval=0.05,
             message='the appended message to be readable by push')
    (pushed,) = [m['id'] for m in messages(user, account_id=account) if m['subject'] == 'pushed']
    wait_for(lambda: any(json.loads(body)['data']['message_id'] == pushed
                         for _, _, _, body, _ in receiver.received[already:]), timeout=5, interval=0.05,
             message='its message.created webhook')
    assert time.monotonic() - started < 5 and receiver.all_valid('/hook')   # checked with standardwebhooks
    assert user.get(f'/api/v1/accounts/{account}').json['push'] is True


def test_a_burst_of_changes_queues_one_sync(user, mailbox, consumer, watcher):
    account = watched_account(user, mailbox)
    before = len(syncs_of(account))
    consumer.stop()   # the sync the first change queues waits for the whole burst
    try:
        for n in range(5):
            mailbox.append(message(n, f'burst {n}'))
        wait_for(lambda: len(syncs_of(account)) > before, timeout=5, message='a sync queued by push')
        assert stays(lambda: len(syncs_of(account)) == before + 1, 1.5), 'the burst queued more than one sync'
        assert syncs_of(account)[-1].args['folder_id'] is not None   # INBOX alone, not the whole account
    finally:
        consumer.start()
    wait_for(lambda: all(readable(user, account, f'burst {n}') for n in range(5)), timeout=15)
    assert len(syncs_of(account)) == before + 1


def test_a_rejected_login_gives_up_until_the_password_changes(user, mailbox, consumer, watcher):
    account = add_account(user, mailbox, password='wrong-password')
    first_sync_settled(FIRST_SYNC.pop(account))
    wait_for(lambda: push_state(user, account) == 'auth_error', timeout=15)
    failures = dovecot_login_failures(mailbox.user)
    assert stays(lambda: dovecot_login_failures(mailbox.user) == failures, 3 * float(
        WATCHER_ENV['EMAILSVC_WATCHER_MAX_BACKOFF'])), 'the watcher tried the rejected password again'
    assert 'wrong-password' not in (lease(account).detail or '')

    resp = user.patch(f'/api/v1/accounts/{account}', {'incoming': {'password': 'dove-pw-1'}})
    assert resp.status == 200, resp.text
    wait_until_idling(user, account)
    mailbox.append(message(1, 'after the fix'))
    wait_for(lambda: readable(user, account, 'after the fix'), timeout=10)


def test_push_off_lets_the_account_go(user, mailbox, consumer, watcher):
    account = watched_account(user, mailbox)
    resp = user.patch(f'/api/v1/accounts/{account}', {'push': False})
    assert resp.status == 200 and resp.json['push'] is False
    wait_for(lambda: lease(account) is None, timeout=5, message='the lease to be dropped')
    bad = user.patch(f'/api/v1/accounts/{account}', {'push': 'yes'})
    assert bad.status == 422 and bad.json['fields'] == {'push': 'must be true or false'}


def test_two_watchers_share_the_accounts_and_one_takes_over_when_the_other_dies(user, mailbox, consumer,
                                                                                watcher, unique):
    from tests.test_sync import Mailbox
    with models.all_tenants():   # the earlier tests' accounts: two accounts, two watchers, one each
        models.EmailClient.update(push=False).execute()
    boxes = [mailbox, Mailbox(STATE['dovecot'], f'{unique}b')]
    accounts = [watched_account(user, box) for box in boxes]
    first = watcher.holder()
    assert {lease(a).holder for a in accounts} == {first}
    second = WatcherProcess('watcher-2')
    try:
        def one_each():
            leases = [lease(a) for a in accounts]
            return all(row is not None and row.state == 'idling' for row in leases) and \
                {row.holder for row in leases} == {first, second.holder()}
        wait_for(one_each, timeout=15, message='the accounts to be shared out, one per watcher')
        assert stays(one_each, 1.0), 'an account changed hands between two live watchers'
        orphan = next(i for i, a in enumerate(accounts) if lease(a).holder == first)

        watcher.kill()
        killed = time.monotonic()
        wait_for(lambda: all(lease(a).holder != first and lease(a).state == 'idling' for a in accounts),
                 timeout=GRACE + 10, message='the second watcher to idle on every account')
        assert time.monotonic() - killed <= GRACE + 10
        assert {lease(a).holder for a in accounts} == {second.holder()}
        boxes[orphan].append(message(1, 'after takeover'))
        wait_for(lambda: readable(user, accounts[orphan], 'after takeover'), timeout=10)
    finally:
        second.stop()
    assert all(lease(a) is None for a in accounts), 'a clean stop hands its leases back'


def test_mail_that_came_while_nobody_watched_is_synced_on_connect(user, mailbox, consumer):
    account = add_account(user, mailbox)
    first_sync_settled(FIRST_SYNC.pop(account))
    mailbox.append(message(1, 'while unwatched'))
    process = WatcherProcess('watcher-late')
    try:
        wait_for(lambda: readable(user, account, 'while unwatched'), timeout=15)
    finally:
        process.stop()
    assert record(syncs_of(account)[-1].id).args['folder_id'] is not None


def test_plain_run_sh_starts_a_watcher_and_ctrl_c_stops_it(tmp_path):
    from tests.test_stop import Service
    service = Service(tmp_path, 'with-watcher', STATE['dovecot'].cert_path)
    try:
        service.start()
        wait_for(lambda: b'"watcher ' in service.log.read_bytes() and b' started"' in service.log.read_bytes()
                 and b'consumer serves lanes' in service.log.read_bytes(),
                 timeout=30, message='./run.sh to start a watcher and a consumer')
        service.ctrl_c()
        assert service.wait_stopped() == 0
    finally:
        service.kill()
    lines = service.log.read_bytes().splitlines()
    assert any(b'"message": "watcher ' in line and line.endswith(b' stopped"}') for line in lines), \
        'the watcher did not stop cleanly (handing its leases back)'


def test_a_dropped_connection_is_reconnected_and_keeps_pushing(user, mailbox, consumer, watcher):
    account = watched_account(user, mailbox)
    dovecot = STATE['dovecot']
    kicked = subprocess.run([dovecot.doveadm, '-c', str(dovecot.config), 'kick', mailbox.user],
                            capture_output=True, text=True)
    assert kicked.returncode == 0, kicked.stderr
    wait_for(lambda: f'account {account}: IDLE connection failed'.encode() in watcher.log.read_bytes(),
             timeout=10, message='the watcher to notice the dropped connection')
    wait_until_idling(user, account)
    mailbox.append(message(1, 'after reconnect'))
    wait_for(lambda: readable(user, account, 'after reconnect'), timeout=10)


@pytest.mark.parametrize('failures, low, high', [(1, 0.5, 1.0), (2, 1.0, 2.0), (5, 8.0, 16.0), (40, 150.0, 300.0)])
def test_reconnects_back_off_doubling_with_jitter_up_to_the_cap(failures, low, high):
    import watcher
    delays = {watcher.backoff(failures, 300.0) for _ in range(50)}
    assert all(low <= delay <= high for delay in delays) and len(delays) > 1
