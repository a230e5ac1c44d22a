"""The dashboard: its sign-in contract over plain HTTP, and its pages in a real headless Chromium.

Chromium is Debian's (`/usr/bin/chromium`), driven by Playwright's Python
package, which cannot download browsers here. Screenshots of each page go to
test-artefacts/ for a reviewer.
"""
import http.client
import io
import os
import pathlib
import re
import urllib.parse
import wsgiref.util

import pytest

import models
import tasks
from taskq import ledger
from tests import probe_tasks
from tests.conftest import ROOT, STATE, record, wait_for, wait_for_state

ARTEFACTS = ROOT / 'test-artefacts'
CHROMIUM_ARGS = ['--no-sandbox', '--headless', '--disable-gpu', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--no-first-run']


# ---------------------------------------------------------------- plain HTTP

def raw(web, method, path, body=None, headers=None):
    """One request without following redirects: (status, headers, text)."""
    conn = http.client.HTTPConnection('127.0.0.1', web.port, timeout=15)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read().decode()
    finally:
        conn.close()


def sign_in(web, key):
    """A session cookie ('name=value') for `key`."""
    status, headers, _ = raw(web, 'POST', '/dashboard/login', urllib.parse.urlencode({'key': key}),
                             {'Content-Type': 'application/x-www-form-urlencoded'})
    assert status == 303 and headers['Location'].endswith('/dashboard'), status
    return headers['Set-Cookie'].split(';')[0]


def csrf_of(html):
    return re.search(r'name="csrf" value="([0-9a-f]+)"', html).group(1)


def identity(key):
    with models.all_tenants():
        row = models.ApiKey.lookup(key)
    return row.tenant_id, row.user_id


def test_login_form_has_one_field_named_key(web):
    status, _, html = raw(web, 'GET', '/dashboard/login')
    assert status == 200
    assert re.findall(r'<input[^>]*name="([^"]+)"', html) == ['key']


def test_signed_out_visitor_is_sent_to_the_sign_in_page(web):
    for path in ('/dashboard', '/dashboard/', '/dashboard/tasks', '/dashboard/consumers', '/dashboard/tasks/x',
                 '/dashboard/fragment/overview'):
        status, headers, _ = raw(web, 'GET', path)
        assert (status, headers['Location']) == (303, '/dashboard/login'), path


def test_valid_key_gets_a_strict_http_only_expiring_cookie(web, make_key):
    status, headers, _ = raw(web, 'POST', '/dashboard/login', urllib.parse.urlencode({'key': make_key(operator=True)}),
                             {'Content-Type': 'application/x-www-form-urlencoded'})
    assert status == 303 and headers['Location'].endswith('/dashboard')
    cookie = headers['Set-Cookie'].lower()
    assert 'httponly' in cookie and 'samesite=strict' in cookie and 'max-age=' in cookie
    assert 'secure' not in cookie.replace('httponly', '')  # plain HTTP here


def test_cookie_is_secure_when_served_over_https(make_key):
    # waitress serves HTTPS only behind a proxy it trusts; the WSGI scheme is what the dashboard reads.
    import dashboard
    body = urllib.parse.urlencode({'key': make_key(operator=True)}).encode()
    environ = {'REQUEST_METHOD': 'POST', 'PATH_INFO': '/login', 'CONTENT_TYPE': 'application/x-www-form-urlencoded',
               'CONTENT_LENGTH': str(len(body)), 'wsgi.input': io.BytesIO(body)}
    wsgiref.util.setup_testing_defaults(environ)
    environ['wsgi.url_scheme'] = 'https'
    answer = {}
    b''.join(dashboard.app(environ, lambda status, headers, exc_info=None: answer.update(status=status,
                                                                                         headers=headers)))
    cookie = dict(answer['headers'])['Set-Cookie'].lower()
    assert answer['status'].startswith('303') and '; secure' in cookie and 'httponly' in cookie


def test_wrong_key_is_refused_and_shown_nowhere(web):
    status, headers, html = raw(web, 'POST', '/dashboard/login', 'key=esk_wrong-key-value',
                                {'Content-Type': 'application/x-www-form-urlencoded'})
    assert status == 401 and 'Set-Cookie' not in headers and 'esk_wrong-key-value' not in html


def test_post_without_csrf_token_is_refused(web, make_key, unique):
    key = make_key(unique)
    cookie = sign_in(web, key)
    tenant_id, user_id = identity(key)
    task = probe_tasks.sleeps.schedule((1,), dict(tenant_id=tenant_id, user_id=user_id), delay=600)
    for form in ('', 'csrf=0123456789abcdef'):
        status, _, _ = raw(web, 'POST', f'/dashboard/tasks/{task.id}/revoke', form,
                           {'Cookie': cookie, 'Content-Type': 'application/x-www-form-urlencoded'})
        assert status == 403
    assert record(task.id).state == 'pending'
    status, _, _ = raw(web, 'POST', '/dashboard/logout', '', {'Cookie': cookie})
    assert status == 403


def test_logout_ends_the_session_on_the_server(web, make_key):
    key = make_key(operator=True)
    cookie = sign_in(web, key)
    status, _, html = raw(web, 'GET', '/dashboard', headers={'Cookie': cookie})
    assert status == 200 and key not in html and cookie.split('=', 1)[1] not in html
    status, headers, _ = raw(web, 'POST', '/dashboard/logout', f'csrf={csrf_of(html)}',
                             {'Cookie': cookie, 'Content-Type': 'application/x-www-form-urlencoded'})
    assert (status, headers['Location']) == (303, '/dashboard/login')
    status, headers, _ = raw(web, 'GET', '/dashboard', headers={'Cookie': cookie})  # the old cookie, replayed
    assert (status, headers['Location']) == (303, '/dashboard/login')


def test_sign_in_posted_from_another_site_is_refused(web, make_key):
    status, headers, _ = raw(web, 'POST', '/dashboard/login', urllib.parse.urlencode({'key': make_key(operator=True)}),
                             {'Content-Type': 'application/x-www-form-urlencoded', 'Origin': 'https://evil.example'})
    assert status == 403 and 'Set-Cookie' not in headers


def test_other_users_task_is_404_and_not_listed(web, make_key, unique):
    own_key, other_key = make_key(unique, 'alice'), make_key(unique + 'b', 'bob')
    tenant_id, user_id = identity(other_key)
    task = probe_tasks.sleeps.schedule((1,), dict(tenant_id=tenant_id, user_id=user_id), delay=600)
    cookie = sign_in(web, own_key)
    status, _, html = raw(web, 'GET', f'/dashboard/tasks/{task.id}', headers={'Cookie': cookie})
    assert status == 404 and unique + 'b' not in html
    _, _, html = raw(web, 'GET', '/dashboard/tasks?state=pending', headers={'Cookie': cookie})
    assert task.id[:12] not in html and unique + 'b' not in html
    ledger.revoke(tasks.huey, task.id)


def test_history_pages_through_ties_once_each(web, make_key, unique):
    key = make_key(unique)
    tenant_id, user_id = identity(key)
    ids = [probe_tasks.sleeps.schedule((1,), dict(tenant_id=tenant_id, user_id=user_id), delay=600).id
           for _ in range(120)]
    same = models.utcnow().replace(microsecond=0)
    for task_id in ids[40:100]:  # a run of equal enqueued_at across page boundaries: the id breaks the tie
        ledger.update(task_id, enqueued_at=same)
    cookie, seen, path = sign_in(web, key), [], f'/dashboard/tasks?state=pending&tenant={tenant_id}'
    while path:
        status, _, html = raw(web, 'GET', path, headers={'Cookie': cookie})
        assert status == 200
        seen += re.findall(r'<tr class="pending" data-task="([^"]+)"', html)
        link = re.search(r'href="([^"]+)" id="next-page"', html)
        path = link and link.group(1).replace('&amp;', '&')
    assert sorted(seen) == sorted(ids) and len(seen) == len(ids)
    for task_id in ids:
        ledger.revoke(tasks.huey, task_id)


# ---------------------------------------------------------------- in a real browser

@pytest.fixture(scope='module')
def browser():
    sync_api = pytest.importorskip('playwright.sync_api', reason='pip install -r requirements-test.txt')
    if not pathlib.Path('/usr/bin/chromium').exists():
        raise AssertionError('Debian chromium is missing: apt-get install -y chromium (./run.sh test installs it)')
    ARTEFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path='/usr/bin/chromium', args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Watched:
    """A browser page that records console errors and every request to another host."""

    def __init__(self, browser, web):
        self.context = browser.new_context(base_url=f'http://127.0.0.1:{web.port}')
        self.page = self.context.new_page()
        self.errors, self.foreign = [], []
        self.page.on('console', lambda msg: msg.type == 'error' and self.errors.append(msg.text))
        self.page.on('pageerror', lambda exc: self.errors.append(str(exc)))
        self.page.on('request', self.note_request)
        self.page.on('dialog', lambda dialog: dialog.accept())  # confirm() of each action

    def note_request(self, request):
        if urllib.parse.urlsplit(request.url).hostname not in ('127.0.0.1', None):
            self.foreign.append(request.url)

    def sign_in(self, key):
        self.page.goto('/dashboard/login')
        self.page.fill('input[name=key]', key)
        self.page.click('button[type=submit]')
        self.page.wait_for_url('**/dashboard')

    def shot(self, name):
        self.page.screenshot(path=str(ARTEFACTS / f'dashboard-{name}.png'), full_page=True)

    def close(self):
        self.context.close()
        assert self.errors == [], self.errors
        assert self.foreign == [], self.foreign


@pytest.fixture
def watched(browser, web):
    pages = []

    def open_page():
        pages.append(Watched(browser, web))
        return pages[-1]
    yield open_page
    for page in pages:
        page.close()


def test_sign_in_and_sign_out_in_the_browser(watched, make_key):
    view = watched()
    view.page.goto('/dashboard/tasks')
    view.page.wait_for_url('**/dashboard/login')
    view.shot('login')
    view.sign_in(make_key(operator=True))
    assert view.page.locator('h1').inner_text() == 'Overview'
    view.page.click('#sign-out')
    view.page.wait_for_url('**/dashboard/login')
    view.page.goto('/dashboard')
    view.page.wait_for_url('**/dashboard/login')


def test_overview_shows_queued_and_running_tasks_live(watched, make_key, consumer, unique):
    key = make_key(unique)
    tenant_id, user_id = identity(key)
    view = watched()
    view.sign_in(make_key(operator=True))
    waiting = probe_tasks.sleeps.schedule((1,), dict(tenant_id=tenant_id, user_id=user_id), delay=600)
    crawling = probe_tasks.crawls(30, 0.1, tenant_id=tenant_id, user_id=user_id)  # 3 s: below the hard limit
    # No reload from here: the page's own polling must bring both in.
    bar = view.page.locator(f'progress[data-task="{crawling.id}"]')
    bar.wait_for(timeout=15000)
    first = int(bar.get_attribute('value'))
    view.page.wait_for_function(
        f'() => {{ const p = document.querySelector(\'progress[data-task="{crawling.id}"]\');'
        f' return p && Number(p.value) > {first}; }}', timeout=15000)
    assert int(view.page.inner_text('#count-pending')) >= 1
    view.shot('overview')
    view.page.goto(f'/dashboard/tasks?state=pending&tenant={tenant_id}')
    assert waiting.id[:12] in view.page.inner_text('#task-list')
    view.shot('tasks')
    view.page.goto('/dashboard/consumers')
    view.page.wait_for_selector('tr.alive')
    view.shot('consumers')
    ledger.revoke(tasks.huey, waiting.id)
    wait_for_state(crawling.id, 'succeeded', timeout=30)


def test_revoke_button_revokes_a_waiting_task(watched, make_key, unique):
    key = make_key(unique)
    tenant_id, user_id = identity(key)
    task = probe_tasks.sleeps.schedule((1,), dict(tenant_id=tenant_id, user_id=user_id), delay=600)
    view = watched()
    view.sign_in(key)
    view.page.goto(f'/dashboard/tasks/{task.id}')
    view.page.click('#revoke-button')
    view.page.wait_for_selector('#notice')
    assert view.page.inner_text('#task-state') == 'revoked'
    row = record(task.id)
    assert row.state == 'revoked' and '"by": "user alice' in row.history
    view.shot('task-revoked')


def test_retry_button_reruns_a_dead_task(watched, make_key, consumer, unique):
    key = make_key(unique)
    tenant_id, user_id = identity(key)
    task = tasks.check_spam(1, tenant_id=tenant_id, user_id=user_id)  # not this user's message: fails at once
    wait_for_state(task.id, 'failed')
    # A dead letter of a task the web process knows (it cannot re-run the probes, which only the test
    # consumer has): give up on it as exhausted retries would.
    ledger.update(task.id, state=ledger.DEAD)
    view = watched()
    view.sign_in(make_key(operator=True))
    view.page.goto(f'/dashboard/tasks/{task.id}')
    view.shot('task-dead')
    view.page.click('#retry-button')
    assert view.page.inner_text('#notice') == 'Queued again.'
    row = wait_for(lambda: (row := record(task.id)).attempts == 2 and row.state == 'failed' and row, timeout=30,
                   message='the re-run to fail again')
    history = ledger.history_of(row)
    assert [h['kind'] for h in history] == ['attempt', 'retry'] and history[1]['by'].startswith('operator')
    view.page.goto(f'/dashboard/tasks/{task.id}')
    assert view.page.locator('#history tr').count() == 4  # header, two history lines, the latest attempt


def test_stop_button_refuses_a_task_without_a_safe_point(watched, make_key, consumer, unique):
    key = make_key(unique)
    tenant_id, user_id = identity(key)
    task = probe_tasks.crawls(30, 0.1, tenant_id=tenant_id, user_id=user_id)  # 3 s: below the hard limit
    wait_for_state(task.id, 'running')
    with pytest.raises(ledger.LedgerConflict, match='no point where it can stop'):
        ledger.stop(task.id, by='test')
    view = watched()
    view.sign_in(make_key(operator=True))
    view.page.goto(f'/dashboard/tasks/{task.id}')
    assert view.page.inner_text('#task-state') == 'running'  # shown while running, and still no button:
    assert view.page.locator('#stop-button').count() == 0  # only syncs and sends can stop midway
    wait_for_state(task.id, 'succeeded', timeout=10)


def fill_maildir(dovecot, user, count):
    """`count` small messages written straight into the user's Maildir `new/` (appending them over
    IMAP one by one takes far longer); Dovecot takes them in at the next SELECT."""
    maildir = dovecot.maildir(user)
    for sub in ('', 'cur', 'new', 'tmp'):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
        os.chown(maildir / sub, dovecot.mail_user.pw_uid, dovecot.mail_user.pw_gid)
    for i in range(count):
        raw = (f'From: sender{i}@example.net\r\nTo: {user}@example.com\r\nSubject: message {i}\r\n'
               f'Date: Mon, 7 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{i}.{user}@example.net>\r\n'
               f'\r\nBody of message {i}.\r\n').encode()
        path = maildir / 'new' / f'1700000000.M{i}P1.emailsvc-test,S={len(raw)}'
        path.write_bytes(raw)
        os.chown(path, dovecot.mail_user.pw_uid, dovecot.mail_user.pw_gid)


def stored_messages(tenant_id, account_id):
    with models.tenant_scope(tenant_id):
        return models.EmailMessage.select().where(models.EmailMessage.client == account_id).count()


def test_stop_button_stops_a_running_sync(watched, make_key, client, consumer, unique):
    key = make_key(unique)
    tenant_id, _ = identity(key)
    dovecot, total = STATE["dovecot"], 6000
    dovecot.add_user(unique, 'dove-pw-1')
    fill_maildir(dovecot, unique, total)  # before the account exists: creating it starts its first sync
    resp = client.as_key(key).post('/api/v1/accounts', {
        'email': f'{unique}@example.com',
        'incoming': {'protocol': 'imap', 'host': '127.0.0.1', 'port': dovecot.imap_port, 'security': 'none',
                     'username': unique, 'password': 'dove-pw-1'}})
    assert resp.status == 201, resp.text
    account_id, task_id = resp.json['id'], resp.json['sync_task_id']
    view = watched()
    view.sign_in(key)
    # The first batch committed: the sync is past its listing and stores in batches of 50.
    wait_for(lambda: (row := record(task_id)) and row.state == 'running' and (row.progress_done or 0) > 0,
             timeout=30, message=lambda: f'the sync to store its first batch (now {record(task_id).state})')
    view.page.goto(f'/dashboard/tasks/{task_id}')
    view.page.click('#stop-button')
    assert view.page.inner_text('#notice').startswith('Stop requested')
    row = wait_for_state(task_id, 'revoked', timeout=30)
    assert row.error == 'stopped on request' and row.progress_total == total
    view.page.wait_for_function("() => document.querySelector('#task-state').innerText === 'revoked'",
                                timeout=10000)  # the page's own polling shows it
    view.shot('task-stopped')
    stored = stored_messages(tenant_id, account_id)
    assert 0 < stored < total and stored % 50 == 0  # whole batches only
    assert '"kind": "stop"' in row.history and '"by": "user alice' in row.history
    resp = client.as_key(key).post(f'/api/v1/accounts/{account_id}/sync', {})
    assert resp.status == 202, resp.text
    later = wait_for_state(resp.json['task_id'], 'succeeded', timeout=60)
    assert later.result['messages_synced'] == total - stored
    assert stored_messages(tenant_id, account_id) == total


def test_tenant_user_cannot_see_another_tenants_task_in_the_browser(watched, make_key, unique):
    other = make_key(unique + 'x', 'mallory')
    tenant_id, user_id = identity(other)
    task = probe_tasks.sleeps.schedule((1,), dict(tenant_id=tenant_id, user_id=user_id), delay=600)
    view = watched()
    view.sign_in(make_key(unique, 'alice'))
    view.page.goto('/dashboard/tasks')
    assert task.id[:12] not in view.page.content() and unique + 'x' not in view.page.content()
    response = view.page.goto(f'/dashboard/tasks/{task.id}')
    assert response.status == 404
    view.errors.remove('Failed to load resource: the server responded with a status of 404 (Not Found)')
    view.shot('other-tenant-404')
    ledger.revoke(tasks.huey, task.id)
