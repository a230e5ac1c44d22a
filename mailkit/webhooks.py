"""Standard Webhooks (https://www.standardwebhooks.com/): secrets, signatures, and the one way we POST.

The protocol
------------
A delivery is an HTTP POST of a JSON body with three headers:

    webhook-id         the event's id: the same on every attempt, so a receiver drops repeats by it
    webhook-timestamp  seconds since the epoch when this attempt was signed (receivers refuse
                       ones more than about 5 minutes off, so a retry is signed afresh)
    webhook-signature  "v1,<base64 HMAC-SHA256(key, f'{id}.{timestamp}.{body}')>", several
                       space-separated when more than one secret is valid (during a rotation)

The secret is "whsec_" + base64 of random bytes; the HMAC key is those bytes.
It is shown to its owner once, when made; at rest it is Fernet-encrypted like
a mail password (mailkit.credentials).

Why http.client over an egress connection
-----------------------------------------
Tenants choose webhook URLs, so a target is a destination like a mail server:
the connection goes through egress.connect, which resolves the name once and
refuses loopback, link-local and metadata addresses (unless allowed) on the
address it actually connects to. Redirects are never followed: a 3xx is a
failed attempt, so a target cannot bounce us to an address the policy would
have refused. A connection is kept open between the deliveries of one batch.
"""
import base64
import hashlib
import hmac
import http.client
import secrets
import socket
import ssl
import time
import urllib.parse

from mailkit import egress
from mailkit.errors import MailError

SECRET_PREFIX = 'whsec_'
SECRET_BYTES = 32
RESPONSE_READ_LIMIT = 64 * 1024   # what we read of an answer before dropping the connection
USER_AGENT = 'emailsvc-webhooks/1'


def new_secret():
    """A fresh signing secret, whsec_<base64 of 32 random bytes>."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def signature(secret, msg_id, timestamp, body):
    """The "v1,<base64>" signature of one attempt under one whsec_ secret."""
    key = base64.b64decode(secret[len(SECRET_PREFIX):] if secret.startswith(SECRET_PREFIX) else secret)
    digest = hmac.new(key, f'{msg_id}.{int(timestamp)}.'.encode() + body, hashlib.sha256).digest()
    return 'v1,' + base64.b64encode(digest).decode()


def headers(secrets_, msg_id, body, timestamp=None):
    """The Standard Webhooks headers of one attempt, signed by every secret given (newest first)."""
    timestamp = int(time.time() if timestamp is None else timestamp)
    return {'webhook-id': msg_id, 'webhook-timestamp': str(timestamp),
            'webhook-signature': ' '.join(signature(s, msg_id, timestamp, body) for s in secrets_),
            'content-type': 'application/json', 'user-agent': USER_AGENT}


def check_url(url):
    """None if `url` can be a webhook target (http or https, a host, no user:password@), else why not."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f'is not a URL ({exc})'
    if parts.scheme not in ('http', 'https'):
        return 'must start with http:// or https://'
    if not parts.hostname:
        return 'has no host'
    if parts.username is not None or parts.password is not None:
        return 'must not hold a user name or password (they would be shown in every listing)'
    if parts.fragment:
        return 'must not have a #fragment'
    if port == 0:
        return 'has port 0'
    return None


# A kept-alive connection the far end has closed: worth one retry on a fresh one.
STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class DeliveryFailed(Exception):
    """An attempt that did not reach a 2xx: `status` is the HTTP code, or None when none came back."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class Poster:
    """POSTs to one target URL, keeping its connection between posts; close() when done."""

    def __init__(self, url, timeout, policy, ssl_context=None):
        parts = urllib.parse.urlsplit(url)
        self.host, self.tls = parts.hostname, parts.scheme == 'https'
        self.port = parts.port or (443 if self.tls else 80)
        self.path = (parts.path or '/') + (f'?{parts.query}' if parts.query else '')
        self.host_header = parts.netloc
        self.timeout, self.policy = timeout, policy
        self.ssl_context = ssl_context or (ssl.create_default_context() if self.tls else None)
        self.conn = None

    def post(self, body, header_map):
        """POST once; returns the HTTP status (2xx), raises DeliveryFailed otherwise."""
        reused = self.conn is not None
        try:
            return self._post(body, header_map)
        except STALE:
            self.close()
            if not reused:
                raise DeliveryFailed(f'connection to {self.host}:{self.port} closed before an answer') from None
        # A kept connection the far end closed while idle: one fresh try, as browsers do.
        try:
            return self._post(body, header_map)
        except STALE:
            self.close()
            raise DeliveryFailed(f'connection to {self.host}:{self.port} closed before an answer') from None

    def _post(self, body, header_map):
        conn = self._connection()
        try:
            conn.request('POST', self.path, body=body, headers=dict(header_map, host=self.host_header))
            response = conn.getresponse()
            response.read(RESPONSE_READ_LIMIT)
        except STALE:
            raise
        except MailError as exc:     # egress: refused destination, no such host, refused, timed out
            self.close()
            raise DeliveryFailed(f'{exc.code}: {self.host}:{self.port}') from None
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise DeliveryFailed(f'{type(exc).__name__} talking to {self.host}:{self.port}') from None
        if response.will_close or not response.isclosed():   # the far end hangs up, or a body left unread
            self.close()
        if not 200 <= response.status < 300:
            raise DeliveryFailed(f'answered HTTP {response.status}', response.status)
        return response.status

    def _connection(self):
        if self.conn is None:
            self.conn = _EgressConnection(self.host, self.port, self.timeout, self.policy,
                                          self.ssl_context if self.tls else None)
        return self.conn

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class _EgressConnection(http.client.HTTPConnection):
    """http.client's connection, connected by egress.connect (policy on the resolved address), TLS optional."""

    def __init__(self, host, port, timeout, policy, ssl_context):
        super().__init__(host, port, timeout=timeout)
        self.policy, self.ssl_context = policy, ssl_context

    def connect(self):
        sock = egress.connect(self.host, self.port, self.timeout, self.policy)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # no 40 ms delayed-ACK stall per post
        if self.ssl_context is None:
            self.sock = sock
            return
        try:   # the certificate is checked against the host name the tenant gave, never the address (RFC 6125)
            self.sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
        except OSError as exc:   # certificate_untrusted, tls_on_plain_port, ...: a fixed code, as for mail servers
            sock.close()
            raise egress.classify(exc, f'{self.host}:{self.port}') from None
