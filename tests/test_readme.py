"""The README's "First hour" walkthrough, run as written, so the README cannot drift from the code.

Every ```sh block of the section runs, in order, in one `bash -e`, against a
live `./run.sh` (its own var/ and port) and the session's real Dovecot and
SMTP server. The README takes its mailbox from shell variables with
example.com defaults (`${IMAP_HOST:-imap.example.com}`); the test sets them to
the private servers, and changes nothing else. Embedded mode runs the service
on SQLite; scale-out mode on a fresh PostgreSQL database and the session's
Redis under a queue name of its own.
"""
import email.message
import email.policy
import os
import re
import subprocess

from cryptography.fernet import Fernet

from tests.conftest import MODE, ROOT, STATE
from tests.test_stop import Service
from tests.test_sync import PASSWORD, Mailbox

README = ROOT / 'README.md'
SECTION = 'First hour'
ATTACHMENT = b'%PDF-1.4\n% a small invoice\n'


def walkthrough(text=None):
    """The ```sh blocks of the README's First hour section, in order."""
    text = text or README.read_text()
    section = text.split(f'\n## {SECTION}\n', 1)[1].split('\n## ', 1)[0]
    return re.findall(r'^```sh\n(.*?)^```$', section, re.M | re.S)


def mail(subject, body, attachment=None):
    message = email.message.EmailMessage(policy=email.policy.SMTP)
    message['From'] = 'Carol <carol@example.org>'
    message['To'] = 'alice@example.com'
    message['Subject'] = subject
    message.set_content(body)
    if attachment:
        message.add_attachment(attachment, maintype='application', subtype='pdf', filename='invoice.pdf')
    return message.as_bytes()


def mailbox_with_mail(user):
    """A Dovecot user with two messages, the newer with an attachment, and the same login on the SMTP server."""
    mailbox = Mailbox(STATE['dovecot'], user)
    mailbox.append(mail('Welcome to the team', 'Glad to have you, Alice.'),
                   mail('Invoice 2024-117', 'The invoice is attached.', ATTACHMENT))
    STATE['smtp'].add_user(user, PASSWORD)
    return mailbox


def readme_service(tmp_path, name):
    service = Service(tmp_path, name, f'{STATE["dovecot"].cert_path},{STATE["smtp"].cert_path}')
    if MODE == 'scaleout':
        service.env.update(EMAILSVC_DATABASE_URL=STATE['postgres'].create_database(name),
                           EMAILSVC_QUEUE_URL=STATE['redis'].url, EMAILSVC_QUEUE_NAME=name,
                           EMAILSVC_SERVER_SECRET=os.urandom(32).hex(),
                           EMAILSVC_SECURITY_CREDENTIAL_KEYS=Fernet.generate_key().decode())
    return service


def mailbox_variables(service, user, files):
    """What a reader types in for "your mailbox": here the session's private servers."""
    return {'API': f'http://127.0.0.1:{service.port}/api/v1', 'EMAIL': f'{user}@example.com',
            'IMAP_HOST': '127.0.0.1', 'IMAP_PORT': str(STATE['dovecot'].imaps_port),
            'SMTP_HOST': '127.0.0.1', 'SMTP_PORT': str(STATE['smtp'].port),
            'MAIL_USER': user, 'MAIL_PASSWORD': PASSWORD, 'FILES': str(files)}


SHOWN = ('KEY', 'ACCOUNT', 'SYNC', 'MESSAGE', 'OTHER', 'ATTACHMENT', 'UPLOAD', 'SEND', 'DELETE', 'CHECK', 'REPORT')


def run_walkthrough(env, timeout=120):
    """Run the blocks in one bash; returns (the variables they set, the whole output)."""
    script = 'set -e\n' + '\n'.join(walkthrough()) + ''.join(
        f'\necho "=={name}=${name}"' for name in SHOWN)
    proc = subprocess.run(['bash', '-c', script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f'a README command failed (exit {proc.returncode}):\n' \
                                 f'{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}'
    found = dict(re.findall(r'^==(\w+)=(.*)$', proc.stdout, re.M))
    return found, proc.stdout


def test_walkthrough_is_found():
    blocks = walkthrough()
    assert len(blocks) >= 8
    assert 'KEY=$(./run.sh admin create-key' in blocks[0]
    assert any('"protocol": "imap"' in block for block in blocks)


def test_first_hour_walkthrough_syncs_reads_and_sends(tmp_path):
    user = f'fh{os.urandom(3).hex()}'
    mailbox_with_mail(user)
    service = readme_service(tmp_path, f'readme{user}')
    files = tmp_path / 'files'
    files.mkdir()
    try:
        service.start()   # the README's "./run.sh" in the first terminal
        found, output = run_walkthrough(dict(service.env, **mailbox_variables(service, user, files)))
        api = service.api.as_key(found['KEY'])

        assert api.get(f'/api/v1/tasks/{found["SYNC"]}').json['state'] == 'succeeded'
        read = api.get(f'/api/v1/messages/{found["OTHER"]}').json
        assert read['subject'] == 'Welcome to the team' and 'Glad to have you' in read['text']
        assert '"subject": "Invoice 2024-117"' in output           # the message the README read
        assert (files / 'invoice.pdf').read_bytes() == ATTACHMENT   # its attachment, by its own name
        assert b'Subject: Invoice 2024-117' in (files / 'message.eml').read_bytes()

        send = api.get(f'/api/v1/tasks/{found["SEND"]}').json
        assert send['state'] == 'succeeded' and send['attempts'] == 1, send
        delivered = [m for m in STATE['smtp'].received() if m['login'] == user]
        assert len(delivered) == 1, 'the repeated send with the same Idempotency-Key sent again'
        assert b'Subject: Agenda for Monday' in delivered[0]['data'] and b'agenda.txt' in delivered[0]['data']
        assert delivered[0]['rcpt_tos'] == ['bob@example.net']
        for name in ('DELETE', 'CHECK', 'REPORT'):
            assert api.get(f'/api/v1/tasks/{found[name]}').json['state'] == 'succeeded', name
    finally:
        service.kill()
