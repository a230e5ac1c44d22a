"""A real HTTP receiver of webhooks on loopback, verifying each delivery with the independent
`standardwebhooks` package; it can be stopped and started again on the same port."""
import http.server
import threading

import standardwebhooks


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass   # a client hanging up mid-request (the stop() below, a SIGKILLed sender) is expected here


class Receiver:
    """Records every POST: (path, webhook-id, signature valid); answers `status` (200 by default)."""

    def __init__(self, port, secrets=None):
        self.port, self.secrets = port, dict(secrets or {})   # path -> whsec_ secret(s) to verify with
        self.received = []   # (path, webhook-id, valid, body, headers)
        self.lock = threading.Lock()
        self.status = 200
        self.server = None

    @property
    def url(self):
        return f'http://127.0.0.1:{self.port}'

    def start(self):
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'   # keep-alive, as real receivers do

            def do_POST(self):
                length = int(self.headers.get('Content-Length', 0))
                body = self.rfile.read(length)
                if len(body) < length:   # the sender died mid-request: it never got an answer, nothing arrived
                    self.close_connection = True
                    return
                receiver.record(self.path, dict(self.headers), body)
                self.send_response(receiver.status)
                self.send_header('Content-Length', '0')
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = QuietServer(('127.0.0.1', self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True).start()
        return self

    def stop(self):
        """Stop listening and drop open connections: the service sees refused connections until start()."""
        self.server.shutdown()
        self.server.server_close()
        self.server = None

    def record(self, path, headers, body):
        valid = all(self.verifies(secret, headers, body) for secret in self.secrets.get(path, ()))
        with self.lock:
            self.received.append((path, headers.get('webhook-id'), valid, body, headers))

    @staticmethod
    def verifies(secret, headers, body):
        try:
            standardwebhooks.Webhook(secret).verify(body, headers)
            return True
        except standardwebhooks.WebhookVerificationError:
            return False

    def ids(self, path):
        with self.lock:
            return [msg_id for p, msg_id, *_ in self.received if p == path]

    def all_valid(self, path):
        with self.lock:
            return all(valid for p, _, valid, *_ in self.received if p == path)
