"""mailkit.egress: the egress policy, and connection failures named by fixed codes.

Real servers: the private Dovecot and SMTP server of tests/services.py, and
small TCP servers started here on loopback (a thread each) for what a mail
server would not do: an SSH banner, a BYE greeting, a certificate made out
to a host name only.
"""
import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailkit import egress, imap, pop3, smtp
from mailkit.errors import AuthenticationFailed, PermanentMailError, TemporaryMailError
from tests import services
from tests.conftest import STATE

LOOPBACK = egress.Policy(allowed_networks=['127.0.0.0/8', '::1/128'])
PASSWORD = 'secret-pw'
PROTOCOLS = ('imap', 'pop3', 'smtp')


@pytest.fixture(scope='module')
def dovecot(tmp_path_factory):
    server = services.start_dovecot(tmp_path_factory.mktemp('egress-dovecot'))
    server.add_user('egress', PASSWORD)
    yield server
    server.stop()


@pytest.fixture(scope='module')
def smtp_server(tmp_path_factory):
    server = services.start_smtp(tmp_path_factory.mktemp('egress-smtp'))
    server.add_user('egress', PASSWORD)
    yield server
    server.stop()


def ports(protocol, dovecot, smtp_server) -> tuple[int, int]:
    """(clear-text port, implicit-TLS port) of the real server for protocol."""
    return {'imap': (dovecot.imap_port, dovecot.imaps_port), 'pop3': (dovecot.pop3_port, dovecot.pop3s_port),
            'smtp': (smtp_server.port, smtp_server.tls_port)}[protocol]


def open_session(protocol, host, port, security, *, context=None, timeout=5, password=PASSWORD, **kwargs):
    """A logged-in session of protocol; the caller closes it."""
    if protocol == 'smtp':
        return smtp.SmtpConnection(host, port, security, 'egress', password, timeout=timeout, ssl_context=context,
                                   **kwargs)
    session = imap.ImapSession if protocol == 'imap' else pop3.Pop3Session
    return session(host, port, security, 'egress', password, timeout=timeout, ssl_context=context, **kwargs)


def failure(call):
    """(the MailError call raised, seconds it took)."""
    started = time.monotonic()
    with pytest.raises((PermanentMailError, TemporaryMailError)) as caught:
        call()
    return caught.value, time.monotonic() - started


@contextlib.contextmanager
def banner_server(banner: bytes, context: ssl.SSLContext | None = None, reply: bytes | None = None):
    """A loopback server that sends banner to each client (over TLS with context), answers every line
    with reply (if given) and keeps the connection until the client hangs up. Yields (port, accepted list)."""
    listener = socket.create_server(('127.0.0.1', 0))
    accepted = []

    def serve(conn):
        with contextlib.suppress(OSError), conn:   # a client that gave up mid-handshake is no failure here
            if context is not None:
                conn = context.wrap_socket(conn, server_side=True)
            conn.sendall(banner)
            while line := conn.recv(4096):
                if reply is not None:
                    conn.sendall(reply * line.count(b'\n'))

    def accept():
        with contextlib.suppress(OSError):   # the listener was closed: the test is over
            while True:
                conn, _ = listener.accept()
                accepted.append(conn)
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], accepted
    finally:
        listener.shutdown(socket.SHUT_RDWR)   # wakes the blocked accept(), which close() alone does not
        listener.close()
        thread.join(5)
        assert not thread.is_alive()


# ---------------------------------------------------------------- the policy

@pytest.mark.parametrize('address', [
    '127.0.0.1', '127.45.6.7', '::1', '0.0.0.0', '0.1.2.3', '::', '169.254.169.254', '169.254.10.10',
    'fe80::1', 'fe80::1%eth0', 'fd00:ec2::254', '100.100.100.200',
    '::ffff:127.0.0.1', '::ffff:169.254.169.254', '::127.0.0.1',
])
def test_the_default_policy_refuses_loopback_link_local_and_metadata(address):
    assert not egress.Policy().allows(address)


@pytest.mark.parametrize('address', ['192.0.2.10', '2001:db8::25', '10.1.2.3', '::ffff:192.0.2.10', '100.64.0.1'])
def test_the_default_policy_allows_other_addresses(address):
    assert egress.Policy().allows(address)
    assert egress.Policy().allows(ipaddress.ip_address(address))


def test_allowed_networks_lift_default_denials_and_nothing_else():
    policy = egress.Policy(allowed_networks=['127.0.0.0/8'])
    assert policy.allows('127.0.0.1') and policy.allows('::ffff:127.0.0.1')
    assert not policy.allows('::1') and not policy.allows('169.254.169.254')
    assert policy.allows('192.0.2.10')   # not an allowlist: other destinations stay allowed


def test_denied_networks_always_win():
    policy = egress.Policy(allowed_networks=['127.0.0.0/8', '10.0.0.0/8'],
                           denied_networks=['127.0.0.1/32', '10.9.0.0/16', '2001:db8::/32'])
    assert not policy.allows('127.0.0.1') and not policy.allows('::ffff:127.0.0.1')
    assert policy.allows('127.0.0.2')
    assert not policy.allows('10.9.1.1') and policy.allows('10.8.1.1')
    assert not policy.allows('2001:db8::25')
    assert not egress.Policy(denied_networks=egress.PRIVATE_NETWORKS).allows('192.168.1.1')


@pytest.mark.parametrize('entry', ['10.0.0.1/8', 'not-a-network', '300.0.0.0/8'])
def test_a_bad_network_names_the_setting(entry):
    with pytest.raises(ValueError, match=f'denied_networks: {entry!r} is not a network'):
        egress.Policy(denied_networks=[entry])


# ---------------------------------------------------------------- the policy on real sessions

@pytest.mark.parametrize('protocol', PROTOCOLS)
def test_the_default_policy_refuses_the_loopback_server_and_an_allowed_network_reaches_it(
        dovecot, smtp_server, protocol):
    plain, _ = ports(protocol, dovecot, smtp_server)
    security = 'starttls' if protocol == 'smtp' else 'none'
    context = dovecot.ssl_context() if protocol != 'smtp' else smtp_server.ssl_context()
    for host in ('127.0.0.1', 'localhost'):   # an address, and a name that resolves to one
        error, _ = failure(lambda host=host: open_session(protocol, host, plain, security, context=context,
                                                          egress=egress.Policy()))
        assert isinstance(error, PermanentMailError) and error.code == 'destination_not_allowed'
        assert f'{host}:{plain} is not an address this service may connect to' in str(error)
    session = open_session(protocol, '127.0.0.1', plain, security, context=context, egress=LOOPBACK)
    session.close()


def test_a_refused_destination_is_never_contacted():
    with banner_server(b'* OK IMAP4rev1 ready\r\n') as (port, accepted):
        error, _ = failure(lambda: imap.ImapSession('127.0.0.1', port, 'none', 'u', 'p', timeout=5,
                                                    egress=egress.Policy()))
        assert error.code == 'destination_not_allowed' and accepted == []
        # The same words whether or not anything listens: a closed port says no more.
        closed, _ = failure(lambda: imap.ImapSession('127.0.0.1', services.free_port(), 'none', 'u', 'p',
                                                     timeout=5, egress=egress.Policy()))
        assert str(closed).split(':', 2)[2] == str(error).split(':', 2)[2]


def hostname_only_certificate(directory):
    """(cert_path, key_path) of a self-signed certificate for DNS name 'localhost' and no IP address."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'localhost'),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f'egress-{time.monotonic_ns()}')])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName('localhost')]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / 'cert.pem', directory / 'key.pem'
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_checks_the_host_name_not_the_address_connected_to(tmp_path):
    cert_path, key_path = hostname_only_certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_path, key_path)
    client_context = services.trusting(cert_path)
    with banner_server(b'+OK POP3 ready\r\n', server_context, reply=b'-ERR [AUTH] no such user\r\n') as (port, _):
        # By name: the certificate matches, the greeting comes, the login is refused.
        with pytest.raises(AuthenticationFailed):
            pop3.Pop3Session('localhost', port, 'tls', 'u', 'p', timeout=5, ssl_context=client_context,
                             egress=LOOPBACK)
        # By address: the same server, but 127.0.0.1 is not in its certificate.
        error, _ = failure(lambda: pop3.Pop3Session('127.0.0.1', port, 'tls', 'u', 'p', timeout=5,
                                                    ssl_context=client_context, egress=LOOPBACK))
        assert error.code == 'certificate_untrusted'


# ---------------------------------------------------------------- connection failures by code

@pytest.mark.parametrize('protocol', PROTOCOLS)
def test_tls_on_a_clear_text_port_is_permanent_and_quick(dovecot, smtp_server, protocol):
    plain, _ = ports(protocol, dovecot, smtp_server)
    error, took = failure(lambda: open_session(protocol, '127.0.0.1', plain, 'tls'))
    assert isinstance(error, PermanentMailError) and error.code == 'tls_on_plain_port'
    assert 'try security "starttls" or "none"' in str(error)
    assert took < 1


@pytest.mark.parametrize('protocol', PROTOCOLS)
def test_clear_text_on_a_tls_port_is_permanent(dovecot, smtp_server, protocol):
    _, tls = ports(protocol, dovecot, smtp_server)
    # The server waits for a ClientHello and we for a greeting: after the
    # timeout a TLS handshake on a second connection tells why.
    error, took = failure(lambda: open_session(protocol, '127.0.0.1', tls, 'none', timeout=0.5))
    assert isinstance(error, PermanentMailError) and error.code == 'plain_on_tls_port'
    assert 'try security "tls"' in str(error)
    assert took < 3


@pytest.mark.parametrize('protocol', PROTOCOLS)
def test_a_closed_port_is_refused_and_temporary(protocol):
    error, _ = failure(lambda: open_session(protocol, '127.0.0.1', services.free_port(), 'none'))
    assert isinstance(error, TemporaryMailError) and error.code == 'refused'


@pytest.mark.parametrize('protocol', PROTOCOLS)
def test_an_unknown_host_is_host_not_found_and_temporary(protocol):
    error, _ = failure(lambda: open_session(protocol, 'no-such-host.invalid', 25, 'none'))   # RFC 2606
    assert isinstance(error, TemporaryMailError) and error.code == 'host_not_found'


@pytest.mark.parametrize('protocol', PROTOCOLS)
@pytest.mark.parametrize('security', ['none', 'starttls', 'tls'])
def test_a_banner_is_neither_a_mail_server_nor_repeated(protocol, security):
    with banner_server(b'SSH-2.0-OpenSSH_9.2 secret-banner\r\n') as (port, _):
        error, took = failure(lambda: open_session(protocol, '127.0.0.1', port, security))
    assert isinstance(error, PermanentMailError)
    assert error.code == ('tls_on_plain_port' if security == 'tls' else 'not_a_mail_server')
    for leak in ('secret-banner', 'OpenSSH', 'SSH-2.0'):
        assert leak not in str(error) and leak not in repr(error.__cause__)
    assert took < 1   # not a wait for the timeout


@pytest.mark.parametrize('protocol, greeting, code', [
    ('imap', b'* BYE Too many connections\r\n', 'server_busy'),
    ('pop3', b'-ERR [SYS/TEMP] Too many connections\r\n', 'server_busy'),
    ('smtp', b'421 4.3.2 Too busy\r\n', 'server_busy'),
    ('smtp', b'554 5.7.1 No service for you\r\n', 'turned_away'),
    ('pop3', b'+ garbage\r\n', 'not_a_mail_server'),
])
def test_a_mail_server_that_turns_us_away_says_whether_to_retry(protocol, greeting, code):
    with banner_server(greeting) as (port, _):
        error, _ = failure(lambda: open_session(protocol, '127.0.0.1', port, 'none'))
    assert error.code == code
    assert isinstance(error, TemporaryMailError) == (code == 'server_busy')
    assert b'Too' not in greeting or 'Too' not in str(error)


@pytest.mark.parametrize('protocol', PROTOCOLS)
def test_a_wrong_password_is_auth_rejected(smtp_server, protocol):
    # IMAP and POP3 against the session's Dovecot: in full-suite runs this module's own instance answered
    # every wrong password with "Temporary authentication failure" (never when run alone; cause not found).
    if protocol == 'smtp':
        plain, context = smtp_server.port, smtp_server.ssl_context()
        def attempt():
            return open_session('smtp', '127.0.0.1', plain, 'starttls', context=context, password='wrong-password-123')
    else:
        server = STATE['dovecot']
        server.add_user('egress-wrong', PASSWORD)
        session = imap.ImapSession if protocol == 'imap' else pop3.Pop3Session
        plain = server.imap_port if protocol == 'imap' else server.pop3_port
        def attempt():
            return session('127.0.0.1', plain, 'none', 'egress-wrong', 'wrong-password-123', timeout=5,
                           ssl_context=server.ssl_context())
    error, _ = failure(attempt)
    assert isinstance(error, AuthenticationFailed) and error.code == 'auth_rejected'
    assert 'check the username and password' in str(error) and 'wrong-password-123' not in str(error)
