"""waitress as the API serves it: its own refusals in the API's JSON error shape.

waitress answers some requests before any WSGI app sees them: a malformed
request line, header or chunk (400), headers over max_request_header_size
(431), a body over max_request_body_size (413: judged from Content-Length
before a byte of the body is read, or as a chunked body passes the limit), a
transfer coding it does not know (501), and an exception that escaped the app
before it started its answer (500). It writes those as text/plain from
waitress.task.ErrorTask, so a client that relies on `{"error", "message"}`
(DESIGN.md section 5) would get a page it cannot parse.

The hook, pinned to waitress 3.0.2 (requirements.txt); tests/test_waitress.py
fails if any of it changes:
- HTTPChannel.service() serves a request whose parser set `request.error` (a
  waitress.utilities.Error: `code`, `reason`, `body`) with the channel's
  `error_task_class` instead of the WSGI task;
- ErrorTask.execute() takes status, headers and body from
  `request.error.to_response(ident)` and closes the connection after them;
- a listening server makes each connection's channel from its
  `channel_class` attribute (BaseWSGIServer.handle_accept), and
  create_server() returns that server, or a MultiSocketServer whose `map`
  holds one per listening address.
"""
import json
import socket
import time

import waitress
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer
from waitress.task import ErrorTask


class JsonError:
    """A waitress error that renders itself as the API's JSON error."""

    def __init__(self, error):
        self.error = error

    def to_response(self, ident=None):
        error = self.error
        # 413 says what the API's own size checks say, so a client needs one code for a body too large.
        code = {500: 'internal', 413: 'too_large'}.get(error.code, f'http_{error.code}')
        # The body of a 500 is waitress's fixed sentence (tracebacks are exposed only
        # with expose_tracebacks, which we never set); the others say what was wrong.
        body = json.dumps({'error': code, 'message': f'{error.reason}: {str(error.body).rstrip(".")}.'}).encode()
        return f'{error.code} {error.reason}', [('Content-Type', 'application/json')], body


# After an error answer, how long a connection may go on sending what it had
# started (the rest of a body too large) while we discard it. Seconds.
LINGER_SECONDS = 10


class JsonErrorTask(ErrorTask):
    def execute(self):
        self.request.error = JsonError(self.request.error)
        super().execute()
        self.channel.linger_after_answer = True


class JsonErrorChannel(HTTPChannel):
    """A channel that answers waitress's errors as JSON, then closes gently.

    waitress closes right after an error answer. If the client is still
    sending (a body refused by its Content-Length), the unread bytes make the
    kernel answer with RST, and a client that writes its whole body before
    reading (urllib, requests) gets "connection reset" instead of the 413.
    So, as nginx's lingering close does, we send FIN after the answer and
    read and discard what still comes, until the client closes, for at most
    LINGER_SECONDS (or server.channel_timeout of silence). Nothing is stored.
    (Relies on waitress 3.0.2 closing through handle_close() and reading
    through received(); wasyncore's recv() calls handle_close() at EOF.)
    """
    error_task_class = JsonErrorTask
    linger_after_answer = False
    draining_until = None

    def handle_close(self):
        if self.linger_after_answer and self.draining_until is None and self.connected:
            try:
                self.socket.shutdown(socket.SHUT_WR)   # the answer, then FIN
            except OSError:
                return super().handle_close()
            self.draining_until = time.monotonic() + LINGER_SECONDS
            self.will_close = False
            return None
        return super().handle_close()

    def received(self, data):
        if self.draining_until is None:
            return super().received(data)
        if time.monotonic() > self.draining_until:
            self.will_close = True   # handle_write closes it for good
        return True


def create_server(app, **adjustments):
    """waitress.create_server(app, **adjustments), answering its own errors as JSON."""
    server = waitress.create_server(app, **adjustments)
    listeners = [server] if isinstance(server, BaseWSGIServer) else \
        [d for d in server.map.values() if isinstance(d, BaseWSGIServer)]
    for listener in listeners:
        listener.channel_class = JsonErrorChannel
    return server
