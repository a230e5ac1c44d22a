"""mailkit.imap against a real private Dovecot (tests/services.py), plus its pure functions.

Each test gets a fresh mail user, so folders and UIDs start empty. "Another
client" is a plain imaplib connection: what a phone or webmail would do to the
same mailbox while we sync.
"""

import datetime
import imaplib
import itertools
import socket
import ssl
import subprocess
import threading
import time

import pytest

from mailkit import imap
from mailkit.errors import AuthenticationFailed, InvalidSetting, PermanentMailError, TemporaryMailError
from tests import services

_user_numbers = itertools.count(1)


@pytest.fixture(scope='module')
def dovecot(tmp_path_factory):
    server = services.start_dovecot(tmp_path_factory.mktemp('imap'))
    yield server
    server.stop()


@pytest.fixture
def account(dovecot):
    """(username, password) of a new, empty mailbox."""
    username, password = f'imap{next(_user_numbers)}', 'secret-pw'
    dovecot.add_user(username, password)
    return username, password


def open_session(dovecot, account, security='none', **kwargs) -> imap.ImapSession:
    port = dovecot.imaps_port if security == 'tls' else dovecot.imap_port
    kwargs.setdefault('ssl_context', dovecot.ssl_context())
    return imap.ImapSession(dovecot.host, port, security, *account, timeout=5, **kwargs)


@pytest.fixture
def session(dovecot, account):
    with open_session(dovecot, account) as opened:
        yield opened


@pytest.fixture
def other(dovecot, account):
    """Another client on the same mailbox, with INBOX selected read-write."""
    conn = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=5)
    conn.login(*account)
    conn.select('INBOX')
    yield conn
    conn.logout()


def message(n: int, body: bytes = b'') -> bytes:
    return (b'From: Alice <alice@example.org>\r\nTo: Bob <bob@example.org>\r\n'
            b'Subject: message %d\r\nMessage-ID: <%d@example.org>\r\n\r\nHello %d.\r\n' % (n, n, n)) + body


def fill(session: imap.ImapSession, count: int, folder: str = 'INBOX') -> list[int]:
    return [session.append(folder, message(n)) for n in range(1, count + 1)]


def other_flags(other, uid: int, flag: str) -> None:
    """The other client adds a flag, and we check that it did.

    Dovecot runs a command against the session's view as it was before the
    command: a UID STORE for a message appended since would match nothing and
    still answer OK. NOOP brings the view up to date first.
    """
    other.noop()
    typ, data = other.uid('STORE', str(uid), '+FLAGS', f'({flag})')
    assert typ == 'OK' and data != [None], f'the other client does not see UID {uid}'


def other_expunges(other, uid: int) -> None:
    other_flags(other, uid, '\\Deleted')
    other.uid('EXPUNGE', str(uid))
    assert other.untagged_responses.pop('EXPUNGE', None), f'the other client did not expunge UID {uid}'


def count_commands(session: imap.ImapSession) -> list[str]:
    """Record every command the session's imaplib connection sends from now on ('UID MOVE', 'NOOP')."""
    sent = []
    send_command = session.conn._command

    def recording(name, *args):
        sent.append(f'{name} {args[0]}' if name == 'UID' else name)
        return send_command(name, *args)

    session.conn._command = recording
    return sent


# ---------------------------------------------------------------- pure functions

def test_modified_utf7_matches_rfc3501_example():
    assert imap.decode_mutf7('~peter/mail/&U,BTFw-/&ZeVnLIqe-') == '~peter/mail/台北/日本語'
    assert imap.encode_mutf7('~peter/mail/台北/日本語') == '~peter/mail/&U,BTFw-/&ZeVnLIqe-'


@pytest.mark.parametrize('name, wire', [
    ('INBOX', 'INBOX'),
    ('Tom & Jerry', 'Tom &- Jerry'),
    ('Entwürfe', 'Entw&APw-rfe'),
    ('Entwürfe.日本', 'Entw&APw-rfe.&ZeVnLA-'),
    ('Smile 😀', 'Smile &2D3eAA-'),   # outside the BMP: a UTF-16 surrogate pair
    ('ä&ö', '&AOQ-&-&APY-'),
])
def test_modified_utf7_round_trips(name, wire):
    assert imap.encode_mutf7(name) == wire
    assert imap.decode_mutf7(wire) == name


@pytest.mark.parametrize('wire', ['&U,BTFw', 'broken &', '&U,B!Fw-'])
def test_invalid_modified_utf7_is_a_value_error(wire):
    with pytest.raises(ValueError):
        imap.decode_mutf7(wire)


def test_uid_set_is_compact_and_parses_back():
    uids = [*range(1, 6), 9, *range(12, 21)]
    assert imap.uid_set(reversed(uids + [9, 3])) == '1:5,9,12:20'
    assert imap.uid_set([]) == ''
    assert imap.parse_sequence_set('1:5,9,20:12') == uids


def test_uid_sets_split_long_sets_without_losing_uids():
    scattered = list(range(1, 20_000, 2))   # no two adjacent: the worst case for a sequence set
    sets = imap.uid_sets(scattered, max_length=1000)
    assert all(len(text) <= 1000 for text in sets) and len(sets) > 1
    assert [uid for text in sets for uid in imap.parse_sequence_set(text)] == scattered
    assert imap.uid_sets(range(1, 1001)) == ['1:1000']


@pytest.mark.parametrize('name, delimiter, role', [
    ('INBOX', '.', 'inbox'),
    ('Sent', '/', 'sent'),
    ('Sent Items', '/', 'sent'),
    ('Sent Messages', '.', 'sent'),
    ('[Gmail]/Sent Mail', '/', 'sent'),
    ('INBOX.Sent', '.', 'sent'),
    ('Deleted Items', '/', 'trash'),
    ('Deleted Messages', '/', 'trash'),
    ('TRASH', '/', 'trash'),
    ('Junk E-mail', '/', 'junk'),
    ('[Gmail]/Spam', '/', 'junk'),
    ('All Mail', '/', 'archive'),
    ('Archive', '.', 'archive'),
    ('Drafts', '.', 'drafts'),
    ('Work', '.', None),
    ('Sent.Old', '.', None),        # only the last segment counts
    ('Sent/Old', None, None),       # a flat namespace: the whole name is one segment
])
def test_role_by_name(name, delimiter, role):
    assert imap.role_by_name(name, delimiter) == role


def test_special_use_attribute_beats_a_matching_name():
    folders = imap.parse_list([
        b'(\\HasNoChildren) "/" INBOX',
        b'(\\HasNoChildren) "/" Sent',                     # an old client's folder
        b'(\\HasNoChildren \\Sent) "/" "Sent Items"',       # what the server says is Sent
        b'(\\HasNoChildren) "/" "Deleted Messages"',
        b'(\\HasNoChildren) "/" Trash',                     # both names mean trash: "Trash" ranks first
        b'(\\HasNoChildren \\Sent) "/" "Sent Too"',         # a second \\Sent: the first one listed wins
    ])
    assert {folder.name: folder.role for folder in folders} == {
        'INBOX': 'inbox', 'Sent': None, 'Sent Items': 'sent', 'Deleted Messages': None, 'Trash': 'trash',
        'Sent Too': None}


def test_gmail_style_list_without_archive_attribute():
    folders = imap.parse_list([
        b'(\\HasNoChildren) "/" "INBOX"',
        b'(\\HasChildren \\Noselect) "/" "[Gmail]"',
        b'(\\All \\HasNoChildren) "/" "[Gmail]/All Mail"',
        b'(\\HasNoChildren \\Junk) "/" "[Gmail]/Spam"',
        b'(\\HasNoChildren) "/" "a \\"quoted\\" \\\\ name"',
        (b'(\\HasNoChildren) "/" {9}', b'Literal 1'),   # a name sent as a literal
        b'',                                             # imaplib's rest of the line after that literal
    ])
    by_name = {folder.name: folder for folder in folders}
    assert by_name['[Gmail]/All Mail'].role == 'archive'
    assert by_name['[Gmail]/Spam'].role == 'junk'
    assert not by_name['[Gmail]'].selectable and by_name['[Gmail]'].role is None
    assert by_name['a "quoted" \\ name'].raw_name == 'a "quoted" \\ name'
    assert by_name['Literal 1'].delimiter == '/'


def test_parse_fetch_skips_vanished_bodies_and_reads_items_after_the_literal():
    data = [
        (b'1 (UID 7 FLAGS (\\Seen $Label) RFC822.SIZE 3 INTERNALDATE " 2-Jan-2024 03:04:05 -0130" '
         b'MODSEQ (12) BODY[] {3}', b'abc'), b')',
        b'2 (UID 8 BODY[] NIL)',                                     # expunged by another session
        b'3 (FLAGS (\\Flagged) UID 9 MODSEQ (14))',                 # an unsolicited flag update
        (b"4 (UID 10 BODY[] {2}", b"hi"), b" FLAGS (\\Recent) RFC822.SIZE 2 INTERNALDATE \"bad\")",   # items after it
    ]
    first, second = imap.parse_fetch(data)
    minus_0130 = datetime.timezone(-datetime.timedelta(hours=1, minutes=30))
    assert first == imap.FetchedMessage(7, ('\\Seen', '$Label'), 3,
                                        datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=minus_0130), 12, b'abc')
    assert second == imap.FetchedMessage(10, (), 2, None, None, b'hi')


# ---------------------------------------------------------------- connecting and logging in

@pytest.mark.parametrize('security', ['none', 'starttls', 'tls'])
def test_login_with_each_security(dovecot, account, security):
    with open_session(dovecot, account, security) as session:
        assert isinstance(session.conn.sock, ssl.SSLSocket) == (security != 'none')
        # Dovecot lists these only after login: the session must not keep the greeting's list.
        assert {'CONDSTORE', 'QRESYNC', 'MOVE', 'UIDPLUS', 'ESEARCH', 'SPECIAL-USE'} <= session.capabilities
        assert session.enabled == {'QRESYNC'}
        assert session.select('INBOX').exists == 0


@pytest.mark.parametrize('security', ['starttls', 'tls'])
def test_default_context_rejects_the_self_signed_certificate(dovecot, account, security):
    with pytest.raises(PermanentMailError, match=r'certificate we do not trust \(self-signed certificate\)') as caught:
        open_session(dovecot, account, security, ssl_context=None)
    assert caught.value.code == 'certificate_untrusted'


def test_wrong_password_fails_fast_and_does_not_echo_it(dovecot, account):
    started = time.monotonic()
    with pytest.raises(AuthenticationFailed, match='rejected the login') as caught:
        open_session(dovecot, (account[0], 'wrong-password-123'))
    assert time.monotonic() - started < 2   # Dovecot answers failures on a 0.5 s timer
    assert 'wrong-password-123' not in str(caught.value)
    assert 'AUTHENTICATIONFAILED' in str(caught.value)


def test_non_ascii_password_logs_in_with_sasl_plain(dovecot):
    account = (f'imap{next(_user_numbers)}', 'pässwört-日本')
    dovecot.add_user(*account)
    with open_session(dovecot, account) as session:
        assert 'QRESYNC' in session.capabilities


# ---------------------------------------------------------------- what reaches the server

def test_a_username_carrying_a_command_is_refused_before_anything_is_sent(dovecot, account):
    username, password = account
    # Sent as it was, this logged in and then created a folder: imaplib's
    # LOGIN passes the username unquoted, CR LF and all.
    evil = f'{username} {password}\r\nX1 CREATE Injected\r\nX2'
    with pytest.raises(InvalidSetting, match='the username contains a control character') as caught:
        open_session(dovecot, (evil, password))
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, PermanentMailError)
    assert caught.value.code == 'invalid_setting' and 'Injected' not in str(caught.value)
    with open_session(dovecot, account) as session:
        assert 'Injected' not in {folder.name for folder in session.folders()}


@pytest.mark.parametrize('field, value', [
    ('host', '127.0.0.1\r\n'), ('username', 'bob\x00'), ('password', 'pw\nA1 LOGOUT'), ('password', 'tab\there'),
])
def test_control_characters_in_settings_are_refused_and_not_echoed(dovecot, account, field, value):
    settings = {'host': dovecot.host, 'username': account[0], 'password': account[1], field: value}
    with pytest.raises(InvalidSetting, match=f'the {field} contains a control character') as caught:
        imap.ImapSession(settings['host'], dovecot.imap_port, 'none', settings['username'], settings['password'],
                         timeout=5)
    assert value not in str(caught.value)


def test_a_folder_name_carrying_a_command_is_refused(session):
    with pytest.raises(InvalidSetting, match='folder name'):
        session.select('INBOX"\r\nX1 CREATE Injected\r\nX2 SELECT "INBOX')
    assert 'Injected' not in {folder.name for folder in session.folders()}
    assert session.select('INBOX').exists == 0   # the session is still good


def test_a_password_with_spaces_quotes_and_backslashes_logs_in(dovecot):
    account = (f'imap{next(_user_numbers)}', 'a b "c" \\d\\ {3}')
    dovecot.add_user(*account)
    with open_session(dovecot, account) as session:
        assert 'QRESYNC' in session.capabilities


def test_the_username_is_quoted(dovecot, account):
    # Unquoted, "no body" made LOGIN a BAD command with an extra argument;
    # quoted, Dovecot reads one username and refuses the login for it.
    with pytest.raises(AuthenticationFailed, match='AUTHENTICATIONFAILED') as caught:
        open_session(dovecot, ('no "body" \\here', account[1]))
    assert caught.value.code == 'auth_rejected'


def test_refused_port_is_temporary(dovecot, account):
    port = services.free_port()   # nothing listens there
    with pytest.raises(TemporaryMailError, match='refused the connection') as caught:
        imap.ImapSession(dovecot.host, port, 'none', *account, timeout=5)
    assert caught.value.code == 'refused'


def test_silent_server_times_out_as_temporary(account):
    with socket.create_server(('127.0.0.1', 0)) as listener:   # accepts via the backlog, never greets
        started = time.monotonic()
        with pytest.raises(TemporaryMailError, match='timed out') as caught:
            imap.ImapSession('127.0.0.1', listener.getsockname()[1], 'none', *account, timeout=0.3)
        assert time.monotonic() - started < 2   # the greeting's wait, then a TLS probe's
        assert caught.value.code == 'timed_out'


def test_server_disconnect_mid_session_is_temporary(dovecot, session, account):
    session.select('INBOX')
    subprocess.run([dovecot.doveadm, '-c', str(dovecot.config), 'kick', account[0]], check=True,
                   capture_output=True)
    deadline = time.monotonic() + 5
    with pytest.raises(TemporaryMailError, match='dropped the connection'):
        while time.monotonic() < deadline:   # kick signals the imap process and returns before it exits
            session.uids()
    with pytest.raises(TemporaryMailError, match='broke earlier'):
        session.uids()


# ---------------------------------------------------------------- folders

def test_folders_carry_special_use_roles(session):
    folders = session.folders()
    assert {folder.name: folder.role for folder in folders} == {
        'INBOX': 'inbox', 'Sent': 'sent', 'Trash': 'trash', 'Junk': 'junk', 'Drafts': 'drafts',
        'Archive': 'archive'}
    assert all(folder.selectable and folder.delimiter == '.' for folder in folders)
    assert next(f for f in folders if f.name == 'Sent').flags == ('\\HasNoChildren', '\\Sent')


def test_non_ascii_folder_round_trips_through_modified_utf7(session):
    name = f'Entwürfe{session.delimiter}日本'
    raw_name = session.create_folder(name)
    assert raw_name == 'Entw&APw-rfe.&ZeVnLA-'
    assert session.create_folder(name) == raw_name   # already there: no error
    by_name = {folder.name: folder for folder in session.folders()}
    assert by_name[name].raw_name == raw_name and by_name[name].selectable and by_name[name].role is None
    assert not by_name['Entwürfe'].selectable   # Dovecot lists the implied parent as \Noselect
    uid = session.append(raw_name, message(1))
    assert session.select(raw_name).exists == 1
    assert [m.uid for m in session.fetch([uid])] == [uid]


def test_folder_name_the_server_refuses_is_permanent(session):
    with pytest.raises(PermanentMailError, match=r"\[CANNOT\].*'/'"):   # Dovecot's delimiter is '.'
        session.create_folder('Entwürfe/日本')


def test_selecting_a_deleted_folder_is_folder_gone(session, other):
    raw_name = session.create_folder('Doomed')
    session.select(raw_name)
    assert other.delete(raw_name)[0] == 'OK'
    with pytest.raises(imap.FolderGone, match="no folder 'Doomed'"):
        session.select(raw_name)
    assert session.select('INBOX').exists == 0   # the session is still usable
    with pytest.raises(imap.FolderGone, match='TRYCREATE'):
        session.append(raw_name, message(1))


# ---------------------------------------------------------------- select, fetch, search

def test_select_reports_uidvalidity_uidnext_and_highestmodseq(session):
    empty = session.select('INBOX')
    assert (empty.exists, empty.uidnext, empty.writable) == (0, 1, False)
    assert empty.uidvalidity > 0 and empty.highestmodseq >= 1
    assert fill(session, 3) == [1, 2, 3]
    full = session.select('INBOX', readonly=False)
    assert (full.exists, full.uidnext, full.uidvalidity, full.writable) == (3, 4, empty.uidvalidity, True)
    assert full.highestmodseq > empty.highestmodseq
    assert full.vanished == [] and full.changed == {}


def test_appended_messages_come_back_byte_for_byte(session):
    when = datetime.datetime(2024, 2, 29, 23, 59, 58, tzinfo=datetime.timezone(datetime.timedelta(hours=9)))
    bodies = [
        message(1),
        message(2, b'.a line with a leading dot\r\n..two\r\n.\r\n'),
        message(3, 'Grüße 日本\r\n'.encode() + b'\xff\xfe raw 8-bit\r\n'),
        message(4, b'x' * 5000 + b'\r\n'),
    ]
    flag_sets = [(), ('\\Seen',), ('\\Flagged', '$Important'), ('\\Answered', '\\Seen')]
    uids = [session.append('INBOX', raw, flags, when) for raw, flags in zip(bodies, flag_sets)]
    session.select('INBOX')
    fetched = list(session.fetch(uids))
    assert [m.uid for m in fetched] == uids
    assert [m.raw for m in fetched] == bodies
    assert [m.size for m in fetched] == [len(raw) for raw in bodies]
    assert [set(m.flags) for m in fetched] == [set(flags) for flags in flag_sets]
    assert all(m.internaldate == when for m in fetched)
    assert all(isinstance(m.modseq, int) and m.modseq > 0 for m in fetched)
    assert session.all_flags()[uids[0]] == ()   # BODY.PEEK: fetching did not set \Seen


def test_fetch_in_batches_skips_unknown_uids(session):
    uids = fill(session, 12)
    session.select('INBOX')
    sent = count_commands(session)
    fetched = list(session.fetch([999, *reversed(uids)], batch=5))
    assert [m.uid for m in fetched] == uids
    assert fetched[11].raw == message(12)
    assert sent == ['UID SEARCH'] + ['UID FETCH'] * 3   # the large ones (none), then 5 + 5 + 2 messages


def test_fetch_batches_are_bounded_in_bytes(session):
    big = message(0, b'x' * 50_000 + b'\r\n')
    uids = [session.append('INBOX', raw) for raw in (message(1), big, message(2), message(3), big)]
    session.select('INBOX')
    sent = count_commands(session)
    fetched = list(session.fetch(uids, batch=100, batch_bytes=len(big)))
    assert [m.raw for m in fetched] == [message(1), big, message(2), message(3), big]
    # which are large, their sizes, then [1], [big], [2, 3], [big]
    assert sent == ['UID SEARCH'] + ['UID FETCH'] * 5


def test_batches_cut_by_count_and_bytes():
    sizes = {1: 10, 2: 10, 3: 100, 4: 10, 5: 10, 6: 10}
    assert list(imap.batches(sizes, 2, 1000)) == [[1, 2], [3, 4], [5, 6]]
    assert list(imap.batches(sizes, 10, 50)) == [[1, 2], [3], [4, 5, 6]]   # 3 alone: larger than 50
    assert list(imap.batches({}, 10, 50)) == []


def test_messages_expunged_meanwhile_are_missing_from_fetch(session, other):
    uids = fill(session, 3)
    session.select('INBOX')
    other_expunges(other, 2)
    assert [m.uid for m in session.fetch(uids)] == [1, 3]


def test_uids_and_uids_since(session):
    fill(session, 3)
    session.select('INBOX')
    assert session.uids() == [1, 2, 3]
    assert session.uids_since(2) == [2, 3]
    assert session.uids_since(0) == [1, 2, 3]
    assert session.uids_since(4) == []   # the server answers 4:* with UID 3: filtered out


def test_uids_since_a_day_and_newest_first_fetch(session):
    day = datetime.date(2026, 1, 5)
    for n, when in enumerate((day - datetime.timedelta(days=1), day, day + datetime.timedelta(days=30))):
        session.append('INBOX', message(n), date=datetime.datetime.combine(when, datetime.time(23),
                                                                           datetime.timezone.utc))
    assert imap.search_date(day) == '5-Jan-2026'
    session.select('INBOX')
    assert session.uids(since=day) == [2, 3] and session.uids_since(3, since=day) == [3]
    session.capabilities.discard('ESEARCH')
    assert session.uids(since=day) == [2, 3]
    assert [m.uid for m in session.fetch([1, 2, 3], batch=2, newest_first=True)] == [2, 3, 1]   # [3, 2], [1]


def test_uidvalidity_of_a_folder_without_selecting_it(session):
    raw_name = session.create_folder('Elsewhere')
    expected = session.select(raw_name).uidvalidity
    session.select('INBOX')
    assert session.uidvalidity_of(raw_name) == expected and session.selected == 'INBOX'


def test_identities_are_size_and_the_id_and_date_lines(session):
    uids = fill(session, 2)
    session.select('INBOX')
    found = {m.uid: m for m in session.identities(uids)}
    assert found[1].size == len(message(1))
    assert found[1].raw.lower().startswith((b'message-id:', b'date:')) and b'Subject' not in found[1].raw


def test_uids_without_esearch(session):
    fill(session, 3)
    session.select('INBOX')
    session.capabilities.discard('ESEARCH')   # the same server, asked the RFC 3501 way
    assert session.uids() == [1, 2, 3] and session.uids_since(3) == [3]


def test_changed_flags_sees_another_clients_change(session, other):
    fill(session, 3)
    state = session.select('INBOX')
    assert session.changed_flags(state.highestmodseq) == {}
    other_flags(other, 2, '\\Flagged')
    assert session.changed_flags(state.highestmodseq) == {2: ('\\Flagged',)}
    assert session.all_flags() == {1: (), 2: ('\\Flagged',), 3: ()}


def test_qresync_select_returns_what_vanished_and_changed(session, other):
    fill(session, 4)
    before = session.select('INBOX')
    other_expunges(other, 2)
    other_flags(other, 3, '\\Seen')
    after = session.select('INBOX', qresync=(before.uidvalidity, before.highestmodseq))
    assert after.vanished == [2]
    assert after.changed == {3: ('\\Seen',)}
    assert (after.exists, after.uidvalidity) == (3, before.uidvalidity)
    assert after.highestmodseq > before.highestmodseq


# ---------------------------------------------------------------- changing the mailbox

def make_messages(other, count: int) -> None:
    """At least count messages in INBOX in a few commands: append one, then double by UID COPY."""
    other.append('INBOX', None, None, message(1))
    total = 0
    while total < count:
        other.noop()   # see the copies of the last round (see other_flags)
        other.uid('COPY', '1:*', 'INBOX')
        total = int(other.select('INBOX')[1][0])


def test_move_of_1000_messages_takes_one_command(session, other):
    make_messages(other, 1000)   # 1,024
    session.select('INBOX', readonly=False)
    uids = session.uids()[:1000]
    sent = count_commands(session)
    session.move(uids, 'Archive')
    assert sent == ['UID MOVE']   # one command, with the set 1:1000
    assert len(session.uids()) == 24
    assert session.select('Archive').exists == 1000


def test_move_without_move_extension_copies_and_expunges(session, other):
    make_messages(other, 1000)
    other_flags(other, 1001, '\\Deleted')   # someone else's pending delete
    session.select('INBOX', readonly=False)
    session.capabilities.discard('MOVE')   # the same server, used the RFC 3501 + UIDPLUS way
    uids = session.uids()[:1000]
    sent = count_commands(session)
    session.move(uids, 'Trash')
    assert sent == ['UID COPY', 'UID STORE', 'UID EXPUNGE']
    assert session.uids() == list(range(1001, 1025))   # UID EXPUNGE left 1001 alone
    assert session.select('Trash').exists == 1000


def test_store_flags_adds_and_removes(session):
    fill(session, 3)
    session.select('INBOX', readonly=False)
    session.store_flags([1, 2], add=('\\Seen', '$Work'))
    session.store_flags([2], remove=('$Work',))
    assert session.all_flags() == {1: ('\\Seen', '$Work'), 2: ('\\Seen',), 3: ()}


def test_expunge_uids_deletes_only_those(session, other):
    fill(session, 4)
    other_flags(other, 4, '\\Deleted')   # someone else's pending delete
    session.select('INBOX', readonly=False)
    session.expunge_uids([1, 3])
    assert session.uids() == [2, 4]


def test_writes_to_a_read_only_selection_are_refused(session):
    fill(session, 2)
    assert not session.select('INBOX').writable   # EXAMINE
    # Dovecot itself would answer OK and ignore the STORE, and would carry out the MOVE.
    with pytest.raises(PermanentMailError, match='read-write'):
        session.store_flags([1], add=('\\Seen',))
    with pytest.raises(PermanentMailError, match='read-write'):
        session.move([1], 'Trash')
    with pytest.raises(PermanentMailError, match='read-write'):
        session.expunge_uids([2])
    assert session.all_flags() == {1: (), 2: ()}


def test_copied_uids_pair_source_and_target_in_the_order_written():
    assert imap.copied_uids([b'7 1:3,9 20:23', 'Moved [COPYUID 7 5 30] done']) == {1: 20, 2: 21, 3: 22, 9: 23, 5: 30}
    assert imap.copied_uids([b'7 3:1 10:12']) == {3: 10, 2: 11, 1: 12}
    assert imap.copied_uids([b'7 1:3 20:21', b'7 1:4294967295 1:4294967295']) == {}  # mismatched or huge: nothing


# ---------------------------------------------------------------- a hostile server's numbers and sets

class ScriptedServer:
    """An IMAP server on loopback that answers each command with the untagged lines a test gives it:
    what Dovecot never sends, a hostile server can. One connection, served by a thread."""

    GREETING = b'* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] scripted\r\n'
    CAPABILITIES = b'* CAPABILITY IMAP4rev1 CONDSTORE QRESYNC ESEARCH UIDPLUS\r\n'

    def __init__(self, replies):
        self.replies = {b'LOGIN': [self.CAPABILITIES], b'ENABLE': [b'* ENABLED QRESYNC\r\n'],
                        **{command.encode(): lines for command, lines in replies.items()}}
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        conn, _ = self.listener.accept()
        with conn, conn.makefile('rb') as lines:
            conn.sendall(self.GREETING)
            for line in lines:
                tag, command = (line.split() + [b'', b''])[:2]
                command = command.upper()
                conn.sendall(b''.join(self.replies.get(command, [])))
                conn.sendall(tag + (b' OK done\r\n' if command != b'LOGOUT' else b' OK bye\r\n'))
                if command == b'LOGOUT':
                    return

    def session(self):
        return imap.ImapSession('127.0.0.1', self.port, 'none', 'user', 'pw', timeout=5)

    def close(self):
        self.listener.close()
        self.thread.join(5)


SELECTED = [b'* 3 EXISTS\r\n', b'* OK [UIDVALIDITY 7] ok\r\n', b'* OK [UIDNEXT 4] ok\r\n',
            b'* OK [HIGHESTMODSEQ 90] ok\r\n', b'* OK [READ-WRITE] ok\r\n']
DIGITS = b'9' * 5000   # int() refuses strings of more than 4,300 digits


@pytest.fixture
def scripted():
    servers = []

    def start(**replies):
        servers.append(ScriptedServer(replies))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def test_a_vanished_range_of_four_billion_uids_stays_two_numbers(scripted):
    server = scripted(EXAMINE=[b'* VANISHED (EARLIER) 1:4294967295,7\r\n'] + SELECTED)
    started = time.monotonic()
    with server.session() as session:
        state = session.select('INBOX', qresync=(7, 80))
    assert time.monotonic() - started < 2
    assert state.vanished.ranges == ((1, 4294967295),)
    assert len(state.vanished) == 4294967295 and 3 in state.vanished and 4294967296 not in state.vanished


def test_an_esearch_set_larger_than_any_folder_is_a_protocol_error(scripted):
    server = scripted(EXAMINE=SELECTED, UID=[b'* ESEARCH (TAG "x") UID ALL 1:4294967295\r\n'])
    started = time.monotonic()
    with server.session() as session:
        session.select('INBOX')
        with pytest.raises(imap.ProtocolError, match='more than a folder holds'):
            session.uids()
    assert time.monotonic() - started < 2


@pytest.mark.parametrize('command, reply, call', [
    ('EXAMINE', [b'* ' + DIGITS + b' EXISTS\r\n'] + SELECTED[1:], lambda s: None),
    ('UID', [b'* ESEARCH (TAG "x") UID ALL 1:' + DIGITS + b'\r\n'], lambda s: s.uids()),
    ('UID', [b'* 1 FETCH (UID ' + DIGITS + b' FLAGS (\\Seen))\r\n'], lambda s: s.all_flags()),
    ('UID', [b'* 1 FETCH (UID 1 RFC822.SIZE ' + DIGITS + b' BODY[] {3}\r\nabc)\r\n'], lambda s: list(s.fetch([1]))),
    ('UID', [b'* 1 FETCH (UID 1 BODY[] {' + DIGITS + b'}\r\n'], lambda s: list(s.fetch([1]))),
])
def test_a_number_of_thousands_of_digits_is_a_protocol_error(scripted, command, reply, call):
    server = scripted(**{command: reply, **({} if command == 'EXAMINE' else {'EXAMINE': SELECTED})})
    with server.session() as session:
        with pytest.raises(imap.ProtocolError) as caught:
            call(session.select('INBOX') and session)
    assert caught.value.code == 'protocol_error' and len(str(caught.value)) < 200


def test_numbers_and_sets_from_the_server_are_checked():
    assert imap.number(b'4294967295') == 4294967295
    for bad in (DIGITS, b'', b'-1', b'12a', '١٢'):   # the last: Arabic-Indic digits, which int() would take
        with pytest.raises(imap.ProtocolError):
            imap.number(bad)
    assert imap.UidSet.parse('9:7,1,2') == [1, 2, 7, 8, 9]
    assert imap.UidSet.parse('5:1,3:9').ranges == ((1, 9),)
    with pytest.raises(imap.ProtocolError):
        imap.UidSet.parse('1:*')
    with pytest.raises(imap.ProtocolError, match='more than a folder holds'):
        imap.parse_sequence_set('1:4294967295')
