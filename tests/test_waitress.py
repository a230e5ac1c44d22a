"""waitress in front of the API: slow clients, oversized bodies and waitress's own refusals (issue 13).

Raw sockets against a real web process: these requests are ones an HTTP
client library would refuse to send, or would send whole before reading.
"""
import json
import math
import socket
import subprocess
import sys
import threading
import time

import pytest
import waitress.adjustments

from tests import services
from tests.conftest import ROOT, STATE, WebServer, python_env

BODY_LIMIT_MB = 2        # above the suite's mail.max_attachment_mb (1), as start-up requires
CHANNEL_TIMEOUT = 2


@pytest.fixture(scope='module')
def server():
    server = WebServer(STATE['workdir'], name='web-waitress', EMAILSVC_SERVER_MAX_REQUEST_BODY_MB=str(BODY_LIMIT_MB),
                       EMAILSVC_SERVER_CHANNEL_TIMEOUT=str(CHANNEL_TIMEOUT))
    yield server
    server.stop()


def connect(server, timeout=5):
    return socket.create_connection(('127.0.0.1', server.port), timeout=timeout)


def read_answer(sock):
    """(status, headers with lower-case names, body) of the one answer before the server closes."""
    data = b''
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b'\r\n\r\n')
    status_line, *lines = head.decode('latin-1').split('\r\n')
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(':') for line in lines)}
    return int(status_line.split()[1]), headers, body


def exchange(server, data):
    with connect(server) as sock:
        sock.sendall(data)
        return read_answer(sock)


def assert_json_error(answer, status, code):
    got_status, headers, body = answer
    assert got_status == status, body
    assert headers['content-type'].startswith('application/json'), headers
    assert json.loads(body)['error'] == code and json.loads(body)['message'], body


# waitress closes the connection after its error answer; data it has not read by
# then makes the kernel send RST, which can destroy the answer on the way. So
# each request below ends exactly where waitress stops reading.
MAX_HEADER = waitress.adjustments.Adjustments.max_request_header_size   # 262144 in waitress 3.0.2
START = b'GET /health HTTP/1.1\r\nHost: x\r\nX-Big: '


@pytest.mark.parametrize('request_bytes, status, code', [
    (b'GARBAGE\r\n\r\n', 400, 'http_400'),                                              # bad request line
    (b'GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n', 400, 'http_400'),     # bad header
    (b'POST /api/v1/attachments HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n', 400, 'http_400'),
    (b'POST /api/v1/attachments HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n', 501, 'http_501'),
    (START + b'a' * (MAX_HEADER - len(START)), 431, 'http_431'),                        # headers too large
    (b'POST /api/v1/attachments HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n' % (BODY_LIMIT_MB << 20),
     413, 'too_large'),                                                                  # body too large
    (b'GET /api/v1/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n', 404, 'http_404'),   # Bottle's own
    (b'DELETE /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n', 405, 'http_405'),
], ids=['request-line', 'header', 'chunk', 'coding', 'headers-431', 'body-413', 'bottle-404', 'bottle-405'])
def test_every_refusal_has_the_json_shape(server, request_bytes, status, code):
    assert_json_error(exchange(server, request_bytes), status, code)


def test_a_body_over_the_limit_is_refused_before_it_is_sent(server):
    size = 100 << 20
    with connect(server) as sock:
        sock.sendall(b'POST /api/v1/attachments?filename=big.bin HTTP/1.1\r\nHost: x\r\n'
                     b'Authorization: Bearer nokey\r\nContent-Type: application/octet-stream\r\n'
                     b'Content-Length: %d\r\n\r\n' % size)
        started = time.monotonic()
        answer = read_answer(sock)       # not one byte of the 100 MB sent
    assert time.monotonic() - started < 2
    assert_json_error(answer, 413, 'too_large')
    assert '/api/v1/attachments' not in server.log.read_text()   # the app (and its access log) never saw it


def test_a_client_that_sends_its_whole_body_first_still_reads_the_413(server):
    size = (BODY_LIMIT_MB + 3) << 20     # as urllib and requests do: the whole body, then read
    with connect(server) as sock:
        sock.sendall(b'POST /api/v1/attachments HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n' % size
                     + b'x' * size)
        sock.shutdown(socket.SHUT_WR)
        assert_json_error(read_answer(sock), 413, 'too_large')


def test_a_body_under_the_limit_reaches_the_app(server):
    size = (BODY_LIMIT_MB << 20) - 1000
    with connect(server) as sock:
        sock.sendall(b'POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\nConnection: close\r\n'
                     b'Content-Type: application/json\r\nContent-Length: %d\r\n\r\n' % size + b' ' * size)
        assert_json_error(read_answer(sock), 401, 'unauthorized')   # the app's answer: no key


def test_a_silent_connection_is_closed_after_the_channel_timeout(server):
    with connect(server, timeout=CHANNEL_TIMEOUT + 8) as sock:
        sock.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\n')   # and then nothing
        started = time.monotonic()
        assert sock.recv(100) == b''
    assert CHANNEL_TIMEOUT - 0.5 < time.monotonic() - started < CHANNEL_TIMEOUT + 4


def test_health_answers_quickly_while_200_slow_clients_trickle_their_requests(server):
    slow, stop, deadline = [], threading.Event(), time.monotonic() + 30
    for _ in range(200):
        sock = connect(server)
        sock.sendall(b'POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\nX-Slow: ')
        slow.append(sock)

    def trickle():   # a byte to every slow connection every 50 ms: each stays busy, none ever finishes
        while not stop.is_set() and time.monotonic() < deadline:
            for sock in slow:
                sock.send(b'a')
            stop.wait(0.05)
    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        stop.wait(0.3)   # a few rounds, so every slow connection has been accepted and is being fed
        latencies = []
        for _ in range(200):
            started = time.monotonic()
            with connect(server, timeout=2) as sock:
                sock.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
                status, _, _ = read_answer(sock)
            latencies.append(time.monotonic() - started)
            assert status == 200
        assert trickler.is_alive(), 'the slow clients stopped before the measurement ended'
    finally:
        stop.set()
        trickler.join(5)
        for sock in slow:
            sock.close()
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[math.ceil(0.99 * len(latencies)) - 1]
    print(f'/health with 200 slow connections open: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, '
          f'max {latencies[-1] * 1000:.1f} ms')
    assert p99 < 0.050, f'p99 {p99 * 1000:.1f} ms'


def test_a_body_limit_below_the_attachment_limit_stops_start_up():
    env = python_env(EMAILSVC_SERVER_MAX_REQUEST_BODY_MB='1', EMAILSVC_MAIL_MAX_ATTACHMENT_MB='1',
                     EMAILSVC_SERVER_PORT=str(services.free_port()))
    result = subprocess.run([sys.executable, 'emailsvc.py', 'web'], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode != 0
    assert 'server.max_request_body_mb' in result.stdout + result.stderr
