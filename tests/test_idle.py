"""mailkit.idle against the session's real Dovecot: IDLE, its re-issue timer, and how it fails."""
import asyncio

import pytest

from mailkit import egress, idle
from mailkit.errors import AuthenticationFailed, TemporaryMailError
from tests.conftest import STATE
from tests.test_sync import PASSWORD, Mailbox, message

LOOPBACK = egress.Policy(['127.0.0.0/8'])


def server(mailbox, password=PASSWORD, security='none'):
    dovecot = mailbox.dovecot
    port = dovecot.imaps_port if security == 'tls' else dovecot.imap_port
    return idle.Server('127.0.0.1', port, security, mailbox.user, password)


@pytest.fixture
def mailbox(unique):
    return Mailbox(STATE['dovecot'], unique)


async def until(condition, timeout=10.0):
    """Wait on the event loop (the watch runs on it) until condition() holds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


def run_watch(target, scenario, **options):
    """Run watch(target) and scenario(events) together; returns the events seen."""
    events = {'changes': 0, 'idles': [], 'error': None}

    async def main():
        watching = asyncio.create_task(idle.watch(
            target, lambda: events.__setitem__('changes', events['changes'] + 1),
            on_idle=lambda status, count: events['idles'].append((status, count)),
            timeout=5, policy=LOOPBACK, ssl_context=STATE['dovecot'].ssl_context(), **options))
        try:
            await scenario(events, watching)
        finally:
            watching.cancel()
            try:
                await watching
            except (asyncio.CancelledError, Exception) as exc:  # noqa: B902
                events['error'] = exc
    asyncio.run(main())
    return events


@pytest.mark.parametrize('security', ['none', 'starttls', 'tls'])
def test_append_is_announced_while_idling(mailbox, security):
    mailbox.append(message(1))

    async def scenario(events, _):
        await until(lambda: events['idles'])
        await asyncio.to_thread(mailbox.append, message(2))
        await until(lambda: events['changes'] >= 1)

    events = run_watch(server(mailbox, security=security), scenario)
    status, count = events['idles'][0]
    assert (status.exists, count) == (1, 1)
    assert status.uidnext == 2 and status.uidvalidity and status.highestmodseq


def test_idle_is_reissued_when_its_timer_fires(mailbox):
    async def scenario(events, _):
        await until(lambda: len(events['idles']) >= 3)    # DONE, tagged OK, IDLE again: twice
        await asyncio.to_thread(mailbox.append, message(1))
        await until(lambda: events['changes'] >= 1)

    events = run_watch(server(mailbox), scenario, idle_seconds=0.3)
    assert [count for _, count in events['idles'][:3]] == [1, 2, 3]


def test_expunge_and_flag_changes_are_announced(mailbox):
    mailbox.append(message(1), message(2))

    async def scenario(events, _):
        await until(lambda: events['idles'])
        await asyncio.to_thread(mailbox.change, 'INBOX', lambda s: s.store_flags([1], add=['\\Flagged']))
        await until(lambda: events['changes'] >= 1)
        seen = events['changes']
        await asyncio.to_thread(mailbox.change, 'INBOX', lambda s: s.expunge_uids([2]))
        await until(lambda: events['changes'] > seen)

    run_watch(server(mailbox), scenario)


def test_wrong_password_is_authentication_failed(mailbox):
    async def scenario(events, watching):
        await asyncio.wait([watching], timeout=10)

    events = run_watch(server(mailbox, password='wrong'), scenario)
    assert isinstance(events['error'], AuthenticationFailed)
    assert 'wrong' not in str(events['error'])


def test_loopback_is_refused_by_the_default_policy(mailbox):
    async def main():
        await idle.watch(server(mailbox), lambda: None, policy=egress.Policy())
    with pytest.raises(Exception) as caught:
        asyncio.run(main())
    assert caught.value.code == 'destination_not_allowed'


def test_server_gone_is_temporary(mailbox):
    dovecot = mailbox.dovecot

    async def main():
        target = idle.Server('127.0.0.1', dovecot.pop3_port, 'none', mailbox.user, PASSWORD)  # POP3 greets "+OK"
        await idle.watch(target, lambda: None, policy=LOOPBACK, timeout=3)
    with pytest.raises(Exception) as caught:
        asyncio.run(main())
    assert caught.value.code == 'not_a_mail_server'
    refused = idle.Server('127.0.0.1', 1, 'none', mailbox.user, PASSWORD)
    with pytest.raises(TemporaryMailError):
        asyncio.run(idle.watch(refused, lambda: None, policy=LOOPBACK, timeout=3))
