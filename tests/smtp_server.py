"""An SMTP submission server for the tests, run by services.start_smtp as
`python -m tests.smtp_server ...` so that it has a PID of its own.

Two listeners share one handler: --port speaks plain SMTP with STARTTLS
(RFC 3207), --tls-port implicit TLS (RFC 8314). AUTH PLAIN and LOGIN check the
users in --users, a JSON object {username: password} reread on every AUTH.

Everything the test process needs goes through the spool directory, so it
survives a restart of this server:

- msg-NNNNNNNN.json: one accepted message each, written under a temporary
  name and renamed, so a reader never sees half a message. It is written
  before the 250 reply to DATA goes out; a message that got an error reply
  is never written.
- control.json: a list of scripts, one per coming transaction, taken at MAIL
  FROM: {"data": "451 ...", "rcpt": {"bad@x.org": "550 ..."}, "drop": true,
  "cut": "at_data" | "in_message"}.
  Both processes change it under an flock on control.lock.
"""

import argparse
import asyncio
import base64
import contextlib
import fcntl
import json
import logging
import os
import signal
import pathlib
import ssl
import warnings

# aiosmtpd is imported where it is used: services.py imports this module for the
# spool functions and must not fail for want of it (start_smtp says what to install).

CONTROL = 'control.json'


# ---------------------------------------------------------------- spool files (used by both processes)

def write_atomically(path: pathlib.Path, content: bytes) -> None:
    """Replace path with content so that readers see the old or the new file, never a mix."""
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    tmp.write_bytes(content)
    os.replace(tmp, path)


@contextlib.contextmanager
def control_lock(spool: pathlib.Path):
    """Serialise read-modify-write of control.json between the test process and the server."""
    with open(spool / 'control.lock', 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_scripts(spool: pathlib.Path) -> list[dict]:
    path = spool / CONTROL
    return json.loads(path.read_bytes()) if path.exists() else []


def add_scripts(spool: pathlib.Path, scripts: list[dict]) -> None:
    """Queue one script per coming transaction, after those already queued."""
    with control_lock(spool):
        write_atomically(spool / CONTROL, json.dumps(read_scripts(spool) + scripts).encode())


def take_script(spool: pathlib.Path) -> dict:
    """The script for the transaction that starts now; {} means behave normally."""
    with control_lock(spool):
        scripts = read_scripts(spool)
        if scripts:
            write_atomically(spool / CONTROL, json.dumps(scripts[1:]).encode())
        return scripts[0] if scripts else {}


def message_files(spool: pathlib.Path) -> list[pathlib.Path]:
    return sorted(spool.glob('msg-*.json'))   # zero-padded sequence numbers sort in arrival order


def read_messages(spool: pathlib.Path) -> list[dict]:
    messages = [json.loads(path.read_bytes()) for path in message_files(spool)]
    for message in messages:
        message['data'] = base64.b64decode(message['data'])
    return messages


def clear(spool: pathlib.Path) -> None:
    """Forget accepted messages and scripts nobody used yet."""
    with control_lock(spool):
        write_atomically(spool / CONTROL, b'[]')
        for path in message_files(spool):
            path.unlink()


# ---------------------------------------------------------------- the server

class Handler:
    """aiosmtpd hooks: apply the transaction's script, spool what gets a 250."""

    def __init__(self, spool: pathlib.Path, users: pathlib.Path):
        self.spool, self.users = spool, users
        files = message_files(spool)
        self.sequence = int(files[-1].stem.split('-')[1]) if files else 0   # continue after a restart

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import AuthResult, LoginPassword
        users = json.loads(self.users.read_bytes()) if self.users.exists() else {}
        ok = (isinstance(auth_data, LoginPassword)
              and users.get(auth_data.login.decode(errors='replace')) == auth_data.password.decode(errors='replace'))
        # handled=False: aiosmtpd then sends 535 itself; its default (True) sends no reply at all.
        # auth_data becomes session.login_data, which we record.
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.script = take_script(self.spool)
        return '250 OK'

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        refusal = getattr(envelope, 'script', {}).get('rcpt', {}).get(address.lower())
        if refusal:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return '250 OK'

    async def handle_DATA(self, server, session, envelope):
        script = getattr(envelope, 'script', {})
        if script.get('drop'):
            # The client has sent the whole message and waits for the reply that
            # tells it whether the message was delivered; it never comes.
            server.transport.abort()
            await asyncio.Event().wait()   # connection_lost cancels this coroutine
        reply = script.get('data') or '250 OK'
        if reply.startswith('2'):
            self.spool_message(server, session, envelope)
        if script.get('delay'):
            await asyncio.sleep(script['delay'])   # delivered, and the client still waits for the reply
        for pid in script.get('freeze', ()):
            # Stop the client before it can read our 250: from here on the
            # message is delivered, and the client cannot have recorded it.
            os.kill(pid, signal.SIGSTOP)
        return reply

    def spool_message(self, server, session, envelope) -> None:
        self.sequence += 1
        host, port = session.peer[:2]
        message = {
            'mail_from': envelope.mail_from,
            'rcpt_tos': list(envelope.rcpt_tos),
            'data': base64.b64encode(envelope.original_content).decode(),
            'peer': f'{host}:{port}',
            'tls': server.transport.get_extra_info('ssl_object') is not None,
            'login': session.login_data.decode(errors='replace') if session.login_data else None,
        }
        write_atomically(self.spool / f'msg-{self.sequence:08d}.json', json.dumps(message).encode())


def scripted_smtp():
    """aiosmtpd's SMTP with the "cut" scripts, which act before the whole message is in."""
    from aiosmtpd.smtp import SMTP

    class ScriptedSMTP(SMTP):
        async def smtp_DATA(self, arg: str) -> None:
            cut = getattr(self.envelope, 'script', {}).get('cut') if self.envelope else None
            if cut is None or not self.envelope.rcpt_tos:
                return await super().smtp_DATA(arg)
            if cut == 'in_message':
                await self.push('354 End data with <CR><LF>.<CR><LF>')
                await self._reader.readuntil(b'\r\n')   # the first line of the message, then the wire is cut
            # 'at_data': the client waits for 354 and gets a reset instead
            self.transport.abort()

    return ScriptedSMTP


async def serve(args) -> None:
    SMTP = scripted_smtp()
    handler = Handler(pathlib.Path(args.spool), pathlib.Path(args.users))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(args.cert, args.key)
    loop = asyncio.get_running_loop()

    def session(implicit_tls: bool) -> SMTP:
        return SMTP(handler, hostname='localhost', enable_SMTPUTF8=True, loop=loop,
                    authenticator=handler.authenticate, auth_required=args.auth_required,
                    tls_context=None if implicit_tls else tls,
                    # aiosmtpd only counts STARTTLS as encryption; on the implicit-TLS
                    # port the whole connection already is.
                    auth_require_tls=args.auth_require_tls and not implicit_tls)

    await loop.create_server(lambda: session(False), '127.0.0.1', args.port)
    await loop.create_server(lambda: session(True), '127.0.0.1', args.tls_port, ssl=tls)
    await asyncio.Event().wait()   # serve until services.SmtpServer.stop() sends SIGTERM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--port', type=int, required=True)
    parser.add_argument('--tls-port', type=int, required=True)
    parser.add_argument('--spool', required=True)
    parser.add_argument('--users', required=True)
    parser.add_argument('--cert', required=True)
    parser.add_argument('--key', required=True)
    parser.add_argument('--auth-require-tls', type=int, default=1)
    parser.add_argument('--auth-required', type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
    # Said once per implicit-TLS connection, where TLS is there from the start (see serve).
    warnings.filterwarnings('ignore', 'Requiring AUTH while not requiring TLS')
    logging.getLogger('mail.log').addFilter(lambda record: 'auth_require_tls == False' not in record.getMessage())
    asyncio.run(serve(args))


if __name__ == '__main__':
    main()
