"""mailkit.pop3 against a real private Dovecot (tests/services.py).

Each test gets a fresh mail user; messages go in over IMAP APPEND, the way
they would arrive in the maildrop we read over POP3.
"""

import imaplib
import itertools
import socket
import ssl
import time

import pytest

from mailkit import pop3
from mailkit.errors import AuthenticationFailed, InvalidSetting, PermanentMailError, TemporaryMailError
from tests import services

_user_numbers = itertools.count(1)

MESSAGES = [
    b'From: Alice <alice@example.org>\r\nSubject: one\r\n\r\nHello.\r\n',
    # POP3 dot-stuffs lines that start with "." (RFC 1939, 3); a lone "." would end the reply.
    b'From: Alice <alice@example.org>\r\nSubject: two\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n',
    # Longer than poplib's own 2,048-byte line limit.
    b'From: Alice <alice@example.org>\r\nSubject: three\r\n\r\n' + b'<p>' * 3000 + b'\r\n',
]


@pytest.fixture(scope='module')
def dovecot(tmp_path_factory):
    server = services.start_dovecot(tmp_path_factory.mktemp('pop3'))
    yield server
    server.stop()


@pytest.fixture
def account(dovecot):
    """(username, password) of a new mailbox holding MESSAGES."""
    username, password = f'pop{next(_user_numbers)}', 'secret-pw'
    dovecot.add_user(username, password)
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=5) as conn:
        conn.login(username, password)
        for raw in MESSAGES:
            assert conn.append('INBOX', None, None, raw)[0] == 'OK'
    return username, password


def open_session(dovecot, account, security='none', **kwargs) -> pop3.Pop3Session:
    port = dovecot.pop3s_port if security == 'tls' else dovecot.pop3_port
    kwargs.setdefault('ssl_context', dovecot.ssl_context())
    return pop3.Pop3Session(dovecot.host, port, security, *account, timeout=5, **kwargs)


@pytest.mark.parametrize('security', ['none', 'starttls', 'tls'])
def test_uidl_fetch_and_delete_with_each_security(dovecot, account, security):
    with open_session(dovecot, account, security) as session:
        assert isinstance(session.conn.sock, ssl.SSLSocket) == (security != 'none')
        ids = session.uidl()
        assert sorted(ids.values()) == [1, 2, 3]
        assert [session.fetch(number) for number in (1, 2, 3)] == MESSAGES
        session.delete([2])
    with open_session(dovecot, account, security) as session:   # QUIT committed the deletion
        remaining = session.uidl()
        assert set(remaining) == set(ids) - {ids_by_number(ids)[2]}
        assert [session.fetch(remaining[unique_id]) for unique_id in sorted(remaining)] == [
            MESSAGES[0], MESSAGES[2]]


def test_delete_wants_numbers_not_unique_ids(dovecot, account):
    with open_session(dovecot, account) as session:
        with pytest.raises(TypeError, match='message numbers'):
            session.delete([next(iter(session.uidl()))])


def ids_by_number(ids: dict[str, int]) -> dict[int, str]:
    return {number: unique_id for unique_id, number in ids.items()}


def test_unique_ids_survive_sessions_and_numbers_do_not_matter(dovecot, account):
    with open_session(dovecot, account) as session:
        first = session.uidl()
        session.delete([1])
    with open_session(dovecot, account) as session:
        second = session.uidl()
    # Numbers shift down after a deletion; the unique ids of the others stay.
    assert set(second) == set(first) - {ids_by_number(first)[1]}
    assert sorted(second.values()) == [1, 2]


def test_leaving_on_an_error_deletes_nothing(dovecot, account):
    with pytest.raises(RuntimeError):
        with open_session(dovecot, account) as session:
            session.delete([1, 2, 3])
            raise RuntimeError('the caller failed to store the messages')
    with open_session(dovecot, account) as session:
        assert len(session.uidl()) == 3


def test_fetching_a_deleted_message_is_permanent(dovecot, account):
    with open_session(dovecot, account) as session:
        session.delete([1])
        with pytest.raises(PermanentMailError, match='refused fetching message 1: -ERR Message is deleted'):
            session.fetch(1)
        with pytest.raises(PermanentMailError, match='no message 9'):
            session.fetch(9)


def test_wrong_password_fails_fast_and_does_not_echo_it(dovecot, account):
    started = time.monotonic()
    with pytest.raises(AuthenticationFailed, match=r'rejected the login .*\[AUTH\]') as caught:
        open_session(dovecot, (account[0], 'wrong-password-123'))
    assert time.monotonic() - started < 2   # Dovecot answers failures on a 0.5 s timer
    assert 'wrong-password-123' not in str(caught.value)


def test_non_ascii_password_logs_in(dovecot):
    account = (f'pop{next(_user_numbers)}', 'pässwört-日本')
    dovecot.add_user(*account)
    with open_session(dovecot, account) as session:
        assert session.uidl() == {}


@pytest.mark.parametrize('security', ['starttls', 'tls'])
def test_default_context_rejects_the_self_signed_certificate(dovecot, account, security):
    with pytest.raises(PermanentMailError, match=r'certificate we do not trust \(self-signed certificate\)') as caught:
        open_session(dovecot, account, security, ssl_context=None)
    assert caught.value.code == 'certificate_untrusted'


def test_a_username_carrying_commands_is_refused_before_anything_is_sent(dovecot, account):
    username, password = account
    # Sent as it was, poplib's "USER " + this logged in, deleted message 1 and committed with QUIT.
    evil = f'{username}\r\nPASS {password}\r\nDELE 1\r\nQUIT'
    with pytest.raises(InvalidSetting, match='the username contains a control character') as caught:
        open_session(dovecot, (evil, password))
    assert isinstance(caught.value, ValueError) and password not in str(caught.value)
    with open_session(dovecot, account) as session:
        assert sorted(session.uidl().values()) == [1, 2, 3]


@pytest.mark.parametrize('field', ['host', 'username', 'password'])
def test_control_characters_in_settings_are_refused(dovecot, account, field):
    settings = {'host': dovecot.host, 'username': account[0], 'password': account[1]}
    settings[field] += '\x00'
    with pytest.raises(InvalidSetting, match=f'the {field} contains a control character'):
        pop3.Pop3Session(settings['host'], dovecot.pop3_port, 'none', settings['username'], settings['password'],
                         timeout=5)


def test_a_password_with_spaces_quotes_and_backslashes_logs_in(dovecot):
    account = (f'pop{next(_user_numbers)}', ' a b "c" \\d\\ ')
    dovecot.add_user(*account)
    with open_session(dovecot, account) as session:
        assert session.uidl() == {}


def test_refused_port_is_temporary(dovecot, account):
    port = services.free_port()   # nothing listens there
    with pytest.raises(TemporaryMailError, match='refused the connection') as caught:
        pop3.Pop3Session(dovecot.host, port, 'none', *account, timeout=5)
    assert caught.value.code == 'refused'


def test_silent_server_times_out_as_temporary(account):
    with socket.create_server(('127.0.0.1', 0)) as listener:   # accepts via the backlog, never greets
        started = time.monotonic()
        with pytest.raises(TemporaryMailError, match='timed out') as caught:
            pop3.Pop3Session('127.0.0.1', listener.getsockname()[1], 'none', *account, timeout=0.3)
        assert time.monotonic() - started < 2   # the greeting's wait, then a TLS probe's
        assert caught.value.code == 'timed_out'


def test_a_closed_session_says_so(dovecot, account):
    session = open_session(dovecot, account)
    session.close()
    session.close()   # a no-op the second time
    with pytest.raises(TemporaryMailError, match='closed'):
        session.uidl()
