"""First hour: a newcomer's run of the README, from a fresh clone to a delivered send.

Clones this repository into a temporary directory (beside a `shared` link to
../shared, as the checkout sits), links the existing .venv into it so that
package installs are not part of the figure, starts a private Dovecot and SMTP
server with one mailbox holding two messages (one with an attachment), then
starts `./run.sh` in the clone and runs the README's "First hour" sh blocks,
in order, in bash -e, with the mailbox variables pointing at those servers.
Prints the seconds from `./run.sh` start to the send's delivery on the SMTP
server (the spool file's time), against the 60 s target.

    ./run.sh bench first_hour
"""
import email.message
import email.policy
import imaplib
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import services  # noqa: E402

TARGET = 60.0
USER, PASSWORD = 'newcomer', 'first-hour-pw'


def walkthrough(readme):
    """The ```sh blocks of the README's First hour section, in order (as tests/test_readme.py reads them)."""
    section = readme.split('\n## First hour\n', 1)[1].split('\n## ', 1)[0]
    return re.findall(r'^```sh\n(.*?)^```$', section, re.M | re.S)


def mail(subject, body, attachment=None):
    message = email.message.EmailMessage(policy=email.policy.SMTP)
    message['From'], message['To'], message['Subject'] = 'Carol <carol@example.org>', f'{USER}@example.com', subject
    message.set_content(body)
    if attachment:
        message.add_attachment(attachment, maintype='application', subtype='pdf', filename='invoice.pdf')
    return message.as_bytes()


def fill_mailbox(dovecot):
    dovecot.add_user(USER, PASSWORD)
    with imaplib.IMAP4(services.HOST, dovecot.imap_port) as conn:
        conn.login(USER, PASSWORD)
        for raw in (mail('Welcome to the team', 'Glad to have you.'),
                    mail('Invoice 2024-117', 'The invoice is attached.', b'%PDF-1.4\n')):
            conn.append('INBOX', None, None, raw)


def answers(port):
    try:
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def main():
    work = pathlib.Path(tempfile.mkdtemp(prefix='emailsvc-first-hour-'))
    clone = work / 'main'
    service = None
    running = []
    try:
        subprocess.run(['git', 'clone', '-q', str(ROOT), str(clone)], check=True)
        (work / 'shared').symlink_to(ROOT.parent / 'shared')
        (clone / '.venv').symlink_to(ROOT / '.venv')   # installs excluded from the figure
        dovecot = services.start_dovecot(work / 'dovecot')
        running.append(dovecot)
        smtp = services.start_smtp(work / 'smtp')
        running.append(smtp)
        fill_mailbox(dovecot)
        smtp.add_user(USER, PASSWORD)

        port = services.free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith('EMAILSVC_')}
        # The README's note for a mail server on this machine with its own certificate.
        env.update(EMAILSVC_SERVER_PORT=str(port), EMAILSVC_MAIL_CA_FILES=f'{dovecot.cert_path},{smtp.cert_path}',
                   EMAILSVC_SECURITY_ALLOWED_NETWORKS='127.0.0.0/8')
        started_wall, started = time.time(), time.monotonic()
        with open(work / 'run.log', 'wb') as log:
            service = subprocess.Popen(['./run.sh'], cwd=clone, env=env, stdout=log, stderr=log,
                                       start_new_session=True)
        while not answers(port):
            if service.poll() is not None or time.monotonic() - started > TARGET:
                sys.exit(f'first_hour: ./run.sh did not answer; see {work / "run.log"}')
            time.sleep(0.05)
        up = time.monotonic() - started

        (work / 'files').mkdir()
        env.update(API=f'http://127.0.0.1:{port}/api/v1', EMAIL=f'{USER}@example.com',
                   IMAP_HOST=services.HOST, IMAP_PORT=str(dovecot.imaps_port),
                   SMTP_HOST=services.HOST, SMTP_PORT=str(smtp.port),
                   MAIL_USER=USER, MAIL_PASSWORD=PASSWORD, FILES=str(work / 'files'))
        script = 'set -e\n' + '\n'.join(walkthrough((clone / 'README.md').read_text()))
        done = subprocess.run(['bash', '-c', script], cwd=clone, env=env, capture_output=True, text=True,
                              timeout=300)
        total = time.monotonic() - started
        if done.returncode != 0:
            print(done.stdout[-4000:], done.stderr[-2000:], sep='\n--- stderr\n')
            print(f'first_hour: a README command failed (exit {done.returncode})\nfirst hour under 60 s NOT MET')
            sys.exit(1)
        spooled = sorted(services.smtp_server.message_files(smtp.spool))
        if not spooled:
            print('first_hour: the walkthrough ended but nothing was delivered\nfirst hour under 60 s NOT MET')
            sys.exit(1)
        delivered = spooled[0].stat().st_mtime - started_wall
        print(f'first hour: ./run.sh start to a delivered send  {delivered:.1f} s  '
              f'({delivered / TARGET:.2f}x the {TARGET:.0f} s target; service answering after {up:.1f} s, '
              f'whole walkthrough {total:.1f} s)')
        print(f'first hour under {TARGET:.0f} s ' + ('met' if delivered < TARGET else 'NOT MET'))
    finally:
        if service is not None and service.poll() is None:
            os.killpg(service.pid, signal.SIGINT)   # Ctrl-C, as a reader stops it
            try:
                service.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(service.pid, signal.SIGKILL)
                service.wait()
        services.stop_all(running)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
