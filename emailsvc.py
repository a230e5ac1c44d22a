"""emailsvc: the HTTP API (Bottle, served by waitress) and the command line.

A request never talks to a mail server: it checks input, records intent and
enqueues a task. Sections: errors, requests and auth, accounts, tasks,
health, command line.
"""
import argparse
import contextlib
import datetime
import functools
import hashlib
import ipaddress
import json
import logging
import os
import re
import signal
import sqlite3
import sys
import threading
import time
import traceback
import urllib.parse
import uuid

import bottle
import peewee as pw
import prometheus_client
import redis

import contract
import dashboard
import models
import tasks
from mailkit import logs, webhooks
from mailkit import settings as settings_mod
from mailkit.credentials import key_list
from models import ApiKey, ConsumerHeartbeat, EmailClient, TaskRecord, Tenant, User
from taskq import ledger, metrics
from taskq.workers import consumer_of

SETTINGS = tasks.SETTINGS
logger = logging.getLogger('emailsvc.web')
bottle.BaseRequest.MEMFILE_MAX = SETTINGS['server.max_body_kb'] * 1024

# Errors a dependency outage raises: the client gets 503 and may retry.
# The embedded queue's own SQLite errors (Huey's storage, not peewee) are sqlite3's: a consumer stopped
# inside a write of the queue file holds its lock until it resumes.
UNAVAILABLE = (pw.OperationalError, pw.InterfaceError, sqlite3.OperationalError, redis.ConnectionError,
               redis.TimeoutError)


# ================================================================ errors

class ApiError(bottle.HTTPError):
    """An error the client can act on: a status, a stable code and a message."""

    def __init__(self, status, code, message, **extra):
        super().__init__(status, message)
        self.code = code
        self.extra = extra


class Api(bottle.Bottle):
    def default_error_handler(self, err):
        bottle.response.content_type = 'application/json'   # return a str; Bottle iterates a dict
        if isinstance(err, ApiError):
            return json.dumps({'error': err.code, 'message': err.body, **err.extra})
        if err.status_code < 500:                           # Bottle's own 404, 405, 413, bad JSON
            return json.dumps({'error': f'http_{err.status_code}', 'message': err.body})
        if isinstance(err.exception, UNAVAILABLE):
            bottle.response.status = 503
            logger.warning('dependency unavailable: %s', type(err.exception).__name__)
            return json.dumps({'error': 'unavailable',
                               'message': 'A backing service (database or queue) is unavailable; retry shortly.'})
        ref = log_unexpected(err)
        return json.dumps({'error': 'internal', 'message': f'Internal error, reference {ref}.'})


def log_unexpected(err):
    ref = uuid.uuid4().hex[:12]
    exc = err.exception
    tb = ''.join(traceback.format_exception(type(exc), exc, exc.__traceback__)) if exc else err.traceback
    logger.error('unexpected error %s on %s %s', ref, bottle.request.method, bottle.request.path,
                 extra={'ref': ref, 'trace': tb})
    return ref


app = Api()
app.mount('/dashboard', dashboard.app)  # the operator's HTML pages: a Bottle app of their own


def not_found(kind, ident):
    return ApiError(404, 'not_found', f'no {kind} {ident}')


# ================================================================ requests and auth

REQUEST_ID = re.compile(r'^[A-Za-z0-9._-]{1,64}$')


def header(name, default=None):
    """A request header as text. Bottle decodes header bytes as UTF-8 and raises on anything else
    (a 500, before any key is checked); here such bytes become U+FFFD, which no key, request id,
    Idempotency-Key or file name takes for a valid one."""
    value = bottle.request.environ.get('HTTP_' + name.upper().replace('-', '_'))
    return default if value is None else value.encode('latin-1').decode('utf-8', 'replace')


@app.hook('before_request')
def start_request():
    given = header('X-Request-ID', '')
    logs.request_id.set(given if REQUEST_ID.match(given) else logs.new_request_id())


@app.hook('after_request')
def end_request():
    bottle.response.set_header('X-Request-ID', logs.request_id.get() or '')
    if not models.database.is_closed():
        models.database.close()  # back to the pool


class Caller:
    def __init__(self, key_row):
        self.tenant_id = key_row.tenant_id
        self.user_id = key_row.user_id
        self.operator = key_row.is_operator


def authenticate():
    scheme, _, key = header('Authorization', '').partition(' ')
    if scheme.lower() != 'bearer' or not key.strip():
        raise ApiError(401, 'unauthorized', 'Send "Authorization: Bearer <api key>"; create a key with '
                                            './run.sh admin create-key.')
    with models.all_tenants():
        row = ApiKey.lookup(key.strip())
    if row is None:
        raise ApiError(401, 'unauthorized', 'The API key is unknown or revoked.')
    return Caller(row)


def api(method, path, operator_only=False, user_only=False, body=None, query=None, answers=None, errors=None,
        headers=None, request=None):
    """Route decorator: authenticate, refuse the wrong kind of key, validate the query string and the
    JSON body against their contract models, then run the handler inside the caller's tenant scope.

    `user_only`: the route acts for the user who owns the accounts and mail (create, send, delete,
    report, upload); an operator key is refused. `body` and `query` are contract models: the handler
    receives the validated instances as `body=` and `query=`. `answers` ({status: model}) and
    `errors` ({status: 'code: when'}, beyond the ones every route of its kind has) go into the OpenAPI
    document, as do `headers` and a non-JSON `request` body; see contract.py."""
    def decorate(handler):
        auth = 'operator' if operator_only else 'user' if user_only else 'any'
        describe(method, path, handler, auth, body=body, query=query, answers=answers, errors=errors,
                 headers=headers, request=request)

        def scoped(**kwargs):
            caller = authenticate()
            for name, value in kwargs.items():   # Bottle's <id:int> takes any length; the database does not
                if not (0 < value <= MAX_ID if isinstance(value, int) else printable_id(value)):
                    raise not_found(PATH_IDS.get(name, name), value)
            if operator_only and not caller.operator:
                raise ApiError(403, 'forbidden', 'This needs an operator key.')
            if user_only and caller.operator:
                raise ApiError(403, 'forbidden', 'This acts for the user who owns the account; use that user\'s '
                                                 'key, not an operator key.')
            if query is not None:
                kwargs['query'] = query_of(query)
            if body is not None:
                kwargs['body'] = valid(body, json_body())
            bottle.request.caller = caller
            scope = models.all_tenants() if caller.operator else models.tenant_scope(caller.tenant_id)
            with scope:
                return handler(**kwargs)
        app.route(path, method)(scoped)
        return handler
    return decorate


def describe(method, path, handler, auth, **parts):
    """Put a route into the contract's table (the OpenAPI document is built from it)."""
    contract.ROUTES.append(contract.Route(method, path, handler.__name__, handler.__doc__ or '', auth,
                                          **{k: v for k, v in parts.items() if v is not None}))


def public(method, path, answers, errors=None, auth='none'):
    """A route outside the key scheme (health, metrics, the contract itself), in the document too."""
    def decorate(handler):
        describe(method, path, handler, auth, answers=answers, errors=errors)
        app.route(path, method)(handler)
        return handler
    return decorate


def printable_id(value):
    """A text id from the path (a task id): 1 to 64 printable characters; PostgreSQL refuses NUL."""
    return 0 < len(value) <= 64 and value.isprintable()


def valid(model, data, prefix=()):
    """`data` as a `model` instance, or 422 validation_failed naming every wrong field."""
    value, fields = contract.validate(model, data, prefix)
    if fields:
        raise invalid(fields)
    return value


def invalid(fields, code='validation_failed'):
    """The 422 of a bad body or query: the first problem in the message, all of them in `fields`."""
    first, problem = next(iter(fields.items()))
    return ApiError(422, code, f'{first}: {problem}', fields=fields)


def query_of(model):
    """The query string as a `model` instance; 422 invalid_filter otherwise (an empty value is a value:
    `?limit=` is no number). Bottle hands over query text decoded as latin-1: here it becomes UTF-8 (bad
    bytes as U+FFFD)."""
    params = {fix_text(key): fix_text(value) for key, value in bottle.request.query.items()}
    value, fields = contract.validate(model, params)
    if fields:
        raise invalid(fields, 'invalid_filter')
    return value


def fix_text(text):
    return text.encode('latin-1', 'replace').decode('utf-8', 'replace')


MAX_ID = contract.MAX_ID
PATH_IDS = {'client_id': 'account', 'message_id': 'message', 'attachment_id': 'attachment',
            'webhook_id': 'webhook', 'delivery_id': 'delivery'}


def caller():
    return bottle.request.caller


def own(query, model):
    """Narrow to the calling user's rows (operators see every user's)."""
    return query if caller().operator else query.where(model.user_id == caller().user_id)


def one(model, ident, kind):
    """The caller's row of `model` by id; 404 for anyone else's (also another tenant's)."""
    row = model.find(id=ident, **({} if caller().operator else {'user_id': caller().user_id}))
    if row is None:
        raise not_found(kind, ident)
    return row


def read_capped(stream, limit, message):
    """Read `stream` (a request body or an uploaded file), refusing with 413 past `limit` bytes,
    by Content-Length before reading when it says so, or by what arrives."""
    if (bottle.request.content_length or 0) > limit:
        raise ApiError(413, 'too_large', message)
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, 'too_large', message)
    return data


def json_body():
    """The request's JSON object; 413 if too large, 400 if not JSON, 422 if not an object."""
    limit = bottle.BaseRequest.MEMFILE_MAX
    raw = read_capped(bottle.request.body, limit, f'The request body is over {limit // 1024} KB.')
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, 'invalid_json', 'The request body is not valid JSON.') from None
    except RecursionError:   # json.loads recurses once per nesting level
        raise ApiError(400, 'invalid_json', 'The request body nests too deeply to be read.') from None
    if not isinstance(body, dict):
        raise ApiError(422, 'invalid_body', 'The request body must be a JSON object.')
    return body


def accepted(task_id, status=ledger.PENDING):
    """202: the task is on record and queued (or, for a repeated request, was earlier)."""
    bottle.response.status = 202
    return {'task_id': task_id, 'status': status}


# ================================================================ accounts

# Changing any of these sends the stored password somewhere else: the request must give it again.
REACHING = ('protocol', 'host', 'port', 'security', 'username')


def account_changes(body, client):
    """The clean values of a PATCH: each server's given fields merged over the stored ones."""
    clean = body.model_dump(exclude_unset=True, exclude={'incoming', 'smtp'})
    fields = {}
    if 'incoming' in body.model_fields_set:
        clean['incoming'] = merged_server('incoming', body.incoming, incoming_of(client), contract.IncomingServer,
                                          fields)
    if 'smtp' in body.model_fields_set:
        clean['smtp'] = body.smtp and merged_server('smtp', body.smtp, smtp_of(client), contract.SmtpServer, fields)
    if fields:
        raise invalid(fields)
    return clean


def merged_server(prefix, change, current, full, fields):
    """A server's fields after a PATCH; a server added now is checked whole, as on create."""
    given = change.model_dump(exclude_unset=True)
    if not current:
        server, problems = contract.validate(full, given, (prefix,))
        fields.update(problems)
        return server and server.model_dump()
    if 'password' not in given and any(given.get(key) not in (None, current.get(key)) for key in REACHING):
        # Else a stolen key could point the account at its own server and collect the stored password.
        fields[f'{prefix}.password'] = 'give the password again when changing the host, port, security or username'
    return dict(current, **given)


def check_sync_since(clean, client):
    """POP3 cannot search by date (RFC 1939 has no SEARCH; only reading each message's headers with TOP
    would tell, on every sync): sync_since is refused for POP3 accounts rather than silently ignored."""
    protocol = (clean.get('incoming') or {}).get('protocol') or (client.incoming_protocol if client else None)
    since = clean['sync_since'] if 'sync_since' in clean else (client.sync_since if client else None)
    if protocol == 'pop3' and since is not None:
        raise ApiError(422, 'not_supported', 'sync_since works with IMAP accounts only: POP3 cannot search '
                                             'by date. Leave it out (or null) for a POP3 account.',
                       fields={'sync_since': 'is not supported with POP3'})


def incoming_of(client):
    return {'protocol': client.incoming_protocol, 'host': client.incoming_host, 'port': client.incoming_port,
            'security': client.incoming_security, 'username': client.incoming_username}


def smtp_of(client):
    if not client.smtp_host:
        return None
    return {'host': client.smtp_host, 'port': client.smtp_port, 'security': client.smtp_security,
            'username': client.smtp_username}


def account_dict(client, kinds_with_password, push_state=None):
    incoming = dict(incoming_of(client), has_password='incoming' in kinds_with_password)
    smtp = smtp_of(client)
    if smtp:
        smtp['has_password'] = 'smtp' in kinds_with_password
    return {
        'id': client.id, 'email': client.email, 'user_id': client.user_id,
        'incoming': incoming, 'smtp': smtp,
        'sync_enabled': client.sync_enabled, 'sync_interval': client.sync_interval,
        'copy_sent': client.copy_sent, 'move_spam': client.move_spam,
        'sync_since': client.sync_since.isoformat() if client.sync_since else None,
        # push: IMAP IDLE by a watcher where the server offers it; push_state: how that goes (null: not watched)
        'push': client.push, 'push_state': push_state,
        'sync_state': client.sync_state, 'last_sync_at': models.iso(client.last_sync_at),
        'last_error': client.last_error, 'last_error_code': error_code(client.last_error),
        'sync_task_id': client.sync_task_id,
        # When periodic sync tries next: null while sync is off, or after a rejected login until a PATCH.
        'next_sync_at': models.iso(client.next_sync_at) if client.sync_enabled else None,
        'consecutive_failures': client.failures,
        'created_at': models.iso(client.created_at), 'updated_at': models.iso(client.updated_at),
    }


def one_account_dict(client):
    """account_dict of one account, with what the other tables say of it."""
    return account_dict(client, password_kinds([client.id]).get(client.id, set()),
                        push_states([client.id]).get(client.id))


def push_states(client_ids):
    """{client id: the watcher's word on it}, in one query: connecting, idling, backoff, auth_error,
    unsupported; an account no watcher holds is absent (null: not watched)."""
    lease = models.WatchLease
    return dict(lease.select(lease.client, lease.state).where(lease.client.in_(client_ids)).tuples())


def error_code(last_error):
    """The stable code tasks.error_text puts first ('tls_on_plain_port: ...'), or None."""
    match = ERROR_CODE.match(last_error or '')
    return match.group(1) if match else None


ERROR_CODE = re.compile(r'([a-z][a-z_]{1,40}): ')


def password_kinds(client_ids):
    """{client id: {'incoming', 'smtp'}}: which passwords are stored, in one query."""
    kinds = {}
    rows = models.Credential.select(models.Credential.client, models.Credential.kind) \
        .where(models.Credential.client.in_(client_ids))
    for row in rows:
        kinds.setdefault(row.client_id, set()).add(row.kind)
    return kinds


def apply_account(client, clean):
    """Copy validated values onto the row; returns {kind: password} to store."""
    passwords = {}
    if 'email' in clean:
        client.email = clean['email']
    if clean.get('incoming'):
        incoming = clean['incoming']
        for key in ('protocol', 'host', 'port', 'security', 'username'):
            setattr(client, f'incoming_{key}', incoming[key])
        if incoming.get('password'):
            passwords['incoming'] = incoming['password']
    if 'smtp' in clean:
        smtp = clean['smtp'] or {}
        for key in ('host', 'port', 'security', 'username'):
            setattr(client, f'smtp_{key}', smtp.get(key))
        if smtp.get('password'):
            passwords['smtp'] = smtp['password']
    for key in ('sync_enabled', 'sync_interval', 'copy_sent', 'move_spam', 'sync_since', 'push'):
        if key in clean:
            setattr(client, key, clean[key])
    return passwords


def store_passwords(client, passwords, dropped_smtp):
    for kind, password in passwords.items():
        models.Credential.store(client, kind, password)
    if dropped_smtp:
        models.Credential.forget(client, 'smtp')


@api('POST', '/api/v1/accounts', user_only=True, body=contract.AccountCreate, answers={201: contract.Account},
     errors={409: 'account_limit: the user has accounts.max_per_user accounts'})
def create_account(body):
    """Add a mail account; its first sync starts at once when sync is enabled."""
    clean = body.model_dump(exclude_unset=True)
    check_sync_since(clean, None)
    limit = SETTINGS['accounts.max_per_user']
    if EmailClient.select().where(EmailClient.user_id == caller().user_id).count() >= limit:
        raise ApiError(409, 'account_limit', f'This user has {limit} accounts, the most allowed '
                                             '(accounts.max_per_user); delete one first.')
    with models.database.atomic():
        client = EmailClient(user_id=caller().user_id)
        passwords = apply_account(client, clean)
        client.save()
        store_passwords(client, passwords, dropped_smtp=False)
    if client.sync_enabled:   # the first sync starts at once: the user wants to see mail, not wait for a period
        start_sync_now(client)
    bottle.response.status = 201
    return account_dict(client, set(passwords))   # no watcher has heard of it yet


def start_sync_now(client):
    """Queue a sync now (or find the one queued or running); the account resource names it."""
    client.sync_task_id, _, _ = tasks.queue_sync(client, client.user_id)


@api('GET', '/api/v1/accounts', answers={200: contract.Accounts})
def list_accounts():
    """The caller's accounts (an operator sees every tenant's, without secrets)."""
    rows = list(own(EmailClient.select(), EmailClient).order_by(EmailClient.id))
    kinds, states = password_kinds([row.id for row in rows]), push_states([row.id for row in rows])
    return {'items': [account_dict(row, kinds.get(row.id, set()), states.get(row.id)) for row in rows]}


@api('GET', '/api/v1/accounts/<client_id:int>', answers={200: contract.Account})
def get_account(client_id):
    """One account: settings, sync state, never a password."""
    client = one(EmailClient, client_id, 'account')
    return one_account_dict(client)


@api('PATCH', '/api/v1/accounts/<client_id:int>', user_only=True, body=contract.AccountUpdate,
     answers={200: contract.Account})
def update_account(client_id, body):
    """Change an account: the fields given replace the stored ones.

    Changing a server's protocol, host, port, security or username needs its password in the same
    request (422 otherwise); a new server or password starts a sync at once."""
    client = one(EmailClient, client_id, 'account')
    clean = account_changes(body, client)
    check_sync_since(clean, client)
    before_since = client.sync_since
    with models.database.atomic():
        passwords = apply_account(client, clean)
        reaching_changed = bool(passwords) or 'incoming' in clean or 'smtp' in clean
        if reaching_changed:   # new servers or passwords: whatever failed before deserves a try now
            client.failures, client.next_sync_at = 0, models.utcnow()
        client.updated_at = models.utcnow()
        client.save()
        store_passwords(client, passwords, dropped_smtp='smtp' in clean and clean['smtp'] is None)
    # An earlier sync_since (or none) asks for older mail: the sync compares it with what folders hold.
    if (reaching_changed or models.sync_since_moved_back(before_since, client.sync_since)) and client.sync_enabled:
        start_sync_now(client)
    return one_account_dict(client)


@api('DELETE', '/api/v1/accounts/<client_id:int>', user_only=True, answers={204: None})
def delete_account(client_id):
    """Delete an account with its passwords, folders and mail; the feed says account.deleted (and its
    commit wakes the owner's webhooks)."""
    client = one(EmailClient, client_id, 'account')
    with models.database.atomic():
        models.Credential.forget(client)
        client.delete_instance()
    bottle.response.status = 204
    return ''


# ================================================================ sync, folders and messages

@api('POST', '/api/v1/accounts/<client_id:int>/sync', user_only=True, body=contract.SyncBody,
     answers={202: contract.Accepted})
def start_sync(client_id, body):
    """Sync now (one folder, or all); while a sync is queued or running, its task is the answer."""
    client = one(EmailClient, client_id, 'account')
    folder_id, force = body.folder_id, body.force_full_sync
    if folder_id is not None and not models.EmailFolder.get_or_none(
            models.EmailFolder.id == folder_id, models.EmailFolder.client == client.id):
        raise not_found('folder', folder_id)
    task_id, state, _ = tasks.queue_sync(client, client.user_id, folder_id, force)
    return accepted(task_id, state)


def own_clients():
    """The ids of the accounts the caller may read, as a subquery."""
    return own(EmailClient.select(EmailClient.id), EmailClient)


@api('GET', '/api/v1/accounts/<client_id:int>/folders', answers={200: contract.Folders})
def list_folders(client_id):
    """An account's folders with their message and unread counts."""
    client = one(EmailClient, client_id, 'account')
    Message = models.EmailMessage
    counts = {folder_id: (total, unread or 0) for folder_id, total, unread in Message.select(
        Message.folder, pw.fn.COUNT(Message.id), pw.fn.SUM(pw.Case(None, [(Message.is_read == False, 1)], 0)))  # noqa: E712
        .where(Message.client == client.id, Message.is_deleted == False)  # noqa: E712
        .group_by(Message.folder).tuples()}
    folders = models.EmailFolder.select().where(models.EmailFolder.client == client.id).order_by(models.EmailFolder.name)
    return {'items': [{'id': f.id, 'name': f.name, 'role': f.role, 'total': counts.get(f.id, (0, 0))[0],
                       'unread': counts.get(f.id, (0, 0))[1]} for f in folders]}


def message_summary(m):
    return {'id': m.id, 'account_id': m.client_id, 'folder_id': m.folder_id, 'uid': m.uid,
            'subject': m.subject, 'from': {'name': m.from_name, 'address': m.from_addr},
            'to': addresses(m.to_addrs), 'date': models.iso(m.date), 'flags': m.flags.split(),
            'is_read': m.is_read, 'is_flagged': m.is_flagged, 'size': m.size, 'snippet': m.snippet,
            'message_id': m.message_id,
            'spam': None if m.is_spam is None else {
                'is_spam': m.is_spam, 'score': m.spam_score,
                'indicators': m.spam_indicators or []}}


def addresses(pairs):
    return [{'name': name, 'address': address} for name, address in pairs]


@api('GET', '/api/v1/messages', user_only=True, query=contract.MessageQuery, answers={200: contract.Messages})
def list_messages(query):
    """The caller's messages, newest first (by id); `cursor` is the last id of the previous page."""
    Message = models.EmailMessage
    params = query
    query = Message.select().where(Message.client.in_(own_clients()), Message.is_deleted == False)  # noqa: E712
    for value, field in ((params.account_id, Message.client), (params.folder_id, Message.folder)):
        if value:
            query = query.where(field == value)
    if params.unread is not None:
        query = query.where(Message.is_read == (not params.unread))
    if params.flagged is not None:
        query = query.where(Message.is_flagged == params.flagged)
    if params.from_:
        query = query.where(Message.from_addr.contains(params.from_) | Message.from_name.contains(params.from_))
    if params.q:
        query = query.where(Message.subject.contains(params.q) | Message.from_addr.contains(params.q) |
                            Message.from_name.contains(params.q))
    if params.since:
        query = query.where(Message.date >= params.since)
    if params.until:
        query = query.where(Message.date < params.until)
    if params.cursor:
        query = query.where(Message.id < params.cursor)
    limit = params.limit
    rows = list(query.order_by(Message.id.desc()).limit(limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    return {'items': [message_summary(m) for m in rows], 'next_cursor': str(rows[-1].id) if more else None}


@api('POST', '/api/v1/messages/delete', user_only=True, body=contract.DeleteBody,
     answers={202: contract.Accepted}, errors={404: 'not_found: some ids are not the caller\'s messages '
                                                    '(`missing_ids`); nothing is deleted'})
def delete_messages(body):
    """Delete messages (to Trash, or for good with `permanent`), on the server too."""
    ids, permanent = sorted(set(body.email_ids)), body.permanent
    Message = models.EmailMessage
    found = {m.id for m in Message.select(Message.id).where(Message.id.in_(ids), Message.client.in_(own_clients()))}
    missing = [i for i in ids if i not in found]
    if missing:  # the whole batch is refused: nothing is deleted
        raise ApiError(404, 'not_found', f'no message {", ".join(map(str, missing[:20]))}'
                                         f'{" ..." if len(missing) > 20 else ""}', missing_ids=missing[:100])
    return accepted(tasks.delete_emails(ids, caller().tenant_id, caller().user_id, permanent=permanent).id)


def one_message(message_id):
    Message = models.EmailMessage
    message = Message.select().where(Message.id == message_id, Message.client.in_(own_clients())).first()
    if message is None:
        raise not_found('message', message_id)
    return message


@api('GET', '/api/v1/messages/<message_id:int>', user_only=True, answers={200: contract.Message})
def get_message(message_id):
    """One message: headers, text and HTML bodies, attachments."""
    m = one_message(message_id)
    body = message_summary(m)
    body.update(cc=addresses(m.cc_addrs), reply_to=addresses(m.reply_to), in_reply_to=m.in_reply_to,
                references=m.references, headers=[list(h) for h in m.headers],
                text=m.text, html=m.html, parse_error=m.parse_error,
                attachments=[{'id': a.id, 'filename': a.filename, 'content_type': a.content_type,
                              'size': a.size, 'content_id': a.content_id, 'disposition': a.disposition}
                             for a in m.attachments.order_by(models.Attachment.id)])
    return body


@api('POST', '/api/v1/messages/<message_id:int>/spam-check', user_only=True, answers={202: contract.Accepted})
def spam_check(message_id):
    """Score a message for spam (a task; its result holds the verdict)."""
    message = one_message(message_id)
    return accepted(tasks.check_spam(message.id, caller().tenant_id, caller().user_id).id)


@api('POST', '/api/v1/messages/<message_id:int>/report', user_only=True, body=contract.ReportBody,
     answers={202: contract.Accepted})
def report_message(message_id, body):
    """The user says spam or ham: the tenant's model learns it; on IMAP the message moves."""
    message = one_message(message_id)
    verdict = body.verdict
    tasks.learn_report(message, verdict)
    return accepted(tasks.file_report(message.id, caller().tenant_id, caller().user_id, verdict).id)


@api('GET', '/api/v1/messages/<message_id:int>/raw', user_only=True,
     answers={200: ('message/rfc822', contract.BINARY)})
def get_raw_message(message_id):
    """The message as received (RFC 5322 bytes), as a sandboxed download."""
    message = one_message(message_id)
    return download(models.Blob.content(message.blob), 'message/rfc822', f'message-{message.id}.eml')


@api('GET', '/api/v1/messages/<message_id:int>/attachments/<attachment_id:int>', user_only=True,
     answers={200: ('*/*', contract.BINARY)})
def get_attachment(message_id, attachment_id):
    """An attachment's bytes, with its own content type, as a sandboxed download."""
    message = one_message(message_id)
    attachment = models.Attachment.get_or_none(models.Attachment.id == attachment_id,
                                               models.Attachment.message == message.id)
    if attachment is None:
        raise not_found('attachment', attachment_id)
    return download(models.Blob.content(attachment.blob), attachment.content_type,
                    attachment.filename or f'attachment-{attachment.id}')


SAFE_TYPE = re.compile(r'^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$')


def download(data, content_type, filename):
    """Bytes as a download: a sane content type and a file name that cannot escape or inject."""
    bottle.response.content_type = content_type if SAFE_TYPE.match(content_type or '') else 'application/octet-stream'
    bottle.response.set_header('Content-Disposition', content_disposition(filename))
    bottle.response.set_header('X-Content-Type-Options', 'nosniff')
    # Mail is written by strangers: an HTML or SVG part opened in the browser must not run as our origin.
    bottle.response.set_header('Content-Security-Policy', 'sandbox')
    return data


def content_disposition(filename):
    # Names come from senders: keep the last path segment, drop control and
    # quote characters, and give non-ASCII names as RFC 5987 filename*.
    name = re.split(r'[\\/]', filename)[-1]
    name = ''.join(ch for ch in name if ch.isprintable() and ch not in '"\\;').strip(' .') or 'download'
    fallback = name.encode('ascii', 'replace').decode().replace('?', '_')
    return f'attachment; filename="{fallback}"; filename*=UTF-8\'\'{urllib.parse.quote(name, safe="")}'


# ================================================================ sending

UPLOAD_REQUEST = {
    'multipart/form-data': {'schema': {'type': 'object', 'properties': {'file': contract.BINARY}, 'required': ['file']}},
    'application/octet-stream': {'schema': contract.BINARY},
}


@api('POST', '/api/v1/attachments', user_only=True, query=contract.UploadQuery, request=UPLOAD_REQUEST,
     answers={201: contract.Upload},
     headers={'X-Filename': ({'type': 'string'}, 'the file name, with a raw body (instead of ?filename=); '
                                                 'kept to its last path segment and 255 characters')},
     errors={400: 'invalid_multipart: the multipart body cannot be read', 413: 'upload_quota_exceeded: the '
             'user\'s uploads would pass mail.upload_quota_mb', 422: 'validation_failed: file, filename or '
             'content_type is missing or wrong'})
def upload_attachment(query):
    """Upload a file for sending: multipart form field `file`, or the raw body with ?filename=."""
    filename, content_type, data = uploaded_file(SETTINGS['mail.max_attachment_mb'] * 1024 * 1024,
                                                 f'Attachments may be at most {SETTINGS["mail.max_attachment_mb"]} MB.',
                                                 query.filename)
    quota = SETTINGS['mail.upload_quota_mb'] * 1024 * 1024
    held = models.Upload.select(pw.fn.COALESCE(pw.fn.SUM(models.Upload.size), 0)) \
        .where(models.Upload.user_id == caller().user_id).scalar()
    if held + len(data) > quota:
        raise ApiError(413, 'upload_quota_exceeded', f'Uploads of this user would exceed '
                       f'{SETTINGS["mail.upload_quota_mb"]} MB (mail.upload_quota_mb); unused uploads expire after '
                       f'{SETTINGS["mail.upload_ttl_hours"]} hours.')
    blob_id = models.store_blobs([data])[0]
    upload = models.Upload.create(user_id=caller().user_id, filename=filename, content_type=content_type,
                                  size=len(data), blob=blob_id)
    bottle.response.status = 201
    return {'id': upload.id, 'filename': filename, 'content_type': content_type, 'size': len(data)}


def uploaded_file(limit, too_large, filename):
    ctype = (bottle.request.content_type or '').split(';')[0].strip().lower()
    if ctype == 'multipart/form-data':
        try:
            upload = bottle.request.files.get('file')
        except (bottle.MultipartError, ValueError) as exc:
            raise ApiError(400, 'invalid_multipart', f'The multipart body cannot be read: {exc}') from None
        if upload is None:
            raise ApiError(422, 'validation_failed', 'file: is required', fields={'file': 'is required'})
        return clean_filename(upload.raw_filename), attachment_type(upload.content_type), \
            read_capped(upload.file, limit, too_large)
    filename = filename or header('X-Filename')
    if not filename:
        raise ApiError(422, 'validation_failed', 'filename: give ?filename= with a raw body',
                       fields={'filename': 'is required with a raw body'})
    # urllib and curl label a bare body as a form; it is not one.
    given = '' if ctype == 'application/x-www-form-urlencoded' else bottle.request.content_type
    return clean_filename(filename), attachment_type(given), read_capped(bottle.request.body, limit, too_large)


# RFC 2045 5.1: type "/" subtype *(";" parameter), tokens or quoted strings, nothing else (no CR, LF or NUL).
TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,127}"
TYPE_TOKEN = r'[A-Za-z0-9!#$&^_.+-]{1,127}'   # mailkit.smtp's, so a stored type always attaches
MEDIA_TYPE = re.compile(rf'^({TYPE_TOKEN})/({TYPE_TOKEN})(?:[ \t]*;[ \t]*{TOKEN}=(?:{TOKEN}|"[\x20\x21\x23-\x5b\x5d-\x7e]{{0,255}}"))*'
                        rf'[ \t]*\Z')


def attachment_type(given):
    """The bare type/subtype a send can attach (its parameters dropped); 422 for anything else."""
    if not given or not given.strip():
        return 'application/octet-stream'
    match = MEDIA_TYPE.match(given.strip()) if len(given) <= 1024 else None
    if match is None or match.group(1).lower() in ('multipart', 'message'):
        raise ApiError(422, 'validation_failed', 'content_type: must be type/subtype with optional parameters '
                       '(not multipart/* or message/*); application/octet-stream fits any file',
                       fields={'content_type': 'must be a media type like application/pdf'})
    return f'{match.group(1)}/{match.group(2)}'.lower()


def clean_filename(name):
    name = re.split(r'[\\/]', name or '')[-1]
    return ''.join(ch for ch in name if ch.isprintable()).strip()[:255] or 'attachment'


def send_fields(body):
    """The clean values of a send, in the form its Idempotency-Key fingerprint has always hashed."""
    clean = {name: [text.strip() for text in getattr(body, name) or []] for name in ('to', 'cc', 'bcc')}
    if not (clean['to'] or clean['cc'] or clean['bcc']):
        raise invalid({'to': 'give at least one recipient in to, cc or bcc'})
    clean.update(subject=body.subject, body_text=body.body_text, body_html=body.body_html,
                 attachment_ids=sorted(set(body.attachment_ids or [])))
    return clean


def check_attachments_and_size(clean):
    uploads = {u.id: u for u in models.Upload.select().where(models.Upload.id.in_(clean['attachment_ids']),
                                                             models.Upload.user_id == caller().user_id)
               } if clean['attachment_ids'] else {}
    unknown = [i for i in clean['attachment_ids'] if i not in uploads]
    if unknown:
        raise ApiError(422, 'unknown_attachments', f'no attachment {", ".join(map(str, unknown))}; upload files '
                       'with POST /api/v1/attachments first', fields={'attachment_ids': unknown})
    size = sum(u.size for u in uploads.values()) + sum(len((clean.get(k) or '').encode()) for k in
                                                       ('body_text', 'body_html'))
    if size > SETTINGS['mail.max_message_mb'] * 1024 * 1024:
        raise ApiError(422, 'validation_failed', f'the message would be over {SETTINGS["mail.max_message_mb"]} MB',
                       fields={'body_text': 'bodies and attachments together are too large'})


@api('POST', '/api/v1/accounts/<client_id:int>/send', user_only=True, body=contract.SendBody,
     answers={202: contract.Accepted},
     headers={'Idempotency-Key': ({'type': 'string', 'pattern': r'^[\x20-\x7e]{1,255}$'},
                                  'the same key again gets the first request\'s task, not a second message')},
     errors={409: 'idempotency_key_in_use: a request with this key is still being accepted',
             422: 'no_smtp: the account has no SMTP server; invalid_idempotency_key; idempotency_key_reused: '
                  'the key was used for another request; unknown_attachments'})
def send_message(client_id, body):
    """Send a message from an account (a task); attachments are uploaded first."""
    client = one(EmailClient, client_id, 'account')
    if not client.smtp_host:
        raise ApiError(422, 'no_smtp', f'account {client.id} has no SMTP server; add one with PATCH')
    key = header('Idempotency-Key')
    if key is not None and not IDEMPOTENCY_KEY.match(key):
        raise ApiError(422, 'invalid_idempotency_key', 'Idempotency-Key must be 1 to 255 printable ASCII '
                                                       'characters.')
    clean = send_fields(body)
    check_attachments_and_size(clean)
    fingerprint = request_hash(client, clean) if key else None
    if key and (earlier := tasks.earlier_send(caller().user_id, key)):
        return replay(earlier, fingerprint)
    try:
        return accepted(tasks.queue_send(client, caller().user_id, clean, key, fingerprint))
    except tasks.KeyInUse as taken:
        return replay(taken.outbox, fingerprint)


IDEMPOTENCY_KEY = re.compile(r'^[\x20-\x7e]{1,255}\Z')


def request_hash(client, clean):
    """What makes two sends the same request: the account and every field, in a canonical form."""
    canonical = json.dumps({'account': client.id, **clean}, sort_keys=True, separators=(',', ':'))
    return hashlib.sha256(canonical.encode()).hexdigest()


def replay(earlier, fingerprint):
    """Answer a send whose Idempotency-Key was used before (the IETF httpapi Idempotency-Key draft):
    the same request gets the first one's task; another body gets 422; a first request
    still being accepted gets 409."""
    if earlier is not None and earlier.request_hash not in (None, fingerprint):   # None: kept from before v6
        raise ApiError(422, 'idempotency_key_reused', 'This Idempotency-Key was used for a different request; '
                                                      'use a new key for a new message.')
    if earlier is None or earlier.state == 'accepting':
        raise ApiError(409, 'idempotency_key_in_use', 'A request with this Idempotency-Key is still being '
                                                      'accepted; retry in a moment.')
    record = TaskRecord.get_or_none(TaskRecord.id == earlier.task_id)
    return accepted(earlier.task_id, record.state if record else ledger.PENDING)


# ================================================================ tasks

@api('GET', '/api/v1/tasks', query=contract.TaskQuery, answers={200: contract.Tasks},
     errors={422: 'invalid_cursor: cursor is not a task id from a previous page'})
def list_tasks(query):
    """Tasks from the ledger, newest first; `cursor` is the last id of the previous page.

    A user key sees its user's tasks; an operator key every task. Dead letters: ?state=dead."""
    params = query
    query = own(TaskRecord.select(), TaskRecord)
    if params.state:
        query = query.where(TaskRecord.state == params.state)
    if params.name:
        query = query.where(TaskRecord.name == params.name)
    if params.since:
        query = query.where(TaskRecord.enqueued_at >= params.since)
    limit = params.limit
    if params.cursor:
        anchor = TaskRecord.get_or_none(TaskRecord.id == params.cursor)
        if anchor is None:
            raise ApiError(422, 'invalid_cursor', 'cursor is not a task id from a previous page.')
        query = query.where((TaskRecord.enqueued_at < anchor.enqueued_at) |
                            ((TaskRecord.enqueued_at == anchor.enqueued_at) & (TaskRecord.id < anchor.id)))
    rows = list(query.order_by(TaskRecord.enqueued_at.desc(), TaskRecord.id.desc()).limit(limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    return {'items': [row.to_dict() for row in rows], 'next_cursor': rows[-1].id if more else None}


@api('GET', '/api/v1/tasks/<task_id>', answers={200: contract.Task})
def get_task(task_id):
    """One task's ledger record: state, attempts, progress, result or error."""
    return one(TaskRecord, task_id, 'task').to_dict()


@api('DELETE', '/api/v1/tasks/<task_id>', answers={200: contract.Task, 204: None},
     errors={409: 'not_revocable: the task is running'})
def revoke_or_purge_task(task_id):
    """A waiting task is revoked (200); a finished one, a dead letter say, is purged from the ledger (204)."""
    record = one(TaskRecord, task_id, 'task')
    if record.state in ledger.FINAL_STATES and ledger.purge(record.id):
        bottle.response.status = 204
        return ''
    with conflict_as_409():
        ledger.revoke(tasks.huey, record.id)
    return TaskRecord.get_by_id(record.id).to_dict()


@api('POST', '/api/v1/tasks/<task_id>/retry', answers={202: contract.Accepted},
     errors={409: 'not_retryable: the task succeeded, or is waiting or running'})
def retry_task(task_id):
    """Run a failed, dead or revoked task again, on the same record."""
    record = one(TaskRecord, task_id, 'task')
    with conflict_as_409():
        ledger.requeue(tasks.huey, record)
    return accepted(record.id)


@contextlib.contextmanager
def conflict_as_409():
    try:
        yield
    except ledger.LedgerConflict as exc:
        raise ApiError(409, exc.code, str(exc)) from None


# ================================================================ change feed
#
# GET /api/v1/events pages the feed by event id. A user key reads its own
# accounts' events; an operator key reads the operational ones of every
# tenant (account.* and task.dead: which accounts fail, which tasks died),
# never mail activity (message.*, folder.*, send.*), as it reads no mail.
#
# wait=N long-polls. Events are written by the consumers, so this process
# learns of them by polling: one thread per web process reads the feed's
# highest id every events.poll_interval while anyone waits (one cheap query,
# whatever the number of waiters), and wakes the waiters when it grows. Each
# waiter holds a web thread; at most events.max_waiters do at once, and a
# request beyond that answers at once with what there is, so long-polls can
# never take every thread from the rest of the API.

OPERATOR_EVENT_TYPES = ('account.sync_failed', 'account.auth_error', 'account.recovered', 'account.deleted',
                        'task.dead')


class Doorbell:
    """Tells this process's long-polls when the change feed has grown past what they have seen."""

    def __init__(self, interval, capacity):
        self.interval, self.capacity = interval, capacity
        self.changed = threading.Condition()
        self.waiting = 0
        self.head = 0
        self.thread = None

    def enter(self):
        """Take a waiting place; False when all events.max_waiters are taken."""
        with self.changed:
            if self.waiting >= self.capacity:
                return False
            self.waiting += 1
            if self.thread is None:
                self.thread = threading.Thread(target=self._watch, name='events-doorbell', daemon=True)
                self.thread.start()
            self.changed.notify_all()
            return True

    def leave(self):
        with self.changed:
            self.waiting -= 1

    def wait_past(self, seen, timeout):
        """Wait until the feed's head passes `seen` or `timeout` passes; the head then."""
        with self.changed:
            self.changed.wait_for(lambda: self.head > seen, timeout)
            return self.head

    def _watch(self):
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.waiting > 0)
            try:
                with models.database.connection_context():
                    head = models.last_event_id()
            except UNAVAILABLE:   # the waiters time out and answer; the next poll tries again
                head = self.head
            with self.changed:
                if head > self.head:
                    self.head = head
                    self.changed.notify_all()
            time.sleep(self.interval)


DOORBELL = Doorbell(SETTINGS['events.poll_interval'], SETTINGS['events.max_waiters'])


def event_cursor(raw, name):
    """The event id a query parameter names ('evt_...'), 'now' for the newest, or None when absent."""
    if raw is None or raw == '':
        return None
    if raw == 'now':
        return models.last_event_id()
    number = models.event_id_number(raw)
    if number is None:
        raise ApiError(422, 'invalid_cursor', f'{name} must be an event id or next_cursor from an earlier answer '
                                              f'(like evt_42), or now.')
    return number


def event_types(raw):
    """The types= filter: known types, comma-separated; the operator's only among the operational ones."""
    types = [t for t in (raw or '').split(',') if t]
    unknown = [t for t in types if t not in models.EVENT_TYPES]
    if unknown:
        raise ApiError(422, 'invalid_filter', f'types: unknown event type {unknown[0]!r}; known: '
                                              f'{", ".join(models.EVENT_TYPES)}.')
    if caller().operator:
        if any(t not in OPERATOR_EVENT_TYPES for t in types):
            raise ApiError(403, 'forbidden', f'An operator key reads only {", ".join(OPERATOR_EVENT_TYPES)} '
                                             'events; mail activity is for the user\'s own key.')
        return types or list(OPERATOR_EVENT_TYPES)
    return types


def read_events(after, types, limit):
    Event = models.Event
    query = Event.select().where(Event.id > after)
    if not caller().operator:
        query = query.where(Event.user_id == caller().user_id)
    if types:
        query = query.where(Event.type.in_(types))
    return list(query.order_by(Event.id).limit(limit))


def wait_for_events(after, types, limit, seconds):
    """Read, and while nothing comes and time is left, wait for the doorbell and read again."""
    if not DOORBELL.enter():
        return []   # every waiting place is taken: answer now, the client polls again
    try:
        deadline = time.monotonic() + seconds
        head = models.last_event_id()
        for _ in range(100_000):   # bounded: each turn waits for the head to move or the time to end
            items = read_events(after, types, limit)
            remaining = deadline - time.monotonic()
            if items or remaining <= 0:
                return items
            models.database.close()   # no pooled connection held while idle
            head = DOORBELL.wait_past(head, remaining)
        return []
    finally:
        DOORBELL.leave()


@api('GET', '/api/v1/events', query=contract.EventQuery, answers={200: contract.Events},
     errors={403: 'forbidden: an operator key asked for mail activity types',
             410: 'cursor_expired: `after` is past the retention; the answer names oldest_cursor',
             422: 'invalid_cursor, invalid_filter'})
def list_events(query):
    """The caller's events after `after`, oldest first; `next_cursor` is where the next call starts."""
    after = event_cursor(query.after, 'after')
    types = event_types(query.types)
    limit = query.limit
    wait = min(query.wait, SETTINGS['events.max_wait'])
    oldest = models.pruned_through()
    if after is None:
        after = oldest
    elif after < oldest:
        raise ApiError(410, 'cursor_expired', f'Events after {models.event_id_text(after)} are past the retention '
                                              f'of the change feed (events.retention_hours); start again from '
                                              f'oldest_cursor.', oldest_cursor=models.event_id_text(oldest))
    items = read_events(after, types, limit)
    if not items and wait > 0:
        items = wait_for_events(after, types, limit, wait)
    return {'items': [event.to_dict() for event in items],
            'next_cursor': items[-1].public_id if items else models.event_id_text(after)}


# ================================================================ webhooks
#
# A user's endpoints: its events POSTed, signed per Standard Webhooks, by the
# consumers (tasks.py's webhooks section). The signing secret is made here,
# shown once in the answer that made it, and stored sealed (the web process
# can encrypt, never decrypt). Operator keys do not manage webhooks: an
# endpoint receives a user's mail activity.

MAX_WEBHOOKS_PER_USER = 20
ROTATION_GRACE = datetime.timedelta(hours=24)   # the old secret still signs this long after a rotation


def webhook_fields(body):
    """The fields a create or change body gave (a change leaves out what stays)."""
    clean = body.model_dump(exclude_unset=True)
    if 'events' in clean:
        clean['events'] = list(dict.fromkeys(clean['events']))
    return clean


def webhook_dict(hook, secret=None):
    answer = {'id': hook.id, 'url': hook.url, 'events': hook.events, 'enabled': hook.enabled,
              'cursor': models.event_id_text(hook.cursor), 'failures': hook.failures,
              'failing_since': models.iso(hook.failing_since), 'last_error': hook.last_error,
              'disabled_reason': hook.disabled_reason, 'next_attempt_at': models.iso(hook.next_attempt_at),
              'previous_secret_expires_at': models.iso(hook.previous_secret_until) if hook.previous_secret else None,
              'created_at': models.iso(hook.created_at), 'updated_at': models.iso(hook.updated_at)}
    if secret is not None:
        answer['secret'] = secret   # shown this once; stored sealed
    return answer


@api('POST', '/api/v1/webhooks', user_only=True, body=contract.WebhookCreate, answers={201: contract.Webhook},
     errors={409: 'webhook_limit'})
def create_webhook(body):
    """A new endpoint; its signing secret is in this answer only."""
    clean = webhook_fields(body)
    Webhook = models.Webhook
    if Webhook.select().where(Webhook.user_id == caller().user_id).count() >= MAX_WEBHOOKS_PER_USER:
        raise ApiError(409, 'webhook_limit', f'This user has {MAX_WEBHOOKS_PER_USER} webhooks, the most allowed; '
                                             'delete one first.')
    secret = webhooks.new_secret()
    # Starts at the feed's head: an endpoint gets the events after its creation, not the history.
    hook = Webhook.create(user_id=caller().user_id, secret=Webhook.seal(secret), cursor=models.last_event_id(),
                          **clean)
    bottle.response.status = 201
    return webhook_dict(hook, secret)


def save_only(hook, changed):
    """Write only these fields: a delivery run may be moving the endpoint's cursor and lease at this
    moment, and saving the whole row as read earlier would put them back (deliveries repeated)."""
    for name, value in changed.items():
        setattr(hook, name, value)
    hook.save(only=list(changed))


@api('GET', '/api/v1/webhooks', user_only=True, answers={200: contract.Webhooks})
def list_webhooks():
    rows = models.Webhook.select().where(models.Webhook.user_id == caller().user_id).order_by(models.Webhook.id)
    return {'items': [webhook_dict(row) for row in rows]}


@api('GET', '/api/v1/webhooks/<webhook_id:int>', user_only=True, answers={200: contract.Webhook})
def get_webhook(webhook_id):
    return webhook_dict(one(models.Webhook, webhook_id, 'webhook'))


@api('PATCH', '/api/v1/webhooks/<webhook_id:int>', user_only=True, body=contract.WebhookUpdate,
     answers={200: contract.Webhook})
def update_webhook(webhook_id, body):
    """Change the URL, the event types or enabled; re-enabling or a new URL starts afresh."""
    hook = one(models.Webhook, webhook_id, 'webhook')
    clean = webhook_fields(body)
    fresh_start = clean.get('enabled') and not hook.enabled or clean.get('url', hook.url) != hook.url
    changed = dict(clean, updated_at=models.utcnow())
    if fresh_start:   # re-enabled or moved: whatever failed before deserves a try now
        # wanted_at too: a run queued while it was enabled, then skipped as it was disabled, left it set,
        # and the wake-up below would take the endpoint for queued already.
        changed.update(failures=0, failing_since=None, last_error=None, disabled_reason=None,
                       next_attempt_at=None, wanted_at=None)
    save_only(hook, changed)
    if fresh_start and hook.enabled:   # events may wait behind its cursor: deliver them now
        tasks.wake_webhooks({(hook.tenant_id, hook.user_id)})
    return webhook_dict(hook)


@api('DELETE', '/api/v1/webhooks/<webhook_id:int>', user_only=True, answers={204: None})
def delete_webhook(webhook_id):
    hook = one(models.Webhook, webhook_id, 'webhook')
    with models.database.atomic():
        models.WebhookDelivery.delete().where(models.WebhookDelivery.webhook_id == hook.id).execute()
        hook.delete_instance()
    bottle.response.status = 204
    return ''


@api('POST', '/api/v1/webhooks/<webhook_id:int>/rotate', user_only=True, answers={200: contract.Webhook})
def rotate_webhook_secret(webhook_id):
    """A new secret, shown once; the current one keeps signing (beside it) for 24 hours."""
    hook = one(models.Webhook, webhook_id, 'webhook')
    secret = webhooks.new_secret()
    now = models.utcnow()
    save_only(hook, {'previous_secret': hook.secret, 'previous_secret_until': now + ROTATION_GRACE,
                     'secret': models.Webhook.seal(secret), 'updated_at': now})
    return webhook_dict(hook, secret)


@api('GET', '/api/v1/webhooks/<webhook_id:int>/deliveries', user_only=True, query=contract.DeliveryQuery,
     answers={200: contract.Deliveries})
def list_deliveries(webhook_id, query):
    """The delivery log, newest first; `cursor` is the last id of the previous page."""
    hook = one(models.Webhook, webhook_id, 'webhook')
    Delivery = models.WebhookDelivery
    rows = Delivery.select().where(Delivery.webhook_id == hook.id)
    if query.cursor is not None:
        rows = rows.where(Delivery.id < query.cursor)
    limit = query.limit
    rows = list(rows.order_by(Delivery.id.desc()).limit(limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    return {'items': [row.to_dict() for row in rows], 'next_cursor': str(rows[-1].id) if more else None}


@api('POST', '/api/v1/webhooks/<webhook_id:int>/deliveries/<delivery_id:int>/redeliver', user_only=True,
     answers={202: contract.Accepted}, errors={410: 'event_expired: the event is past the feed\'s retention'})
def redeliver(webhook_id, delivery_id):
    """Post that delivery's event once more, now."""
    hook = one(models.Webhook, webhook_id, 'webhook')
    delivery = models.WebhookDelivery.find(id=delivery_id, webhook_id=hook.id)
    if delivery is None:
        raise not_found('delivery', delivery_id)
    if models.Event.find(id=delivery.event_id) is None:
        raise ApiError(410, 'event_expired', f'The event of delivery {delivery_id} is past the retention of the '
                                             'change feed (events.retention_hours).')
    result = tasks.redeliver_webhook_event(hook.id, hook.tenant_id, hook.user_id, delivery.id)
    return accepted(result.id)


# ================================================================ health

@public('GET', '/health', answers={200: contract.Health})
def health():
    """Liveness: the web process answers."""
    return {'status': 'ok'}


@public('GET', '/health/detailed', answers={200: contract.HealthDetailed, 503: contract.HealthDetailed})
def health_detailed():
    """Database, broker, live consumers and queue; 503 `degraded` with every reason when one is wrong."""
    report = {'database': probe(models.check_database), 'broker': probe(check_broker)}
    report['consumers'] = probe(live_consumers) if report['database']['ok'] else {'ok': False}
    report['queue'] = probe(tasks.huey.queue_depth) if report['broker']['ok'] else {'ok': False}
    if report['database']['ok']:
        report['queue']['oldest_waiting_seconds'] = round(probe_value(metrics.oldest_waiting_age), 3)
    reasons = health_reasons(report)
    report['status'] = 'degraded' if reasons else 'ok'
    report['reasons'] = reasons
    bottle.response.status = 503 if reasons else 200
    return report


STARTED = time.monotonic()  # the start-up grace runs from here


def health_reasons(report):
    """What is wrong, one short phrase each; empty when healthy."""
    reasons = []
    if not report['database']['ok']:
        reasons.append('database unreachable')
    if not report['broker']['ok']:
        reasons.append('broker unreachable')
    starting = time.monotonic() - STARTED < SETTINGS['consumer.startup_grace']
    if report['consumers'].get('ok') and not report['consumers']['alive']:
        if starting:
            report['consumers']['starting'] = True
        else:
            reasons.append('no live consumer')
    limit = SETTINGS['health.max_wait_seconds']
    waited = report['queue'].get('oldest_waiting_seconds') or 0
    if limit and waited > limit:
        reasons.append(f'oldest waiting task has waited {waited:.0f} s (limit {limit:.0f} s)')
    return reasons


def probe(check):
    """Run one health check; a failure becomes {'ok': False, 'error': ...}, never a 500."""
    try:
        return dict(check() or {}, ok=True)
    except Exception as exc:  # any failure of a dependency is reported, not raised
        return {'ok': False, 'error': type(exc).__name__}


def probe_value(check):
    try:
        with models.database.connection_context():
            return check()
    except Exception:  # reported by the database probe already
        return 0.0


def check_broker():
    tasks.huey.storage.queue_size()


def live_consumers(now=None):
    with models.database.connection_context():
        return metrics.live_consumers(SETTINGS['consumer.alive_seconds'], now)


# ================================================================ the contract: OpenAPI document and reference page

API_DESCRIPTION = ('A multi-tenant email background-processing service: accounts, sync, mail, sending, and the '
                   'task ledger. Send "Authorization: Bearer <api key>"; every error is JSON {"error": code, '
                   '"message": text, "fields"?: {field: problem}}.')


@functools.cache
def openapi_text():
    """The document, built once: every route has registered itself by the first request."""
    return json.dumps(contract.document('emailsvc API', '1', API_DESCRIPTION), indent=1)


@public('GET', '/api/v1/openapi.json', answers={200: ('application/json', {'type': 'object'})})
def openapi_document():
    """The API's contract as an OpenAPI 3.1 document; no key needed (it holds no data)."""
    bottle.response.content_type = 'application/json'
    return openapi_text()


@public('GET', '/api/v1/docs', answers={200: ('text/html', {'type': 'string'})})
def api_reference():
    """The API reference page, rendered here from the same document; no key needed, no script, works offline."""
    # No script at all on this page; its one stylesheet is inline.
    bottle.response.set_header('Content-Security-Policy', "default-src 'none'; style-src 'unsafe-inline'; "
                                                          "frame-ancestors 'none'")
    return bottle.template('api_docs', template_lookup=[dashboard.VIEWS], doc=json.loads(openapi_text()),
                           type_html=contract.type_html)


# ================================================================ metrics and access log
#
# Task and mail counters come from the shared database (taskq/metrics.py says
# why): every web process answers the same totals, for every consumer on every
# host. The HTTP metrics below are this web process's own (prometheus_client's
# in-memory counters): scrape each web process, not a load balancer in front.

REGISTRY = prometheus_client.CollectorRegistry(auto_describe=False)
REGISTRY.register(metrics.LedgerCollector(tasks.huey, SETTINGS))
HTTP_REQUESTS = prometheus_client.Counter(
    'emailsvc_http_requests', 'HTTP requests answered by this web process, by route template and status',
    ['method', 'route', 'status'], registry=REGISTRY)
HTTP_LATENCY = prometheus_client.Histogram(
    'emailsvc_http_request_duration_seconds', 'Time to answer a request in this web process, by route template',
    ['method', 'route'], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
METRICS_NETWORKS = [ipaddress.ip_network(network, strict=False)
                    for network in settings_mod.listed(SETTINGS['metrics.allowed_networks'])]


@public('GET', '/metrics', auth='metrics', answers={200: ('text/plain', {'type': 'string'})},
        errors={401: 'unauthorized: no key (and not from metrics.allowed_networks)',
                403: 'forbidden: a user key', 503: 'unavailable: the database is unreachable'})
def prometheus_metrics():
    """Prometheus text format, for an operator key or a client in metrics.allowed_networks."""
    if not from_allowed_network():
        try:
            caller_ = authenticate()
        except ApiError as exc:
            raise ApiError(exc.status_code, exc.code, f'{exc.body} /metrics takes an operator key, or a client '
                                                      'address in metrics.allowed_networks.') from None
        if not caller_.operator:
            raise ApiError(403, 'forbidden', '/metrics needs an operator key (or a client address in '
                                             'metrics.allowed_networks).')
    bottle.response.content_type = prometheus_client.CONTENT_TYPE_LATEST
    return prometheus_client.generate_latest(REGISTRY)


def from_allowed_network():
    # REMOTE_ADDR, the socket's peer: bottle's remote_addr believes X-Forwarded-For, which anyone can send.
    try:
        address = ipaddress.ip_address(bottle.request.environ.get('REMOTE_ADDR', ''))
    except ValueError:
        return False
    return any(address in network for network in METRICS_NETWORKS)


access_logger = logging.getLogger('emailsvc.access')


def observed(wsgi_app):
    """WSGI wrapper: one JSON access-log line and the HTTP metrics per request."""
    def serve(environ, start_response):
        started = time.perf_counter()
        answer = {}

        def record_start(status, headers, exc_info=None):
            answer['status'], answer['headers'] = status, headers
            return start_response(status, headers, exc_info)
        body = None
        try:
            body = wsgi_app(environ, record_start)
            yield from body
        finally:
            if hasattr(body, 'close'):
                body.close()
            elapsed = time.perf_counter() - started
            route = environ.get('bottle.route')
            template = environ.get('SCRIPT_NAME', '') + route.rule if route is not None else 'unmatched'
            status = answer.get('status', '500').split(' ', 1)[0]
            method = environ.get('REQUEST_METHOD', '')
            request_id = next((v for k, v in answer.get('headers', ()) if k.lower() == 'x-request-id'), None)
            HTTP_REQUESTS.labels(method, template, status).inc()
            HTTP_LATENCY.labels(method, template).observe(elapsed)
            access_logger.info('%s %s %s', method, template, status, extra={
                'method': method, 'route': template, 'status': int(status), 'duration_ms': round(elapsed * 1000, 2),
                'request_id': request_id})
    return serve


# ================================================================ command line

def serve_web(args):
    from mailkit import webserver
    logs.configure(SETTINGS['log.level'])
    if SETTINGS['server.max_request_body_mb'] <= SETTINGS['mail.max_attachment_mb']:
        fail(f'server.max_request_body_mb ({SETTINGS["server.max_request_body_mb"]}) must be more than '
             f'mail.max_attachment_mb ({SETTINGS["mail.max_attachment_mb"]}), or uploads the API allows are refused; '
             f'raise it in config.ini or EMAILSVC_SERVER_MAX_REQUEST_BODY_MB')
    try:
        models.migrate()
    except UNAVAILABLE as exc:
        # Containers start in any order: serve 503s until the database is back.
        logger.warning('database unreachable at start-up (%s); answering 503 until it is back',
                       type(exc).__name__)
    host, port = SETTINGS['server.host'], SETTINGS['server.port']
    # A shell starts background jobs with SIGINT ignored; stop on it (and
    # SIGTERM) all the same, so ./run.sh's Ctrl-C ends the web server too.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)
    try:
        server = webserver.create_server(observed(app), **waitress_options(SETTINGS), host=host, port=port)
    except OSError as exc:
        fail(f'cannot listen on {host}:{port}: {exc.strerror or exc}; is another server using that port? '
             f'Choose another with server.port or EMAILSVC_SERVER_PORT')
    logger.info('web server listening on http://%s:%s/', host, port, extra={'host': host, 'port': port})
    if sys.stdout.isatty():
        print(f'emailsvc web: http://{host}:{port}/  (health: /health; Ctrl-C stops)', flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        logger.info('web server stopped')
    finally:
        server.close()


def waitress_options(settings):
    """waitress's limits from the settings, so slow or huge requests cannot take the server (issue 13).

    Defaults of waitress 3.0 that made trouble: 100 connections (100 clients
    trickling a byte now and then blocked everyone else), 120 s of silence
    before a connection is dropped, and request bodies up to 1 GiB spooled to
    disk before the app could look at the key. poll() instead of select(),
    which fails on descriptors past 1024.
    """
    timeout = settings['server.channel_timeout']
    return dict(threads=settings['server.threads'], ident='emailsvc', asyncore_use_poll=True,
                connection_limit=settings['server.connection_limit'], channel_timeout=timeout,
                cleanup_interval=max(1, min(30, timeout // 2)),  # how often waitress looks for silent connections
                max_request_body_size=settings['server.max_request_body_mb'] * 1024 * 1024)


def consumer_options(settings):
    """Huey consumer options from the settings: worker type, recycling (-M), graceful stop (-g, -t);
    the workers are [lanes]'s."""
    return dict(worker_type=settings['consumer.worker_type'],
                periodic=True, check_worker_health=True,
                max_tasks=settings['consumer.max_tasks_per_worker'] or None,
                graceful_signal=settings['consumer.graceful_signal'],
                shutdown_timeout=settings['consumer.shutdown_timeout'] or None)


def run_consumer(args):
    logs.configure(SETTINGS['log.level'])
    models.migrate()
    consumer = tasks.huey.create_consumer(lanes=args.lanes, **consumer_options(SETTINGS))
    consumer.run()


def lane_names(value):
    """--lanes: comma-separated names of config.ini's [lanes]."""
    names = settings_mod.listed(value)
    unknown = [name for name in names if name not in tasks.huey.lane_workers]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f'unknown lane {", ".join(unknown) or "(none given)"}; the lanes are '
                                         f'{", ".join(tasks.huey.lane_workers)}')
    return names


def run_migrate(args):
    old, new = models.migrate()
    if args.banner:  # ./run.sh's start-up: one short banner, the first-key hint only while no key exists
        if old != new:
            print(f'emailsvc: database schema upgraded from version {old} to {new}')
        print(banner(ApiKey.select().exists()))
        return
    print(f'database schema: version {old} -> {new}' if old != new else f'database schema: version {new}, up to date')


def banner(have_keys):
    url = f'http://{SETTINGS["server.host"]}:{SETTINGS["server.port"]}/'
    mode = 'embedded: SQLite under var/' if settings_mod.is_embedded(SETTINGS['queue.url']) else 'scaled out'
    lines = [f'emailsvc is starting on {url}  ({mode}); Ctrl-C stops it, letting running tasks finish']
    if not have_keys:
        lines.append('  first key:  ./run.sh admin create-tenant acme && '
                     './run.sh admin create-key --tenant acme --user alice')
        lines.append(f'  then:       curl -H "Authorization: Bearer <key>" {url}api/v1/accounts')
    return '\n'.join(lines)


def admin_create_tenant(args):
    models.migrate()
    if Tenant.get_or_none(Tenant.name == args.name):
        fail(f'tenant {args.name!r} exists already')
    tenant = Tenant.create(name=args.name)
    print(f'tenant {tenant.name} created (id {tenant.id})')


def find_tenant(name):
    tenant = Tenant.get_or_none(Tenant.name == name)
    if tenant is None:
        fail(f'no tenant {name!r}; create it with ./run.sh admin create-tenant {name}')
    return tenant


def admin_create_user(args):
    models.migrate()
    tenant = find_tenant(args.tenant)
    with models.tenant_scope(tenant.id):
        if User.get_or_none(User.name == args.name):
            fail(f'user {args.name!r} exists already in tenant {tenant.name}')
        user = User.create(name=args.name)
    print(f'user {user.name} created in tenant {tenant.name} (id {user.id})')


def admin_create_key(args):
    models.migrate()
    if args.operator:
        if args.tenant or args.user:
            fail('an operator key belongs to no tenant; drop --tenant and --user')
        _, key = ApiKey.issue(operator=True)
        print('operator key created; it is shown once, store it now:')
    else:
        if not (args.tenant and args.user):
            fail('give --tenant and --user, or --operator')
        tenant = find_tenant(args.tenant)
        with models.tenant_scope(tenant.id):
            user = User.get_or_none(User.name == args.user) or User.create(name=args.user)
        _, key = ApiKey.issue(tenant_id=tenant.id, user_id=user.id)
        print(f'key created for {user.name} in tenant {tenant.name}; it is shown once, store it now:')
    print(key)


def admin_list_keys(args):
    models.migrate()
    tenants = {t.id: t.name for t in Tenant.select()}
    with models.all_tenants():
        users = {u.id: u.name for u in User.select()}
    rows = [{'id': row.id, 'prefix': f'{row.prefix}…',
             'owner': 'operator' if row.is_operator else f'{tenants.get(row.tenant_id)}/{users.get(row.user_id)}',
             'state': 'revoked' if row.revoked_at else 'active', 'created': models.iso(row.created_at),
             'last_used': models.iso(row.last_used_at), 'revoked': models.iso(row.revoked_at)}
            for row in ApiKey.select().order_by(ApiKey.id)]
    show(args, rows, ('id', 'prefix', 'owner', 'state', 'created', 'last_used'), 'no API keys; make one with '
         './run.sh admin create-key --operator (or --tenant NAME --user NAME)')


def admin_revoke_key(args):
    models.migrate()
    row = find_key(args.key)
    ApiKey.update(revoked_at=models.utcnow()).where(ApiKey.id == row.id).execute()
    print(f'key {row.id} ({row.prefix}…) revoked')


def find_key(given):
    """A key by its id, the whole key, or any unique prefix of the part list-keys shows."""
    given = given.strip().rstrip('…')
    if given.isdigit():
        row = ApiKey.get_or_none(ApiKey.id == int(given))
        if row is None:
            fail(f'no key with id {given}; ./run.sh admin list-keys shows them')
        return row
    if len(given) >= 12:
        rows = list(ApiKey.select().where(ApiKey.prefix == given[:12]))
    else:
        rows = list(ApiKey.select().where(ApiKey.prefix.startswith(given)).limit(6))
    return one_match(rows, given, 'key', lambda row: f'{row.prefix}… (id {row.id})',
                     './run.sh admin list-keys shows them')


def one_match(rows, given, kind, describe, hint):
    """The one row a prefix matched, or one line that says none or which ones."""
    if not rows:
        fail(f'no {kind} {given!r}; {hint}')
    if len(rows) > 1:
        shown = ', '.join(describe(row) for row in rows[:5]) + (', …' if len(rows) > 5 else '')
        fail(f'{kind} prefix {given!r} is ambiguous: it matches {shown}; give more characters')
    return rows[0]


def find_task(given):
    """A task record by its id or any unique prefix of it."""
    with models.all_tenants():
        row = TaskRecord.get_or_none(TaskRecord.id == given)
        if row is None and given:
            row = one_match(list(TaskRecord.select().where(TaskRecord.id.startswith(given)).limit(6)), given,
                            'task', lambda r: f'{r.id} ({r.name}, {r.state})', './run.sh tasks active or '
                            'tasks dead list them')
    if row is None:
        fail(f'no task {given!r}')
    return row


def show(args, rows, columns, empty):
    """A listing: --json prints the rows as JSON; otherwise a table with headers, or `empty` when there is none."""
    if getattr(args, 'json', False):
        print(json.dumps(rows, indent=2, default=str))
    elif not rows:
        print(empty)
    else:
        print(table(rows, columns))


def table(rows, columns):
    cells = [[column.upper().replace('_', ' ') for column in columns]]
    cells += [['-' if row.get(c) is None else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return '\n'.join('  '.join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)


def ago(moment, now=None):
    if moment is None:
        return None
    seconds = ((now or models.utcnow()) - moment).total_seconds()
    return f'{seconds:.1f}s ago' if seconds < 120 else f'{seconds / 60:.0f}m ago' if seconds < 7200 \
        else f'{seconds / 3600:.1f}h ago'


def admin_rotate_key(args):
    """Re-encrypt every credential under the newest key (the first in security.credential_keys)."""
    models.migrate()
    keys = generate_embedded_key() if args.generate else SETTINGS['security.credential_keys']
    count = tasks.reencrypt_credentials(keys)
    made = f'made a new key first in {SETTINGS["paths.var"] / "fernet.key"}; ' if args.generate else ''
    print(f'{made}re-encrypted {count} credentials under the newest key '
          f'({len(key_list(keys))} keys in use). No restart needed: running workers and web servers read the '
          'keys again when a password does not decrypt or is stored. Keep the older keys until every host '
          'has the new one.')


def generate_embedded_key():
    """Put a new key in front of var/fernet.key (embedded mode only)."""
    from mailkit.credentials import new_key
    path = SETTINGS['paths.var'] / 'fernet.key'
    if settings_mod.env_name('security.credential_keys') in os.environ or not path.exists():
        fail('--generate works on the generated var/fernet.key only; with configured keys, put a new key '
             'first in security.credential_keys and run rotate-key without --generate')
    keys = [new_key()] + path.read_text().strip().split(',')
    path.write_text(','.join(keys) + '\n')
    return keys


SECRET_FILES = (('server.secret', 'secret.key'), ('security.credential_keys', 'fernet.key'))


def admin_backup(args):
    """Copy the embedded database, queue and generated secrets into a new 0700 directory while the
    service runs: SQLite's online backup API copies a consistent snapshot, so nothing needs to stop."""
    sources = [(label, settings_mod.sqlite_path(SETTINGS[key])) for label, key in
               (('database', 'database.url'), ('queue', 'queue.url')) if settings_mod.is_embedded(SETTINGS[key])]
    elsewhere = ' and '.join(what for what, key in (('the PostgreSQL database: use pg_dump', 'database.url'),
                                                    ("the Redis queue: rely on Redis's own persistence (appendonly "
                                                     'yes, or copy its RDB snapshot)', 'queue.url'))
                             if not settings_mod.is_embedded(SETTINGS[key]))
    if not sources:
        fail(f'nothing here to back up: for {elsewhere}; the secrets are in your configuration', status=1)
    import pathlib
    for label, path in sources:
        if not path.exists():
            fail(f'no {label} at {path}: has the service run with these settings?')
    target = pathlib.Path(args.dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        fail(f'{target} exists and is not an empty directory; give a new one (a backup never overwrites)')
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    target.chmod(0o700)
    rows = [{'file': str(target / path.name), 'what': label, 'bytes': backup_sqlite(path, target / path.name)}
            for label, path in sources]
    for key, name in SECRET_FILES:   # only the generated ones: configured secrets live in your configuration
        path = SETTINGS['paths.var'] / name
        if path.exists() and path.read_text().strip() == SETTINGS[key]:
            write_private(target / name, path.read_bytes())
            rows.append({'file': str(target / name), 'what': key, 'bytes': path.stat().st_size})
    show(args, rows, ('file', 'what', 'bytes'), '')
    if not args.json:
        print(f'backed up while running; to restore, stop the service and copy these files into '
              f'{SETTINGS["paths.var"]}/' + (f'. Not here: {elsewhere}' if elsewhere else ''))


def backup_sqlite(source, target):
    """A consistent copy of a live SQLite database (the online backup API), as one 0600 file."""
    import sqlite3
    write_private(target, b'')
    src = sqlite3.connect(source, timeout=30)   # exists (checked): connecting does not create it
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
        dst.execute('PRAGMA journal_mode=DELETE')   # one self-contained file; the service sets WAL again on open
    finally:
        dst.close()
        src.close()
    return target.stat().st_size


def write_private(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, 'wb') as handle:
        handle.write(data)


def admin_generate_secrets(args):
    """A new payload-signing secret and credential key, for a scaled-out set-up (every host the same)."""
    import secrets
    from mailkit.credentials import new_key
    values = {'server.secret': secrets.token_urlsafe(48), 'security.credential_keys': new_key()}
    if args.ini:
        for key, value in values.items():
            section, name = key.split('.')
            print(f'[{section}]\n{name} = {value}')
        return
    print('# the same on every web and consumer host; keep them secret (config.ini: ./run.sh admin '
          'generate-secrets --ini)')
    for key, value in values.items():
        print(f'{settings_mod.env_name(key)}={value}')


def tasks_status(args):
    models.migrate()
    print(json.dumps(find_task(args.task_id).to_dict(), indent=2))


def tasks_active(args):
    with models.all_tenants():
        rows = TaskRecord.select().where(TaskRecord.state.in_(ledger.ACTIVE_STATES)) \
            .order_by(TaskRecord.enqueued_at).limit(args.limit)
        items = [{'task_id': row.id, 'name': row.name, 'state': row.state, 'attempts': row.attempts,
                  'worker': row.worker if row.state == ledger.RUNNING else None,
                  'progress': f'{row.progress_done}/{row.progress_total}' if row.progress_total else None,
                  'enqueued': models.iso(row.enqueued_at)} for row in rows]
    show(args, items, ('task_id', 'name', 'state', 'attempts', 'worker', 'progress', 'enqueued'),
         'no active tasks (none pending, running or retrying)')


def tasks_queues(args):
    depth = tasks.huey.queue_depth()
    if args.json:
        print(json.dumps(depth))
        return
    rows = [{'priority': priority, 'waiting': count} for priority, count in depth['by_priority'].items()]
    print(table(rows + [{'priority': 'total', 'waiting': depth['depth']}], ('priority', 'waiting')))
    lanes = [{'lane': lane, 'waiting': waiting['depth'], 'workers': tasks.huey.lane_workers[lane]}
             for lane, waiting in depth['by_lane'].items()]
    print()
    print(table(lanes, ('lane', 'waiting', 'workers')))


def tasks_revoke(args):
    record = find_task(args.task_id)
    try:
        ledger.revoke(tasks.huey, record.id)
    except ledger.LedgerConflict as exc:
        fail(f'{exc} (./run.sh tasks status {record.id})')
    print(f'task {record.id} revoked')


def tasks_dead(args):
    with models.all_tenants():
        rows = TaskRecord.select().where(TaskRecord.state == ledger.DEAD).order_by(TaskRecord.finished_at.desc()) \
            .limit(args.limit)
        items = [{'task_id': row.id, 'name': row.name, 'tenant_id': row.tenant_id, 'attempts': row.attempts,
                  'finished': models.iso(row.finished_at), 'error': ((row.error or '').splitlines() or [''])[0][:100]}
                 for row in rows]
    show(args, items, ('task_id', 'name', 'tenant_id', 'attempts', 'finished', 'error'), 'no dead tasks')


def tasks_retry(args):
    record = find_task(args.task_id)
    with models.all_tenants():
        try:
            ledger.requeue(tasks.huey, record)
        except ledger.LedgerConflict as exc:
            fail(str(exc))
    print(f'task {record.id} queued again')


def tasks_purge(args):
    if not (args.task_id or args.all_dead):
        fail('give a task id or --all-dead')
    task_id = find_task(args.task_id).id if args.task_id else None
    with models.all_tenants():
        count = ledger.purge(task_id, all_dead=args.all_dead)
    if task_id and not count:
        fail(f'task {task_id} is not finished (./run.sh tasks status {task_id})')
    print(f'purged {count} task(s)')


def heartbeats(alive_only=False):
    """Every worker's heartbeat row with whether it is alive and the task it runs, consumers first."""
    now = models.utcnow()
    cutoff = now - datetime.timedelta(seconds=SETTINGS['consumer.alive_seconds'])
    beats = list(ConsumerHeartbeat.select().order_by(ConsumerHeartbeat.host, ConsumerHeartbeat.consumer_pid,
                                                     ConsumerHeartbeat.pid))
    with models.all_tenants():
        running = {row.worker: row for row in TaskRecord.select().where(TaskRecord.state == ledger.RUNNING)}
    items = []
    for beat in beats:
        alive = beat.last_seen >= cutoff
        if alive_only and not alive:
            continue
        task = running.get(beat.id)
        items.append({'consumer': f'{consumer_of(beat.id)}:{beat.consumer_pid}', 'worker': beat.id, 'alive': alive,
                      'started': models.iso(beat.started_at), 'last_beat': models.iso(beat.last_seen),
                      'last_beat_ago': ago(beat.last_seen, now),
                      'running': f'{task.name} {task.id}' if task else None,
                      'progress': f'{task.progress_done}/{task.progress_total}'
                      if task and task.progress_total else None})
    return items


def tasks_workers(args):
    items = heartbeats()
    for item in items:
        item['state'] = 'alive' if item['alive'] else 'gone'
    show(args, items, ('consumer', 'worker', 'state', 'started', 'last_beat_ago', 'running', 'progress'),
         'no consumers have run yet (start one with ./run.sh consumer)')


def tasks_ping(args):
    """Exit 0 and a line per consumer with a live heartbeat; non-zero when none answers (a health check)."""
    consumers = {}
    for item in heartbeats(alive_only=True):
        consumers.setdefault(item['consumer'], []).append(item)
    if not consumers:
        fail(f'no consumer answers: no worker has beaten within {SETTINGS["consumer.alive_seconds"]:g} s', status=1)
    for consumer, workers in consumers.items():
        latest = min(w['last_beat_ago'] for w in workers)
        print(f'{consumer}: pong ({len(workers)} worker{"s" * (len(workers) != 1)}, last beat {latest})')


def tasks_stats(args):
    """Tasks by name and state over the last --hours, and the throughput of finished ones."""
    now = models.utcnow()
    since = now - datetime.timedelta(hours=args.hours)
    R = TaskRecord
    with models.all_tenants():
        finished = list(R.select(R.name, R.state, pw.fn.COUNT(R.id)).where(R.finished_at >= since,
                        R.state.in_(ledger.FINAL_STATES)).group_by(R.name, R.state).tuples())
        active = list(R.select(R.name, R.state, pw.fn.COUNT(R.id)).where(R.state.in_(ledger.ACTIVE_STATES))
                      .group_by(R.name, R.state).tuples())
    by_name = {}
    for name, state, count in finished + active:
        by_name.setdefault(name, dict.fromkeys(ledger.TASK_STATES, 0))[state] = count
    total = sum(count for _, _, count in finished)
    minutes = args.hours * 60
    rows = [{'name': name, **counts, 'finished': sum(counts[s] for s in ledger.FINAL_STATES)}
            for name, counts in sorted(by_name.items())]
    if args.json:
        print(json.dumps({'since': models.iso(since), 'hours': args.hours, 'by_name': rows, 'finished': total,
                          'per_minute': round(total / minutes, 3)}, indent=2))
        return
    if not rows:
        print(f'no tasks finished in the last {args.hours:g} h and none waiting or running')
        return
    print(table(rows, ('name',) + ledger.TASK_STATES))
    print(f'\n{total} finished in the last {args.hours:g} h ({total / minutes:.2f} per minute); '
          'pending, running and retrying are counted now')


def fail(message, status=2):
    """One line on stderr and a non-zero exit: every command-line failure ends here."""
    print(f'emailsvc: {message}', file=sys.stderr)
    sys.exit(status)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a mistake on the command line is one line on stderr, exit 2."""

    def error(self, message):
        fail(f'{message} (./run.sh {" ".join(self.prog.split()[1:])} --help shows what there is)'.replace('  ', ' '))


def listing(subparsers, name, run, help_text):
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    p.add_argument('--json', action='store_true', help='print JSON for scripts instead of a table')
    p.set_defaults(run=run)
    return p


def build_parser():
    parser = Parser(prog='emailsvc', description='Email background-processing service. ./run.sh with no command '
                                                 'starts the web server and the consumer together.')
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    commands.add_parser('web', help='serve the HTTP API', description='Serve the HTTP API in the foreground.') \
        .set_defaults(run=serve_web)
    p = commands.add_parser('consumer', help='run the task consumer', description='Run the Huey consumer (workers, '
                            'periodic tasks) in the foreground; consumer.* and lanes.* settings apply.')
    p.add_argument('--lanes', type=lane_names, metavar='LANE,...',
                   help='serve only these lanes (default: every lane of config.ini\'s [lanes])')
    p.set_defaults(run=run_consumer)
    p = commands.add_parser('migrate', help='upgrade the database schema', description='Upgrade the database schema.')
    p.add_argument('--banner', action='store_true', help=argparse.SUPPRESS)  # ./run.sh's start-up lines
    p.set_defaults(run=run_migrate)

    admin = commands.add_parser('admin', help='tenants, users, API keys, key rotation, backup',
                                description='Tenants, users, API keys, key rotation, backup, secrets.') \
        .add_subparsers(dest='action', required=True, metavar='ACTION')
    p = admin.add_parser('create-tenant', help='create a tenant')
    p.add_argument('name')
    p.set_defaults(run=admin_create_tenant)
    p = admin.add_parser('create-user', help='create a user in a tenant')
    p.add_argument('--tenant', required=True)
    p.add_argument('name')
    p.set_defaults(run=admin_create_user)
    p = admin.add_parser('create-key', help='make an API key; prints it alone on its last line')
    p.add_argument('--tenant')
    p.add_argument('--user')
    p.add_argument('--operator', action='store_true', help='a key that operates the service (all tenants)')
    p.set_defaults(run=admin_create_key)
    listing(admin, 'list-keys', admin_list_keys, 'list API keys (prefixes only, never the keys)')
    p = admin.add_parser('revoke-key', help='revoke a key')
    p.add_argument('key', help='key id, or any unique prefix of the key')
    p.set_defaults(run=admin_revoke_key)
    p = admin.add_parser('rotate-key', help='re-encrypt credentials under the newest key')
    p.add_argument('--generate', action='store_true', help='embedded mode: make the new key too')
    p.set_defaults(run=admin_rotate_key)
    p = listing(admin, 'backup', admin_backup, 'copy the embedded database, queue and generated secrets into '
                'a new directory, safely while the service runs')
    p.add_argument('dir', help='a new (or empty) directory; made with mode 0700')
    p = admin.add_parser('generate-secrets', help='print a new server secret and credential key for a '
                         'scaled-out set-up')
    p.add_argument('--ini', action='store_true', help='print config.ini lines instead of environment variables')
    p.set_defaults(run=admin_generate_secrets)

    inspect = commands.add_parser('tasks', help='inspect and manage tasks, queues and consumers',
                                  description='Inspect and manage tasks, queues and consumers. Task ids may be '
                                              'shortened to any unique prefix.') \
        .add_subparsers(dest='action', required=True, metavar='ACTION')
    p = listing(inspect, 'active', tasks_active, 'pending, running and retrying tasks, oldest first')
    p.add_argument('--limit', type=int, default=100)
    p = inspect.add_parser('status', help="one task's record, as JSON")
    p.add_argument('task_id')
    p.set_defaults(run=tasks_status)
    listing(inspect, 'queues', tasks_queues, 'tasks waiting in the broker, by priority')
    listing(inspect, 'workers', tasks_workers, 'consumers and their workers from heartbeats, and what each runs')
    p = listing(inspect, 'stats', tasks_stats, 'tasks by name and state over a window, and the throughput')
    p.add_argument('--hours', type=float, default=1.0, help='the window, in hours back from now (default 1)')
    inspect.add_parser('ping', help='exit 0 and a line per live consumer; non-zero when none answers '
                                    '(a health check)').set_defaults(run=tasks_ping)
    p = inspect.add_parser('revoke', help='revoke a pending or retrying task')
    p.add_argument('task_id')
    p.set_defaults(run=tasks_revoke)
    p = listing(inspect, 'dead', tasks_dead, 'dead letters (retries exhausted), newest first')
    p.add_argument('--limit', type=int, default=100)
    p = inspect.add_parser('retry', help='run a failed, dead or revoked task again')
    p.add_argument('task_id')
    p.set_defaults(run=tasks_retry)
    p = inspect.add_parser('purge', help='delete finished tasks from the ledger')
    p.add_argument('task_id', nargs='?')
    p.add_argument('--all-dead', action='store_true')
    p.set_defaults(run=tasks_purge)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UNAVAILABLE as exc:
        fail(f'cannot reach the database or queue ({type(exc).__name__}: {exc}); is it running?')


if __name__ == '__main__':
    main()
