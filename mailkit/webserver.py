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
        code = 'internal' if error.code == 500 else f'http_{error.code}'
        # The body of a 500 is waitress's fixed sentence (tracebacks are exposed only
        # with expose_tracebacks, which we never set); the others say what was wrong.
        body = json.dumps({'error': code, 'message': f'{error.reason}: {str(error.body).rstrip(".")}.'}).encode()
        return f'{error.code} {error.reason}', [('Content-Type', 'application/json')], body


class JsonErrorTask(ErrorTask):
    def execute(self):
        self.request.error = JsonError(self.request.error)
        super().execute()


class JsonErrorChannel(HTTPChannel):
    error_task_class = JsonErrorTask


def create_server(app, **adjustments):
    """waitress.create_server(app, **adjustments), answering its own errors as JSON."""
    server = waitress.create_server(app, **adjustments)
    listeners = [server] if isinstance(server, BaseWSGIServer) else \
        [d for d in server.map.values() if isinstance(d, BaseWSGIServer)]
    for listener in listeners:
        listener.channel_class = JsonErrorChannel
    return server
