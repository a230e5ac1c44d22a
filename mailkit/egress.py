"""Outbound connections: where the service may connect, the one way it does, and what a failure is called.

Why a policy
------------
Tenants choose the hosts of their mail servers. Without a check, a tenant
can make a worker connect to the worker's own loopback services, to a cloud
metadata endpoint (169.254.169.254 hands out credentials), or to anything else
the worker can reach, and read the outcome back from the error (a port scan
by proxy). A Policy names what is refused:

- by default: loopback (127.0.0.0/8, ::1), "this host" (0.0.0.0/8, ::),
  IPv4-compatible IPv6 (::/96), link-local (169.254.0.0/16, fe80::/10) and the
  metadata addresses of the big clouds (169.254.169.254, fd00:ec2::254,
  Alibaba's 100.100.100.200);
- `allowed_networks` lift those default denials (tests and the embedded quick
  start allow 127.0.0.0/8); they do not restrict anything else;
- `denied_networks` are refused always, whatever is allowed (an operator adds
  their internal ranges here; PRIVATE_NETWORKS lists the usual ones).

An IPv4-mapped IPv6 address (::ffff:127.0.0.1) is judged as the IPv4
address it carries.

Why on the resolved address, at connect time
--------------------------------------------
Checking a host name when an account is saved proves nothing: its DNS
answer may change afterwards (DNS rebinding), even between two lookups of one
connection attempt. `connect` resolves the name once, checks each address,
and connects to exactly the address it checked. The TLS layer still checks
the certificate against the host name the user gave (RFC 6125), never the
address.

Failures
--------
A failed connection becomes one of the fixed codes of
mailkit.errors.CONNECTION_FAILURES: `classify` names the OSErrors raised while
connecting, greeting and starting TLS. Nothing the far end sent before it
greeted like a mail server goes into a message, and a refused destination
is refused before any packet leaves, so its error cannot tell whether
anything listens there.
"""

import dataclasses
import errno
import ipaddress
import socket
import ssl

from mailkit.errors import MailError, connection_failure

DEFAULT_DENIED = (
    '127.0.0.0/8', '::1/128',                 # loopback
    '0.0.0.0/8', '::/128',                    # "this host": Linux connects 0.0.0.0 to loopback
    '::/96',                                  # IPv4-compatible IPv6 (deprecated, RFC 4291, 2.5.5.1)
    '169.254.0.0/16', 'fe80::/10',            # link-local, where metadata services live
    '169.254.169.254/32', 'fd00:ec2::254/128',  # AWS, GCP, Azure metadata (named for the record)
    '100.100.100.200/32',                     # Alibaba Cloud metadata
)
# Not denied by default (mail servers on a company network are real), but
# what a multi-tenant deployment usually adds to denied_networks.
PRIVATE_NETWORKS = ('10.0.0.0/8', '172.16.0.0/12', '192.168.0.0/16', '100.64.0.0/10', 'fc00::/7')

# OpenSSL's verdicts when the first bytes back are not a TLS record: the
# port speaks something in clear text (a mail greeting, an SSH banner, HTTP).
_NOT_TLS_REASONS = {'WRONG_VERSION_NUMBER', 'UNKNOWN_PROTOCOL', 'PACKET_LENGTH_TOO_LONG', 'HTTP_REQUEST',
                    'HTTPS_PROXY_REQUEST', 'RECORD_LAYER_FAILURE'}
_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
# The TLS probe after a greeting that never came: a TLS server answers a
# ClientHello at once, so this need not be the session's whole timeout.
PROBE_TIMEOUT = 5.0


def _networks(entries, setting: str) -> tuple:
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry))
        except ValueError as exc:   # '10.0.0.1/8' has host bits set: say so rather than widen it silently
            raise ValueError(f'{setting}: {entry!r} is not a network in CIDR form ({exc})') from None
    return tuple(networks)


@dataclasses.dataclass(frozen=True, init=False)
class Policy:
    """Which destination addresses outbound connections may use; see the module docstring."""

    allowed: tuple
    denied: tuple

    def __init__(self, allowed_networks=(), denied_networks=()):
        object.__setattr__(self, 'allowed', _networks(allowed_networks, 'allowed_networks'))
        object.__setattr__(self, 'denied', _networks(denied_networks, 'denied_networks'))

    def allows(self, address) -> bool:
        """Whether a connection to this IP address (str or ipaddress object) is allowed."""
        ip = ipaddress.ip_address(address.split('%', 1)[0] if isinstance(address, str) else address)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.denied):
            return False
        if any(ip in network for network in self.allowed):
            return True
        return not any(ip in network for network in _DEFAULT_DENIED)


_DEFAULT_DENIED = _networks(DEFAULT_DENIED, 'DEFAULT_DENIED')


def connect(host: str, port: int, timeout, policy: Policy | None = None,
            source_address=None) -> socket.socket:
    """A TCP connection to host:port at an address the policy allows (None: any), checked after resolving.

    Raises the MailError of its failure (host_not_found, destination_not_allowed,
    refused, timed_out, unreachable). `timeout` is per address tried, as in
    socket.create_connection; socket.getdefaulttimeout() when it is the stdlib's default marker.
    """
    where = f'{host}:{port}'
    try:
        addresses = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:   # UnicodeError: a name IDNA cannot encode
        raise connection_failure('host_not_found', where) from exc
    failure = None
    for family, kind, protocol, _, sockaddr in permitted(addresses, policy, where):
        sock = socket.socket(family, kind, protocol)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)   # exactly the address checked above: no second lookup
            return sock
        except OSError as exc:   # the next address may answer; the last failure is reported
            sock.close()
            failure = exc
    raise classify(failure, where) from failure


def permitted(addresses: list, policy: Policy | None, where: str) -> list:
    """The getaddrinfo() entries whose address the policy allows (all when None); destination_not_allowed if none."""
    if policy is None:
        return addresses
    addresses = [address for address in addresses if policy.allows(address[4][0])]
    if not addresses:
        raise connection_failure('destination_not_allowed', where)
    return addresses


class Route:
    """The policy for one session's connection, and the address it reached (for a TLS probe after a failure)."""

    def __init__(self, policy: Policy | None):
        self.policy = policy
        self.peer: tuple | None = None   # (family, sockaddr) once connected

    def connect(self, host: str, port: int, timeout, source_address=None) -> socket.socket:
        sock = connect(host, port, timeout, self.policy, source_address)
        self.peer = (sock.family, sock.getpeername())
        return sock


def classify(exc: BaseException, where: str, *, starttls: bool = False, probe: tuple | None = None,
             timeout: float = PROBE_TIMEOUT) -> MailError:
    """The MailError for an exception raised while connecting to, greeting or starting TLS with `where`.

    `probe`: the (family, sockaddr) of a clear-text connection that timed out
    waiting for the greeting. A server that stays silent there but answers a
    TLS handshake expects TLS from the first byte: plain_on_tls_port, not a
    timeout worth retrying.
    """
    if isinstance(exc, MailError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):   # before SSLError, which it subclasses
        return connection_failure('certificate_untrusted', where, exc.verify_message)
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):   # hung up mid-handshake: may be load
        return connection_failure('connection_lost', where)
    if isinstance(exc, ssl.SSLError):
        # After STARTTLS was accepted, clear text back is a broken server, not a wrong port.
        wrong_port = not starttls and exc.reason in _NOT_TLS_REASONS
        return connection_failure('tls_on_plain_port' if wrong_port else 'tls_failed', where)
    if isinstance(exc, TimeoutError):
        if probe is not None and speaks_tls(probe, min(timeout, PROBE_TIMEOUT)):
            return connection_failure('plain_on_tls_port', where)
        return connection_failure('timed_out', where)
    if isinstance(exc, ConnectionRefusedError):
        return connection_failure('refused', where)
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE:
        return connection_failure('unreachable', where)
    return connection_failure('connection_lost', where)


def speaks_tls(peer: tuple, timeout: float) -> bool:
    """Whether the server at peer (family, sockaddr) answers a TLS ClientHello with a TLS handshake."""
    family, sockaddr = peer
    # Verifies nothing: it only asks whether TLS answers, sends no data and hangs up.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            with context.wrap_socket(sock):
                return True
    except ssl.SSLError as exc:   # before OSError: an alert is TLS refusing us, which is TLS all the same
        return 'ALERT' in (exc.reason or '')
    except OSError:   # silent, closed or refused: not a TLS server
        return False
