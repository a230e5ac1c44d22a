"""The real servers behind the test suite (tests/services.py): each one starts,
speaks its protocol the way our tests will rely on, and stops by PID."""

import imaplib
import os
import poplib
import re
import smtplib
import socket
import ssl

import psycopg2
import pytest
import redis as redis_client

from tests import services

MESSAGE = (b'From: Alice <alice@example.org>\r\nTo: Bob <bob@example.org>\r\n'
           b'Subject: hello\r\nMessage-ID: <1@example.org>\r\n\r\nHi Bob.\r\n.leading dot\r\n')


def assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def start_once(start, tmp_path_factory, name):
    """Start one server for this module; stop it by PID afterwards and check that it is gone."""
    server = start(tmp_path_factory.mktemp(name))
    yield server
    server.stop()
    assert_gone(server.pid)


# ---------------------------------------------------------------- helpers

def test_free_ports_are_distinct_and_bindable():
    ports = {services.free_port() for _ in range(20)}
    assert len(ports) == 20
    for port in ports:
        with socket.socket() as sock:
            sock.bind(('127.0.0.1', port))


def test_missing_program_says_how_to_install_it():
    with pytest.raises(services.ServiceError, match=r'^no-such-server not found: apt-get install no-such-pkg '):
        services._require('no-such-server', 'no-such-pkg')


# ---------------------------------------------------------------- Redis

@pytest.fixture(scope='module')
def redis(tmp_path_factory):
    yield from start_once(services.start_redis, tmp_path_factory, 'redis')


def test_redis_keeps_data_across_restart(redis):
    client = redis_client.Redis.from_url(redis.url)
    assert client.ping()
    assert client.config_get('appendonly') == {'appendonly': 'yes'}
    client.set('greeting', 'hello')
    client.close()
    old_pid = redis.pid
    redis.restart()
    assert_gone(old_pid)
    client = redis_client.Redis.from_url(redis.url)
    assert client.get('greeting') == b'hello'
    client.close()


# ---------------------------------------------------------------- PostgreSQL

@pytest.fixture(scope='module')
def postgres(tmp_path_factory):
    yield from start_once(services.start_postgres, tmp_path_factory, 'postgres')


def query(url, sql, *args):
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


def test_postgres_serves_the_test_database_on_loopback(postgres):
    assert postgres.url.endswith(f'@127.0.0.1:{postgres.port}/emailsvc_test')
    assert query(postgres.url, 'SELECT current_database(), current_setting(%s), current_setting(%s)',
                 'listen_addresses', 'fsync') == [('emailsvc_test', '127.0.0.1', 'off')]


def test_postgres_wants_the_password(postgres):
    with pytest.raises(psycopg2.OperationalError, match='password authentication failed'):
        psycopg2.connect(postgres.url.replace(postgres.password, 'wrong'))


def test_created_database_is_empty_and_survives_restart(postgres):
    url = postgres.create_database('survivor')
    assert query(url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]
    query(url, 'CREATE TABLE note (body text); INSERT INTO note VALUES (%s)', 'kept')
    old_pid = postgres.pid
    postgres.restart()
    assert_gone(old_pid)
    assert query(url, 'SELECT body FROM note') == [('kept',)]


# ---------------------------------------------------------------- Dovecot

@pytest.fixture(scope='module')
def dovecot(tmp_path_factory):
    yield from start_once(services.start_dovecot, tmp_path_factory, 'dovecot')


@pytest.fixture
def mailbox_user(dovecot, request):
    """A user of its own for each test, so mailbox contents do not leak between tests."""
    name = re.sub(r'\W', '', request.node.name)[-40:]
    dovecot.add_user(name, 'secret-' + name)
    return name, 'secret-' + name


def capabilities(conn: imaplib.IMAP4) -> set[str]:
    """Ask again: imaplib keeps the list the server sent before login."""
    typ, data = conn.capability()
    return set(data[0].decode().upper().split())


def test_imap_login_in_plain_and_after_starttls(dovecot, mailbox_user):
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as conn:
        assert 'STARTTLS' in conn.capabilities
        assert conn.login(*mailbox_user)[0] == 'OK'
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as conn:
        conn.starttls(ssl_context=dovecot.ssl_context())
        assert conn.login(*mailbox_user)[0] == 'OK'


def test_imaps_presents_the_certificate_only_its_context_trusts(dovecot, mailbox_user):
    with imaplib.IMAP4_SSL(dovecot.host, dovecot.imaps_port, ssl_context=dovecot.ssl_context()) as conn:
        assert conn.login(*mailbox_user)[0] == 'OK'
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL(dovecot.host, dovecot.imaps_port, ssl_context=ssl.create_default_context())


def test_imap_wrong_password_is_refused(dovecot, mailbox_user):
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as conn:
        with pytest.raises(imaplib.IMAP4.error, match='AUTHENTICATIONFAILED'):
            conn.login(mailbox_user[0], 'wrong')


def test_capabilities_after_login(dovecot, mailbox_user):
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as conn:
        conn.login(*mailbox_user)
        assert {'CONDSTORE', 'QRESYNC', 'SPECIAL-USE', 'UIDPLUS', 'MOVE', 'IDLE'} <= capabilities(conn)


def test_list_shows_special_use_folders(dovecot, mailbox_user):
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as conn:
        conn.login(*mailbox_user)
        typ, lines = conn.list()
    folders = {line.decode().rsplit(' ', 1)[-1].strip('"'): line.decode() for line in lines}
    for name, flag in [('Sent', r'\Sent'), ('Trash', r'\Trash'), ('Junk', r'\Junk'),
                       ('Drafts', r'\Drafts'), ('Archive', r'\Archive')]:
        assert flag in folders[name]
    assert 'INBOX' in folders


def test_appended_message_comes_back_byte_for_byte(dovecot, mailbox_user):
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as conn:
        conn.login(*mailbox_user)
        assert conn.append('INBOX', None, None, MESSAGE)[0] == 'OK'
        typ, data = conn.select('INBOX')
        assert data == [b'1']
        typ, data = conn.uid('FETCH', '1:*', '(BODY.PEEK[])')
    assert data[0][1] == MESSAGE
    assert any(path.is_file() for path in (dovecot.maildir(mailbox_user[0]) / 'cur').iterdir())


def test_pop3_plain_stls_and_pop3s(dovecot, mailbox_user):
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as conn:
        conn.login(*mailbox_user)
        conn.append('INBOX', None, None, MESSAGE)
    plain = poplib.POP3(dovecot.host, dovecot.pop3_port)
    plain.stls(context=dovecot.ssl_context())
    plain.user(mailbox_user[0])
    plain.pass_(mailbox_user[1])
    assert plain.stat()[0] == 1
    uidl = plain.uidl(1).decode().split()[-1]
    assert re.fullmatch(r'[0-9a-f]{16}', uidl)   # pop3_uidl_format = %08Xu%08Xv (Dovecot writes lower-case hex)
    plain.quit()
    secure = poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=dovecot.ssl_context())
    secure.user(mailbox_user[0])
    secure.pass_(mailbox_user[1])
    assert b'\r\n'.join(secure.retr(1)[1]) + b'\r\n' == MESSAGE
    secure.quit()


def test_new_user_and_new_password_work_at_once(dovecot):
    dovecot.add_user('latecomer', 'first')
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as conn:
        assert conn.login('latecomer', 'first')[0] == 'OK'
    dovecot.add_user('latecomer', 'other')   # same length, same second: add_user makes Dovecot notice
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as conn:
        assert conn.login('latecomer', 'other')[0] == 'OK'


# ---------------------------------------------------------------- SMTP

@pytest.fixture(scope='module')
def smtp_server(tmp_path_factory):
    server = services.start_smtp(tmp_path_factory.mktemp('smtp'))
    server.add_user('sender', 'sender-secret')
    yield server
    server.stop()
    assert_gone(server.pid)


@pytest.fixture
def smtp(smtp_server):
    """The module's SMTP server with nothing received and nothing scripted."""
    smtp_server.clear()
    return smtp_server


def send(server, *, recipients=('bob@example.org',), mechanism='PLAIN', implicit_tls=False):
    """Submit MESSAGE as a mail client would; returns sendmail's refused recipients."""
    if implicit_tls:
        conn = smtplib.SMTP_SSL(server.host, server.tls_port, context=server.ssl_context(), timeout=10)
    else:
        conn = smtplib.SMTP(server.host, server.port, timeout=10)
        conn.starttls(context=server.ssl_context())
    with conn:
        conn.user, conn.password = 'sender', 'sender-secret'
        conn.ehlo()
        conn.auth(mechanism, getattr(conn, f'auth_{mechanism.lower()}'))
        return conn.sendmail('alice@example.org', list(recipients), MESSAGE)


def test_starttls_with_auth_login_and_plain_delivers_to_every_recipient(smtp):
    assert send(smtp, recipients=['bob@example.org', 'carol@example.net'], mechanism='LOGIN') == {}
    assert send(smtp, mechanism='PLAIN') == {}
    first, second = smtp.received()
    assert first['mail_from'] == 'alice@example.org'
    assert first['rcpt_tos'] == ['bob@example.org', 'carol@example.net']
    assert first['data'] == MESSAGE   # dot-stuffing undone
    assert first['tls'] and first['login'] == 'sender' and first['peer'].startswith('127.0.0.1:')
    assert second['rcpt_tos'] == ['bob@example.org']


def test_implicit_tls_delivers(smtp):
    send(smtp, implicit_tls=True)
    assert [m['tls'] for m in smtp.received()] == [True]


def test_no_auth_before_starttls_and_no_mail_without_auth(smtp):
    with smtplib.SMTP(smtp.host, smtp.port, timeout=10) as conn:
        conn.ehlo()
        assert conn.has_extn('starttls') and not conn.has_extn('auth')
        assert conn.docmd('AUTH', 'PLAIN AHNlbmRlcgBzZW5kZXItc2VjcmV0')[0] == 538
        assert conn.docmd('MAIL', 'FROM:<alice@example.org>')[0] == 530


def test_wrong_smtp_password_is_refused(smtp):
    with smtplib.SMTP(smtp.host, smtp.port, timeout=10) as conn:
        conn.starttls(context=smtp.ssl_context())
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            conn.login('sender', 'wrong')
    assert refused.value.smtp_code == 535


def test_scripted_451_on_data_is_not_delivered_and_the_next_send_is(smtp):
    smtp.script_replies(data='451 4.3.0 Try again later', times=2)
    for _ in range(2):
        with pytest.raises(smtplib.SMTPDataError) as refused:
            send(smtp)
        assert refused.value.smtp_code == 451
    assert smtp.received() == []
    send(smtp)
    assert len(smtp.received()) == 1


def test_refused_recipient_gets_its_reply_and_the_others_the_message(smtp):
    smtp.script_replies(rcpt={'Bad@Example.org': '550 5.1.1 no such user'})
    refused = send(smtp, recipients=['bad@example.org', 'bob@example.org'])
    assert refused == {'bad@example.org': (550, b'5.1.1 no such user')}
    assert [m['rcpt_tos'] for m in smtp.received()] == [['bob@example.org']]


def test_drop_after_data_closes_without_reply_and_stores_nothing(smtp):
    smtp.drop_after_data()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        send(smtp)
    assert smtp.received() == []
    send(smtp)
    assert len(smtp.received()) == 1


def test_smtp_restart_keeps_what_was_received(smtp):
    send(smtp)
    old_pid = smtp.pid
    smtp.restart()
    assert_gone(old_pid)
    send(smtp)
    assert len(smtp.received()) == 2


def test_scripted_reply_must_be_a_reply(smtp):
    with pytest.raises(ValueError):
        smtp.script_replies(data='try again')


def test_auth_on_the_plain_port_when_tls_is_not_required(tmp_path_factory):
    server = services.start_smtp(tmp_path_factory.mktemp('smtp-plain'), auth_require_tls=False)
    try:
        server.add_user('sender', 'sender-secret')
        with smtplib.SMTP(server.host, server.port, timeout=10) as conn:
            conn.login('sender', 'sender-secret')
            conn.sendmail('alice@example.org', ['bob@example.org'], MESSAGE)
        assert [(m['tls'], m['login']) for m in server.received()] == [(False, 'sender')]
    finally:
        server.stop()
    assert_gone(server.pid)
