"""The operator's dashboard: HTML pages at /dashboard, a Bottle app of its own.

Sign-in takes an API key once (`POST /dashboard/login`, field `key`) and
keeps a server-side session: the cookie holds a random token, the database
its hash, so signing out (or revoking the key) ends it on every web host.
Every state-changing request carries a CSRF token derived from the session
token; pages never show a key, password or session token.

An operator key sees every tenant; a user's key sees that user's tasks and
accounts only, and no tenant's name. Actions (revoke, stop, retry, purge) go
through taskq.ledger, which records who asked and when on the task.

Cost must not grow with history: the history list walks (column,
enqueued_at) indexes newest first with keyset paging; counts and charts read
TaskRollup, per-minute counts of finished tasks that the dashboard writes for
closed minutes as it goes (the last few minutes are counted live); live
updates poll small HTML fragments.
"""
import collections
import datetime
import hashlib
import hmac
import json
import logging
import pathlib
import secrets
import urllib.parse
import uuid

import bottle
import peewee as pw

import models
import tasks
from models import ApiKey, ConsumerHeartbeat, DashboardSession, EmailClient, TaskRecord, TaskRollup, Tenant, User
from taskq import ledger

ROOT = pathlib.Path(__file__).resolve().parent
VIEWS = str(ROOT / 'views')
STATIC = str(ROOT / 'static')
COOKIE = 'emailsvc_dashboard'
SESSION_LIFETIME = datetime.timedelta(hours=8)
PAGE_SIZE = 50
ROLL_LAG = 2          # minutes: a minute is rolled up once every worker's finish in it is surely written
DAY = 24 * 60         # minutes
EPOCH = datetime.datetime(1970, 1, 1)
logger = logging.getLogger('emailsvc.dashboard')


class Dashboard(bottle.Bottle):
    def default_error_handler(self, err):
        if err.status_code >= 500:
            ref = uuid.uuid4().hex[:12]
            logger.error('dashboard error %s on %s %s', ref, bottle.request.method, bottle.request.path,
                         exc_info=err.exception)
            message = f'Internal error, reference {ref}.'
        else:
            message = err.body
        return render('error', status=err.status_code, message=message, viewer=None)


app = Dashboard()


@app.hook('after_request')
def secure_headers():
    bottle.response.set_header('Content-Security-Policy', "default-src 'self'; frame-ancestors 'none'; "
                                                          "form-action 'self'; base-uri 'none'")
    bottle.response.set_header('X-Content-Type-Options', 'nosniff')
    bottle.response.set_header('Referrer-Policy', 'no-referrer')
    bottle.response.set_header('Cache-Control', 'no-store')
    if not models.database.is_closed():
        models.database.close()  # back to the pool


def render(name, **values):
    return bottle.template(name, template_lookup=[VIEWS], ago=ago, when=when, duration=duration, as_json=as_json,
                           request_notice=bottle.request.query.get('notice', '')[:300],
                           request_query=bottle.request.query_string, **values)


def when(moment):
    return models.iso(moment).replace('T', ' ').replace('Z', ' UTC') if moment else ''


def ago(moment):
    return f'{duration((models.utcnow() - moment).total_seconds())} ago' if moment else ''


def duration(seconds):
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f'{seconds} s'
    if seconds < 3600:
        return f'{seconds // 60} min {seconds % 60} s'
    if seconds < 86400:
        return f'{seconds // 3600} h {seconds % 3600 // 60} min'
    return f'{seconds // 86400} d {seconds % 86400 // 3600} h'


def as_json(value):
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def to_dashboard(path=''):
    return bottle.HTTPResponse(status=303, headers={'Location': '/dashboard' + path})


# ================================================================ sessions and access

class Viewer:
    """Who is looking: an operator (every tenant) or one user (their own tasks and accounts)."""

    def __init__(self, key, session_token):
        self.key_id, self.operator = key.id, key.is_operator
        self.tenant_id, self.user_id = key.tenant_id, key.user_id
        self.csrf = hmac.new(tasks.SETTINGS['server.secret'].encode(), b'csrf:' + session_token.encode(),
                             hashlib.sha256).hexdigest()[:40]
        self.scope = 'all' if self.operator else f'u{self.user_id}'

    def label(self):
        """Who acted, as recorded on a task: never the key itself."""
        if self.operator:
            return f'operator (key #{self.key_id})'
        with models.tenant_scope(self.tenant_id):
            user = User.get_or_none(User.id == self.user_id)
        return f'user {user.name if user else self.user_id} (key #{self.key_id})'

    def tasks(self, *fields):
        """The task records this viewer may see (call inside its scope)."""
        query = TaskRecord.select(*fields)
        return query if self.operator else query.where(TaskRecord.user_id == self.user_id)

    def scope_context(self):
        return models.all_tenants() if self.operator else models.tenant_scope(self.tenant_id)


def current_viewer():
    """The signed-in viewer, or None: the session must exist, be unexpired and its key unrevoked."""
    token = bottle.request.get_cookie(COOKIE)
    if not token:
        return None
    session = DashboardSession.get_or_none(DashboardSession.id == models.hash_key(token))
    if session is None or session.expires_at <= models.utcnow():
        return None
    key = ApiKey.get_or_none(ApiKey.id == session.key_id)
    if key is None or key.revoked_at is not None:
        return None
    return Viewer(key, token)


def page(path, method='GET', operator_only=False):
    """Route decorator: 303 to the sign-in page without a session, CSRF check on POST, then the
    handler runs in the viewer's tenant scope with the viewer as its first argument."""
    def decorate(handler):
        def guarded(**kwargs):
            viewer = current_viewer()
            if viewer is None:
                return bottle.HTTPResponse(status=303, headers={'Location': '/dashboard/login'})
            if method == 'POST' and not hmac.compare_digest(bottle.request.forms.get('csrf', ''), viewer.csrf):
                raise bottle.HTTPError(403, 'The form is out of date or came from another site (CSRF token '
                                            'missing or wrong); reload the page and try again.')
            if operator_only and not viewer.operator:
                raise bottle.HTTPError(403, 'This page needs an operator key.')
            with viewer.scope_context():
                return handler(viewer, **kwargs)
        app.route(path, method)(guarded)
        return handler
    return decorate


@app.get('/login')
def login_form():
    return render('login', error=None, viewer=None)


@app.post('/login')
def login():
    if not same_origin():
        raise bottle.HTTPError(403, 'Sign-in must come from this site\'s own form.')
    with models.all_tenants():
        key = ApiKey.lookup(bottle.request.forms.get('key', '').strip())
    if key is None:
        bottle.response.status = 401
        return render('login', error='That key is unknown or revoked.', viewer=None)
    token = secrets.token_urlsafe(32)
    now = models.utcnow()
    DashboardSession.delete().where(DashboardSession.expires_at <= now).execute()  # sweep, so the table stays small
    DashboardSession.create(id=models.hash_key(token), key_id=key.id, created_at=now,
                            expires_at=now + SESSION_LIFETIME)
    response = to_dashboard()
    response.set_cookie(COOKIE, token, path='/dashboard', httponly=True, samesite='strict',
                        secure=bottle.request.urlparts.scheme == 'https',
                        max_age=int(SESSION_LIFETIME.total_seconds()))
    return response


def same_origin():
    """A browser names the page a form came from; refuse sign-in posted from another site's page."""
    origin = bottle.request.get_header('Origin')
    if not origin or origin == 'null':
        return True
    return urllib.parse.urlsplit(origin).netloc == bottle.request.urlparts.netloc


@page('/logout', method='POST')
def logout(viewer):
    DashboardSession.delete().where(DashboardSession.id == models.hash_key(bottle.request.get_cookie(COOKIE))) \
        .execute()
    response = bottle.HTTPResponse(status=303, headers={'Location': '/dashboard/login'})
    response.delete_cookie(COOKIE, path='/dashboard')
    return response


@app.get('/static/<filename:path>')
def static(filename):
    return bottle.static_file(filename, root=STATIC)


# ================================================================ counts: rolled up per minute

def epoch_minute(moment):
    return int((moment - EPOCH).total_seconds() // 60)


def minute_start(minute):
    return EPOCH + datetime.timedelta(minutes=minute)


def roll_up(now):
    """Count the finishes of closed minutes not rolled up yet (at most the last day's)."""
    until = epoch_minute(now) - ROLL_LAG
    last = TaskRollup.select(pw.fn.MAX(TaskRollup.minute)).where(TaskRollup.scope == 'all').scalar()
    start = max(until - DAY, last + 1 if last is not None else 0)
    if start >= until:
        return
    counts = collections.Counter()
    with models.all_tenants():
        # Grouped by the database: a busy day is 300,000 finishes, and parsing each timestamp in
        # Python made the first overview after a quiet day take 7 s.
        finished = (TaskRecord.select(minute_of(TaskRecord.finished_at), TaskRecord.state, TaskRecord.user_id,
                                      pw.fn.COUNT(TaskRecord.id))
                    .where(TaskRecord.finished_at >= minute_start(start), TaskRecord.finished_at < minute_start(until),
                           finished_in_final_state())
                    .group_by(pw.SQL('1'), pw.SQL('2'), pw.SQL('3')).tuples())
        for minute, state, user_id, count in finished:
            counts['all', minute, state] += count
            if user_id is not None:
                counts[f'u{user_id}', minute, state] += count
    store_rollup([(s, m, st, c) for (s, m, st), c in counts.items()])


def store_rollup(rows):
    """Insert (scope, minute, state, count) rows as plain SQL: a busy day is 150,000 of them (a row per
    user and minute), and building peewee's statements took longer than running them."""
    sql = 'INSERT INTO "task_rollup" ("scope", "minute", "state", "count") VALUES {} ON CONFLICT DO NOTHING'
    with models.database.atomic():  # ON CONFLICT: another web process got there first
        cursor = models.database.cursor()
        if isinstance(models.database.obj, pw.PostgresqlDatabase):
            from psycopg2.extras import execute_values  # executemany would be a round trip per row
            execute_values(cursor, sql.format('%s'), rows, page_size=1000)
        else:
            cursor.executemany(sql.format('(?, ?, ?, ?)'), rows)


def minute_of(column):
    """The minute since the epoch of a UTC timestamp column, as the database computes it."""
    if isinstance(models.database.obj, pw.PostgresqlDatabase):
        return pw.fn.FLOOR(pw.fn.date_part('epoch', column) / 60).cast('integer')
    # Up to the whole second: SQLite rounds fractions to the millisecond, which moved a finish at
    # hh:mm:59.9996 into the next minute (Python, counting the live minutes, truncates).
    return pw.fn.strftime('%s', pw.fn.substr(column, 1, 19)).cast('integer') / 60


def finished_in_final_state():
    """`state IN (final states)`, leaving the index choice to the finished_at range: SQLite would walk
    the (state, enqueued_at) index, most of the ledger (1M records: seconds per overview). A unary
    plus keeps the column out of SQLite's choice; PostgreSQL rejects `+text` and chooses well itself."""
    state = TaskRecord.state
    if not isinstance(models.database.obj, pw.PostgresqlDatabase):
        state = pw.NodeList((pw.SQL('+'), state), glue='')
    return state.in_(ledger.FINAL_STATES)


_rolled = (None, {})  # (minute, {scope: what TaskRollup says for it}): this process's reading this minute


def rolled_counts(scope, now):
    """The day's 10-minute buckets and the last hour's minutes from TaskRollup, as fresh
    {bucket or minute: Counter(states)} to add the live minutes to. Rolled-up minutes are closed, so
    a web process rolls up and reads them once a minute: every open overview polls every second, and
    at a busy day's density (every minute of the day in every state) reading them cost 5-15 ms."""
    global _rolled
    current = epoch_minute(now)
    minute, cache = _rolled
    if minute != current:
        roll_up(now)
        minute, cache = _rolled = (current, {})  # one assignment: other threads see the old or the new
    if scope not in cache:
        buckets, minutes = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
        ten = (TaskRollup.minute / 10)
        for bucket, state, count in (TaskRollup.select(ten, TaskRollup.state, pw.fn.SUM(TaskRollup.count))
                                     .where(TaskRollup.scope == scope, TaskRollup.minute > current - DAY)
                                     .group_by(ten, TaskRollup.state).tuples()):
            buckets[int(bucket)][state] += int(count)
        for at, state, count in (TaskRollup.select(TaskRollup.minute, TaskRollup.state, TaskRollup.count)
                                 .where(TaskRollup.scope == scope, TaskRollup.minute > current - 60).tuples()):
            minutes[at][state] += count
        cache[scope] = (buckets, minutes)
    return tuple(collections.defaultdict(collections.Counter, {k: collections.Counter(v) for k, v in table.items()})
                 for table in cache[scope])


def finish_counts(viewer, now):
    """{'hour': {state: n}, 'day': {...}, 'per_minute': [(minute, {state: n})] x 60, 'per_10': [...] x 144}."""
    current = epoch_minute(now)
    rolled_until = current - ROLL_LAG
    buckets, minutes = rolled_counts(viewer.scope, now)
    for finished_at, state in viewer.tasks(TaskRecord.finished_at, TaskRecord.state).where(
            TaskRecord.finished_at >= minute_start(rolled_until), finished_in_final_state()).tuples():
        minute = epoch_minute(finished_at)
        minutes[minute][state] += 1
        buckets[minute // 10][state] += 1
    per_minute = [(m, minutes[m]) for m in range(current - 59, current + 1)]
    per_10 = [(b, buckets[b]) for b in range((current - DAY) // 10 + 1, current // 10 + 1)]
    return {'hour': sum((c for _, c in per_minute), collections.Counter()),
            'day': sum((c for _, c in per_10), collections.Counter()),
            'per_minute': per_minute, 'per_10': per_10}


def active_counts(viewer):
    """Waiting and running tasks by state: the backlog, whatever the depth of history."""
    return dict(viewer.tasks(TaskRecord.state, pw.fn.COUNT(TaskRecord.id))
                .where(TaskRecord.state.in_(ledger.ACTIVE_STATES)).group_by(TaskRecord.state).tuples())


def oldest_waiting(viewer, now):
    oldest = viewer.tasks(pw.fn.MIN(TaskRecord.enqueued_at)).where(TaskRecord.state == ledger.PENDING).scalar()
    return (now - oldest).total_seconds() if oldest else None


def running_tasks(viewer):
    return list(viewer.tasks().where(TaskRecord.state == ledger.RUNNING)
                .order_by(TaskRecord.enqueued_at.desc()).limit(PAGE_SIZE))


# ================================================================ pages

def overview_values(viewer):
    now = models.utcnow()
    return {'viewer': viewer, 'now': now, 'finished': finish_counts(viewer, now), 'active': active_counts(viewer),
            'oldest': oldest_waiting(viewer, now), 'running': running_tasks(viewer),
            'queue': tasks.huey.queue_depth() if viewer.operator else None}


@page('/')
def overview(viewer):
    return render('overview', title='Overview', **overview_values(viewer))


@page('/fragment/overview')
def overview_fragment(viewer):
    return render('overview_live', **overview_values(viewer))


def consumer_values(viewer):
    now = models.utcnow()
    alive_after = now - datetime.timedelta(seconds=tasks.SETTINGS['consumer.alive_seconds'])
    beats = list(ConsumerHeartbeat.select().order_by(ConsumerHeartbeat.host, ConsumerHeartbeat.consumer_pid,
                                                     ConsumerHeartbeat.pid).limit(500))
    current_ids = [b.current_task for b in beats if b.current_task]
    current = {r.id: r for r in TaskRecord.select().where(TaskRecord.id.in_(current_ids))} if current_ids else {}
    return {'viewer': viewer, 'now': now, 'beats': beats, 'alive_after': alive_after, 'current': current}


@page('/consumers', operator_only=True)
def consumers(viewer):
    return render('consumers', title='Consumers', **consumer_values(viewer))


@page('/fragment/consumers', operator_only=True)
def consumers_fragment(viewer):
    return render('consumers_live', **consumer_values(viewer))


class Filters:
    """The task history's filters, from the query string; bad values are refused with 400."""

    def __init__(self, query, viewer):
        self.state = query.get('state', '')
        self.name = query.get('name', '')
        self.tenant = query.get('tenant', '') if viewer.operator else ''
        self.account = query.get('account', '')
        self.since, self.until = query.get('since', ''), query.get('until', '')
        self.text = query.get('q', '')[:200]
        self.cursor = query.get('cursor', '')
        if self.state and self.state not in ledger.TASK_STATES:
            raise bottle.HTTPError(400, f'state must be one of {", ".join(ledger.TASK_STATES)}.')
        for name in ('tenant', 'account'):
            if getattr(self, name) and not getattr(self, name).isdigit():
                raise bottle.HTTPError(400, f'{name} must be a number.')
        self.since_at, self.until_at = self.moment('since'), self.moment('until')

    def moment(self, name):
        value = getattr(self, name)
        if not value:
            return None
        try:
            return datetime.datetime.fromisoformat(value)
        except ValueError:
            raise bottle.HTTPError(400, f'{name} must be a date and time like 2026-01-31T12:00.') from None

    def apply(self, query):
        if self.state:
            query = query.where(TaskRecord.state == self.state)
        if self.name:
            query = query.where(TaskRecord.name == self.name)
        if self.tenant:
            query = query.where(TaskRecord.tenant_id == int(self.tenant))
        if self.account:
            # The account is in the task's arguments only; the walk stops at a page of matches.
            query = query.where(TaskRecord.args.contains(f'"email_client_id": {int(self.account)},'))
        if self.since_at:
            query = query.where(TaskRecord.enqueued_at >= self.since_at)
        if self.until_at:
            query = query.where(TaskRecord.enqueued_at < self.until_at)
        if self.text:
            query = query.where(TaskRecord.error.contains(self.text))
        return query

    def link(self, **changes):
        values = {'state': self.state, 'name': self.name, 'tenant': self.tenant, 'account': self.account,
                  'since': self.since, 'until': self.until, 'q': self.text, **changes}
        return '/dashboard/tasks?' + urllib.parse.urlencode({k: v for k, v in values.items() if v})


def history_page(viewer, filters):
    """One page of the history, newest first, after the cursor's record; (rows, next cursor or None)."""
    query = filters.apply(viewer.tasks())
    if filters.cursor:
        anchor = TaskRecord.get_or_none(TaskRecord.id == filters.cursor)
        if anchor is None:
            raise bottle.HTTPError(400, 'cursor is not a task id from a previous page.')
        # The `<=` bound alone is what an index can range over; with only the OR below, SQLite
        # walked every record newer than the cursor (a deep page at 1M records: 170 ms).
        query = query.where(TaskRecord.enqueued_at <= anchor.enqueued_at,
                            (TaskRecord.enqueued_at < anchor.enqueued_at) | (TaskRecord.id < anchor.id))
    rows = list(query.order_by(TaskRecord.enqueued_at.desc(), TaskRecord.id.desc()).limit(PAGE_SIZE + 1))
    return rows[:PAGE_SIZE], rows[PAGE_SIZE - 1].id if len(rows) > PAGE_SIZE else None


def tenant_names(viewer):
    if not viewer.operator:
        return {}  # a user sees no tenant's name
    return dict(Tenant.select(Tenant.id, Tenant.name).tuples())


def task_list_values(viewer):
    filters = Filters(bottle.request.query, viewer)
    rows, next_cursor = history_page(viewer, filters)
    accounts = dict(EmailClient.select(EmailClient.id, EmailClient.email)
                    .where(EmailClient.id.in_(account_ids(rows))).tuples()) if account_ids(rows) else {}
    return {'viewer': viewer, 'rows': rows, 'filters': filters, 'next_cursor': next_cursor,
            'tenants': tenant_names(viewer), 'accounts': accounts, 'names': sorted(tasks.huey.service_tasks),
            'states': ledger.TASK_STATES, 'now': models.utcnow()}


def account_ids(rows):
    return {r.args.get('email_client_id') for r in rows if isinstance(r.args.get('email_client_id'), int)}


@page('/tasks')
def task_list(viewer):
    lookup = bottle.request.query.get('id', '').strip()
    if lookup:
        return to_dashboard('/tasks/' + urllib.parse.quote(lookup, safe=''))
    return render('tasks', title='Tasks', **task_list_values(viewer))


@page('/fragment/tasks')
def task_list_fragment(viewer):
    return render('tasks_live', **task_list_values(viewer))


def visible_task(viewer, task_id):
    """The viewer's record, or 404 (another tenant's or user's task is not found, as in the API)."""
    row = viewer.tasks().where(TaskRecord.id == task_id).first()
    if row is None:
        raise bottle.HTTPError(404, f'No task {task_id}.')
    return row


def detail_values(viewer, task_id):
    row = visible_task(viewer, task_id)
    client_id = row.args.get('email_client_id')
    account = EmailClient.find(id=client_id) if isinstance(client_id, int) else None
    tenant = Tenant.get_or_none(Tenant.id == row.tenant_id) if viewer.operator and row.tenant_id else None
    return {'viewer': viewer, 'row': row, 'history': ledger.history_of(row), 'args': ledger.redact(row.args),
            'account': account, 'tenant': tenant, 'now': models.utcnow(),
            'stoppable': row.state == ledger.RUNNING and row.name in ledger.STOPPABLE,
            'notice': bottle.request.query.get('notice', '')[:300]}


@page('/tasks/<task_id>')
def task_detail(viewer, task_id):
    return render('task', title=f'Task {task_id}', **detail_values(viewer, task_id))


@page('/fragment/tasks/<task_id>')
def task_detail_fragment(viewer, task_id):
    return render('task_live', **detail_values(viewer, task_id))


# ================================================================ actions

def act(viewer, task_id, action, done):
    """Run a ledger action on the viewer's task; back to its page with what happened, or why not."""
    row = visible_task(viewer, task_id)
    try:
        action(row)
    except ledger.LedgerConflict as exc:
        return back_to(row.id, str(exc))
    return back_to(row.id, done)


def back_to(task_id, notice):
    return to_dashboard(f'/tasks/{urllib.parse.quote(task_id, safe="")}?' + urllib.parse.urlencode({'notice': notice}))


@page('/tasks/<task_id>/revoke', method='POST')
def revoke(viewer, task_id):
    return act(viewer, task_id, lambda row: ledger.revoke(tasks.huey, row.id, by=viewer.label()), 'Revoked.')


@page('/tasks/<task_id>/stop', method='POST')
def stop(viewer, task_id):
    def request_stop(row):
        outbox = models.Outbox.find(task_id=row.id) if row.name == 'send_email' else None
        ledger.stop(row.id, by=viewer.label(), outbox_state=outbox.state if outbox else None)
    return act(viewer, task_id, request_stop, 'Stop requested: it stops at its next safe point.')


@page('/tasks/<task_id>/retry', method='POST')
def retry(viewer, task_id):
    return act(viewer, task_id, lambda row: ledger.requeue(tasks.huey, row, by=viewer.label()), 'Queued again.')


@page('/tasks/<task_id>/purge', method='POST')
def purge(viewer, task_id):
    row = visible_task(viewer, task_id)
    if row.state not in ledger.FINAL_STATES or not ledger.purge(row.id):
        return back_to(row.id, f'Task {row.id} is {row.state}; only finished tasks can be purged.')
    return to_dashboard('/tasks?' + urllib.parse.urlencode({'notice': f'Task {row.id} purged.'}))


@page('/dead/purge', method='POST', operator_only=True)
def purge_dead(viewer):
    count = ledger.purge(all_dead=True)
    return to_dashboard('/tasks?' + urllib.parse.urlencode({'state': 'dead', 'notice': f'{count} dead purged.'}))
