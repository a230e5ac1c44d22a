"""A real HTTP receiver of webhooks on loopback, verifying each delivery with the independent
`standardwebhooks` package; it can be stopped and started again on the same port."""
import http.server
import socket
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
        self.connections = set()   # the open ones, which stop() drops (a server's threads would keep serving them)

    @property
    def url(self):
        return f'http://127.0.0.1:{self.port}'

    def start(self):
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'   # keep-alive, as real receivers do

            def setup(self):
                super().setup()
                with receiver.lock:
                    receiver.connections.add(self.connection)

            def finish(self):
                with receiver.lock:
                    receiver.connections.discard(self.connection)
                super().finish()

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
        with self.lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass   # the sender hung up at the same moment: dropped either way
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


class StreamReceiver(Receiver):
    """The same receiver on asyncio streams (one thread, no per-request header objects): what a benchmark
    uses, so the figure is the sender's rather than http.server's. HTTP/1.1 with Content-Length bodies only."""

    def start(self):
        import asyncio
        self.loop = asyncio.new_event_loop()
        self.writers = set()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)
        return self

    def _run(self, ready):
        import asyncio
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, '127.0.0.1', self.port))
        ready.set()
        self.loop.run_forever()

    async def _serve(self, reader, writer):
        import asyncio
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b'\r\n\r\n')
                request_line, *lines = head.decode('latin-1').split('\r\n')
                headers = dict(line.split(': ', 1) for line in lines if ': ' in line)
                lowered = {k.lower(): v for k, v in headers.items()}
                body = await reader.readexactly(int(lowered.get('content-length', 0)))
                self.record(request_line.split(' ')[1], lowered, body)
                writer.write(f'HTTP/1.1 {self.status} OK\r\nContent-Length: 0\r\n\r\n'.encode())
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    def stop(self):
        """Stop listening and drop open connections."""
        def close():
            self.server.close()
            for writer in list(self.writers):
                writer.transport.abort()
        self.loop.call_soon_threadsafe(close)
        done = threading.Event()
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._closed(done)))
        done.wait(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.server = None

    async def _closed(self, done):
        await self.server.wait_closed()
        done.set()
