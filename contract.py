"""The HTTP API's contract: every request and response body as a pydantic model, and the route table
that turns them, with each route's errors, into the OpenAPI 3.1 document at /api/v1/openapi.json.

Why pydantic v2 (and not msgspec, the other candidate): one declaration validates a request with
field-level errors (the `fields` of a 422), and emits JSON Schema 2020-12, which OpenAPI 3.1 uses as
it is, with named `$defs` for nested models. msgspec validates faster, but its errors stop at the
first problem (a client wants every wrong field at once) and it offers no custom error texts per
field; speed is not where this API spends its time (a request costs a database round trip).

Adding a route's models is one step per part, all in this file, then naming them in the route:

    class WebhookBody(Body):                 # request body: unknown fields are refused, types strict
        url: Url
        events: list[EventName] = []

    class Webhook(Answer):                   # response body: documents; extra fields are allowed
        id: int
        url: str

    @api('POST', '/api/v1/webhooks', user_only=True, body=WebhookBody, answers={201: Webhook},
         errors={409: 'webhook_limit'})
    def create_webhook(body): ...            # body is a validated WebhookBody

A query string gets a `Query` model the same way (`query=...`, the handler receives `query`). A new
account field (`push`, say) goes in three places: AccountCreate with its default, AccountUpdate as
`push: bool = None` (may be left out, never null), and Account (the answer). Routes outside the key
scheme use emailsvc's `public(...)` decorator. The errors every route of its kind has (401, 403,
404 for a path id, 400/413/422 for a body, 503) are added by `standard_errors`; name only the route's
own ones. tests/test_contract.py fails for any Bottle route the document lacks, and
tests/test_fuzz.py fuzzes every documented route against a live server.
"""
import dataclasses
import datetime
import html
import re
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      WithJsonSchema)
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticCustomError

from mailkit import smtp, webhooks
from mailkit.errors import InvalidSetting, check_setting

MAX_ID = 2 ** 63 - 1   # the largest id a BIGINT holds
MAX_FILTER_ID = 2 ** 62


# ================================================================ value types

def fail(message: str):
    """A validation error with our own wording (the `fields` message a client reads)."""
    return PydanticCustomError('invalid', message)


def unicode_text(value: str) -> str:
    # JSON's "\ud800" decodes to a lone surrogate, which no database driver can encode: refused here.
    try:
        value.encode('utf-8')
    except UnicodeEncodeError:
        raise fail('must be valid Unicode text (no lone surrogates)') from None
    return value


def printable_text(value: str) -> str:
    unicode_text(value)
    if any(char < ' ' or char == '\x7f' for char in value):
        raise fail('must not contain control characters (line breaks, tabs, NUL)')
    return value


def setting_text(value: str) -> str:
    """Hosts, usernames, passwords, addresses: printable, because they end up on a protocol line.
    CR/LF in a username became IMAP/POP3 commands of their own (issue 13)."""
    unicode_text(value)
    try:
        check_setting('value', value)
    except InvalidSetting:
        raise fail('must not contain control characters (line breaks, tabs, NUL)') from None
    if not value.strip():
        raise fail('must be a non-empty string')
    return value


def email_address(value: str) -> str:
    try:
        smtp.parse_address(value)
    except (ValueError, TypeError) as exc:
        raise fail(str(exc)) from None
    return value


def query_bool(value):
    if value not in ('true', 'false', True, False):
        raise fail('must be true or false')
    return value in ('true', True)


def query_int(value):
    """A whole number from a query string; Python's int() would also take '1_000' and 4,300 digits."""
    if isinstance(value, str):
        if not re.fullmatch(r'[0-9]{1,19}', value):
            raise fail('must be a whole number')
        return int(value)
    return value


def iso_time(value):
    if not isinstance(value, str) or len(value) > 40:
        raise fail('must be an ISO 8601 time, like 2026-01-31T12:00:00Z')
    try:
        moment = datetime.datetime.fromisoformat(value.replace('Z', '+00:00'))
        if moment.tzinfo:
            moment = moment.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    except (ValueError, OverflowError):   # OverflowError: 0001-01-01T00:00+01:00 is before year 1 in UTC
        raise fail('must be an ISO 8601 time, like 2026-01-31T12:00:00Z') from None
    return moment


EMAIL = re.compile(r'^[^@\s<>()",;]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z0-9-]{2,63}$')
HOST = re.compile(r'^[A-Za-z0-9._:-]{1,255}$')
PRINTABLE = r'^[^\x00-\x1f\x7f]*$'

Id = Annotated[int, Field(ge=1, le=MAX_ID)]
Setting = Annotated[str, Field(min_length=1, max_length=320, pattern=PRINTABLE), AfterValidator(setting_text)]
Password = Annotated[str, Field(min_length=1, max_length=1024, pattern=PRINTABLE), AfterValidator(setting_text)]
Host = Annotated[str, Field(min_length=1, max_length=255, pattern=HOST.pattern), AfterValidator(setting_text)]
Email = Annotated[str, Field(min_length=1, max_length=320, pattern=EMAIL.pattern), AfterValidator(setting_text)]
Port = Annotated[int, Field(ge=1, le=65535)]
Security = Literal['tls', 'starttls', 'none']
Text = Annotated[str, AfterValidator(unicode_text)]
Recipient = Annotated[str, Field(max_length=998), AfterValidator(unicode_text), AfterValidator(email_address)]
ONE_LINE = r'^[^\r\n]*$'
Subject = Annotated[str, Field(max_length=998, pattern=ONE_LINE), AfterValidator(unicode_text)]
# Query strings: text for a LIKE filter; no control characters (PostgreSQL refuses NUL in a string).
Filter = Annotated[str, Field(max_length=500, pattern=PRINTABLE), AfterValidator(printable_text)]
QueryBool = Annotated[bool, BeforeValidator(query_bool)]
Time = Annotated[datetime.datetime, BeforeValidator(iso_time),
                 WithJsonSchema({'type': 'string', 'format': 'date-time', 'maxLength': 40})]


def since_day(value):
    """A 'YYYY-MM-DD' day from 1970 on (sync_since)."""
    day = None
    if isinstance(value, str) and re.fullmatch(r'[0-9]{4}-[0-9]{2}-[0-9]{2}', value):
        try:
            day = datetime.date.fromisoformat(value)
        except ValueError:   # 2026-02-30: refused below, with the rest
            day = None
    if day is None or day.year < 1970:
        raise fail('must be a date like "2026-01-01" (from 1970 on), or null')
    return day


Day = Annotated[datetime.date, BeforeValidator(since_day),
                WithJsonSchema({'type': 'string', 'format': 'date', 'maxLength': 10})]


def QueryInt(low, high):   # noqa: N802 (a type)
    return Annotated[int, Field(ge=low, le=high), BeforeValidator(query_int)]


# ================================================================ model bases

class Body(BaseModel):
    """A JSON request body: strict types (no "993" for 993), unknown fields refused (a typo must not
    pass as an omission)."""
    model_config = ConfigDict(extra='forbid', strict=True)


class Query(BaseModel):
    """A query string: values arrive as text; parameters we do not know are ignored."""
    model_config = ConfigDict(extra='ignore')


class Answer(BaseModel):
    """A response body, for the document: fields may be added, never renamed."""
    model_config = ConfigDict(extra='allow')


# ================================================================ errors

class Error(Answer):
    """Every error: a stable code to branch on and a message that says how to fix it."""
    error: str = Field(description='stable code, e.g. not_found, validation_failed, unauthorized')
    message: str
    fields: dict[str, str] | None = Field(None, description='422 validation_failed: {field path: problem}')
    missing_ids: list[int] | None = Field(None, description='404 of POST /messages/delete: ids not found')


def field_errors(exc: ValidationError, prefix: tuple = ()) -> dict[str, str]:
    """pydantic's errors as {'incoming.port': 'must be ...', 'to[0]': '...'}, the first error first."""
    fields: dict[str, str] = {}
    for err in exc.errors(include_url=False):
        fields.setdefault(field_path(prefix + tuple(err['loc'])), describe(err))
    return fields


def field_path(loc: tuple) -> str:
    path = ''
    for part in loc:
        path += f'[{part}]' if isinstance(part, int) else (f'.{part}' if path else str(part))
    return path or 'body'


MESSAGES = {
    'missing': 'is required', 'extra_forbidden': 'is not a known field', 'bool_type': 'must be true or false',
    'bool_parsing': 'must be true or false', 'string_type': 'must be a string', 'int_type': 'must be an integer',
    'int_parsing': 'must be an integer', 'list_type': 'must be a list', 'model_type': 'must be an object',
    'model_attributes_type': 'must be an object', 'dict_type': 'must be an object',
}


# pydantic checks a pattern before any validator of ours: these say what a mismatch means.
PATTERN_HINTS = {PRINTABLE: 'must not contain control characters (line breaks, tabs, NUL)',
                 ONE_LINE: 'must be one line of at most 998 characters', EMAIL.pattern: 'must be an email address',
                 HOST.pattern: 'must be a host name or address'}


def describe(err: dict) -> str:
    kind, ctx = err['type'], err.get('ctx') or {}
    if kind in MESSAGES:
        return MESSAGES[kind]
    if kind == 'literal_error':
        return f'must be {ctx["expected"]}'
    if kind in ('greater_than_equal', 'less_than_equal'):
        return f'must be {"at least" if kind == "greater_than_equal" else "at most"} {ctx.get("ge", ctx.get("le"))}'
    if kind in ('string_too_long', 'too_long'):
        return f'must be at most {ctx.get("max_length")} {"characters" if kind.startswith("string") else "items"}'
    if kind in ('string_too_short', 'too_short'):
        return 'must not be empty'
    if kind == 'string_pattern_mismatch':
        return PATTERN_HINTS.get(ctx.get('pattern'), f'must match {ctx.get("pattern")}')
    message = err['msg']
    return message[:1].lower() + message[1:]


# ================================================================ accounts

class SmtpServer(Body):
    host: Host
    port: Port
    security: Security
    username: Setting
    password: Password


class IncomingServer(SmtpServer):
    protocol: Literal['imap', 'pop3']


# PATCH bodies: a field may be left out, never null (`= None` is "absent": pydantic does not
# validate defaults, and the document shows the type without null).

class SmtpChange(Body):
    """PATCH of an account's SMTP server; an account without one needs every field, as on create."""
    host: Host = None
    port: Port = None
    security: Security = None
    username: Setting = None
    password: Password = None


class IncomingChange(SmtpChange):
    """PATCH: the fields given replace the stored ones. Changing protocol, host, port, security or
    username needs the password in the same request (else a stolen key could send it elsewhere)."""
    protocol: Literal['imap', 'pop3'] = None


class AccountCreate(Body):
    email: Email
    incoming: IncomingServer
    smtp: SmtpServer | None = Field(None, description='null or absent: the account only syncs')
    sync_enabled: bool = Field(True, description='periodic sync, and a first sync at once')
    sync_interval: Annotated[int, Field(ge=60, le=86400)] = Field(300, description='seconds between syncs')
    copy_sent: bool = Field(True, description='append sent mail to the IMAP Sent folder')
    move_spam: bool = Field(False, description='move mail scored as spam to Junk on the server')
    sync_since: Day | None = Field(None, description='older mail is not fetched (IMAP only; null: all mail)')
    push: bool = Field(True, description='IMAP IDLE by a watcher where the server offers it (new mail in seconds)')


class AccountUpdate(Body):
    email: Email = None
    incoming: IncomingChange = None
    smtp: SmtpChange | None = Field(None, description='null removes the SMTP server and its password')
    sync_enabled: bool = None
    sync_interval: Annotated[int, Field(ge=60, le=86400)] = None
    copy_sent: bool = None
    move_spam: bool = None
    sync_since: Day | None = Field(None, description='null: fetch all mail again (an earlier day starts a sync)')
    push: bool = None


class ServerShown(Answer):
    protocol: Literal['imap', 'pop3'] | None = None   # incoming only
    host: str
    port: int
    security: Security
    username: str
    has_password: bool


class Account(Answer):
    id: int
    email: str
    user_id: int
    incoming: ServerShown
    smtp: ServerShown | None
    sync_enabled: bool
    sync_interval: int
    copy_sent: bool
    move_spam: bool
    sync_since: str | None
    push: bool
    push_state: str | None = Field(description='the watcher: connecting, idling, backoff, auth_error, unsupported; '
                                               'null while no watcher holds the account')
    sync_state: str = Field(description='idle, syncing, error or auth_error')
    last_sync_at: str | None
    last_error: str | None
    last_error_code: str | None
    sync_task_id: str | None
    next_sync_at: str | None
    consecutive_failures: int
    created_at: str | None
    updated_at: str | None


class Accounts(Answer):
    items: list[Account]


class SyncBody(Body):
    folder_id: Id | None = None
    force_full_sync: bool = False


class Accepted(Answer):
    """202: the task is on record and queued (a repeated request gets the earlier task)."""
    task_id: str
    status: str = Field(description='pending, or the state of the task already running')


# ================================================================ folders and messages

class Folder(Answer):
    id: int
    name: str
    role: str | None
    total: int
    unread: int


class Folders(Answer):
    items: list[Folder]


class Address(Answer):
    name: str | None
    address: str | None


class Spam(Answer):
    is_spam: bool
    score: float | None
    indicators: list[Any]


class MessageSummary(Answer):
    id: int
    account_id: int
    folder_id: int
    uid: int | None
    subject: str | None
    from_: Address = Field(alias='from')
    to: list[Address]
    date: str | None
    flags: list[str]
    is_read: bool
    is_flagged: bool
    size: int | None
    snippet: str | None
    message_id: str | None
    spam: Spam | None


class Messages(Answer):
    items: list[MessageSummary]
    next_cursor: str | None = Field(description='give it as ?cursor= for the next page; null on the last')


class AttachmentShown(Answer):
    id: int
    filename: str | None
    content_type: str | None
    size: int | None
    content_id: str | None
    disposition: str | None


class Message(MessageSummary):
    cc: list[Address]
    reply_to: list[Address]
    in_reply_to: str | None
    references: Any
    headers: list[list[Any]]
    text: str | None
    html: str | None
    parse_error: str | None
    attachments: list[AttachmentShown]


class MessageQuery(Query):
    account_id: QueryInt(1, MAX_FILTER_ID) | None = None
    folder_id: QueryInt(1, MAX_FILTER_ID) | None = None
    unread: QueryBool | None = None
    flagged: QueryBool | None = None
    from_: Filter | None = Field(None, alias='from', description='part of the sender\'s address or name')
    q: Filter | None = Field(None, description='part of the subject, sender address or name')
    since: Time | None = None
    until: Time | None = None
    cursor: QueryInt(1, MAX_FILTER_ID) | None = None
    limit: QueryInt(1, 500) = 50


class DeleteBody(Body):
    email_ids: Annotated[list[Id], Field(min_length=1, max_length=5000)]
    permanent: bool = False


class ReportBody(Body):
    verdict: Literal['spam', 'ham']


# ================================================================ sending

class SendBody(Body):
    to: Annotated[list[Recipient], Field(max_length=500)] | None = None
    cc: Annotated[list[Recipient], Field(max_length=500)] | None = None
    bcc: Annotated[list[Recipient], Field(max_length=500)] | None = None
    subject: Subject | None = None
    body_text: Text | None = None
    body_html: Text | None = None
    attachment_ids: list[Id] | None = Field(None, description='ids from POST /api/v1/attachments')


class Upload(Answer):
    id: int
    filename: str
    content_type: str
    size: int


class UploadQuery(Query):
    filename: Annotated[str, Field(max_length=1000), AfterValidator(unicode_text)] | None = Field(
        None, description='the file name, with a raw (non-multipart) body')


# ================================================================ tasks

class Progress(Answer):
    done: int | None
    total: int | None


class Task(Answer):
    task_id: str
    name: str
    state: Literal['pending', 'running', 'retrying', 'succeeded', 'failed', 'dead', 'revoked']
    attempts: int
    priority: int | None
    tenant_id: int | None
    user_id: int | None
    enqueued_at: str | None
    started_at: str | None
    finished_at: str | None
    next_retry_at: str | None
    worker: str | None
    progress: Progress | None
    result: Any
    error: str | None
    request_id: str | None
    args: Any


class Tasks(Answer):
    items: list[Task]
    next_cursor: str | None


class TaskQuery(Query):
    state: Literal['pending', 'running', 'retrying', 'succeeded', 'failed', 'dead', 'revoked'] | None = None
    name: Filter | None = None
    since: Time | None = None
    cursor: Filter | None = Field(None, description='the last task id of the previous page')
    limit: QueryInt(1, 500) = 50


# ================================================================ change feed and webhooks

EventType = Literal['message.created', 'message.updated', 'message.deleted', 'folder.created', 'folder.deleted',
                    'send.succeeded', 'send.failed', 'send.unknown', 'account.sync_failed', 'account.auth_error',
                    'account.recovered', 'account.deleted', 'task.dead']


def webhook_url(value: str) -> str:
    problem = webhooks.check_url(value)
    if problem:
        raise fail(problem)
    return value


WebhookUrl = Annotated[str, Field(min_length=1, max_length=2000, pattern=PRINTABLE), AfterValidator(unicode_text),
                       AfterValidator(webhook_url)]


class EventQuery(Query):
    after: Filter | None = Field(None, description='an event id or next_cursor (evt_...), or now; absent: the '
                                                   'oldest kept')
    types: Filter | None = Field(None, description='comma-separated event types; absent: every type')
    limit: QueryInt(1, 1000) = 100
    wait: QueryInt(0, 3600) = Field(0, description='seconds to long-poll while nothing comes (capped by '
                                                   'events.max_wait)')


class Event(Answer):
    id: str
    type: EventType
    created_at: str | None
    account_id: int | None
    data: dict


class Events(Answer):
    items: list[Event]
    next_cursor: str


class WebhookCreate(Body):
    url: WebhookUrl
    events: list[EventType] = Field([], description='empty or absent: every type')
    enabled: bool = True


class WebhookUpdate(Body):
    url: WebhookUrl = None
    events: list[EventType] = None
    enabled: bool = None


class Webhook(Answer):
    id: int
    url: str
    events: list[str]
    enabled: bool
    cursor: str
    failures: int
    failing_since: str | None
    last_error: str | None
    disabled_reason: str | None
    next_attempt_at: str | None
    previous_secret_expires_at: str | None
    created_at: str | None
    updated_at: str | None
    secret: str | None = Field(None, description='whsec_...: only in the answer that made it (create, rotate)')


class Webhooks(Answer):
    items: list[Webhook]


class DeliveryQuery(Query):
    cursor: QueryInt(1, MAX_ID) | None = Field(None, description='the last delivery id of the previous page')
    limit: QueryInt(1, 500) = 50


class Delivery(Answer):
    id: int
    webhook_id: int
    event_id: str
    event_type: str
    attempt: int
    status: str
    response_code: int | None
    error: str | None
    duration_ms: int | None
    redelivery: bool
    created_at: str | None


class Deliveries(Answer):
    items: list[Delivery]
    next_cursor: str | None


# ================================================================ health

class Health(Answer):
    status: Literal['ok']


class Check(Answer):
    ok: bool
    error: str | None = None


class HealthDetailed(Answer):
    status: Literal['ok', 'degraded']
    reasons: list[str]
    database: Check
    broker: Check
    consumers: dict[str, Any]
    queue: dict[str, Any]


# ================================================================ validation

def validate(model: type[BaseModel], data: Any, prefix: tuple = ()) -> tuple[BaseModel | None, dict[str, str]]:
    """(the model, {}) or (None, {field: problem}) for data from a request."""
    try:
        return model.model_validate(data), {}
    except ValidationError as exc:
        return None, field_errors(exc, prefix)


# ================================================================ the route table and the OpenAPI document

@dataclasses.dataclass
class Route:
    """One operation as the document shows it; emailsvc's route decorators fill the table."""
    method: str
    rule: str                          # Bottle's rule: /api/v1/accounts/<client_id:int>
    name: str                          # the handler's name: the operationId
    doc: str                           # the handler's docstring: summary (first line) and description
    auth: str                          # 'user', 'operator', 'any' (either key), 'none', 'metrics'
    body: type[Body] | None = None
    query: type[Query] | None = None
    answers: dict = dataclasses.field(default_factory=dict)    # status: model, None (no body) or (type, schema)
    errors: dict = dataclasses.field(default_factory=dict)     # status: the codes it may carry, in words
    headers: dict = dataclasses.field(default_factory=dict)    # name: (schema, description)
    request: dict | None = None        # a request body that is not JSON: {media type: schema}


ROUTES: list[Route] = []
AUTH_TEXT = {'user': 'a user key (an operator key gets 403)', 'operator': 'an operator key',
             'any': 'a user or an operator key', 'none': 'no key', 'metrics': 'an operator key, or a client '
             'address in metrics.allowed_networks'}
BINARY = {'type': 'string', 'format': 'binary'}
PATH_PARAMETER = re.compile(r'<([a-z_]+)(?::(int))?>')


def openapi_path(rule: str) -> str:
    return PATH_PARAMETER.sub(r'{\1}', rule)


def standard_errors(route: Route) -> dict:
    """The errors every route of its kind can answer, before its own (route.errors) are added."""
    errors = {}
    if route.body or route.request:
        errors[400] = 'invalid_json: the body is not JSON (or not readable multipart)'
        errors[413] = 'too_large: the body is over the limit'
        errors[422] = 'validation_failed: `fields` names each wrong field; invalid_body: not a JSON object'
    if route.query:
        errors[422] = (errors.get(422, '') + '; ' if 422 in errors else '') + 'invalid_filter: a query parameter is wrong'
    if route.auth not in ('none',):
        errors[401] = 'unauthorized: no key, an unknown or a revoked key'
    if route.auth in ('user', 'operator', 'metrics'):
        errors[403] = f'forbidden: this needs {AUTH_TEXT[route.auth]}'
    if PATH_PARAMETER.search(route.rule):
        errors[404] = 'not_found: no such object among the caller\'s (another tenant\'s is 404 too)'
    if route.auth != 'none':
        errors[503] = 'unavailable: the database or the queue is unreachable; retry shortly'
    return errors


def document(title: str, version: str, description: str) -> dict:
    """The OpenAPI 3.1 document of every route in ROUTES."""
    models = {Error}
    for route in ROUTES:
        models |= {m for m in (route.body, *route.answers.values()) if isinstance(m, type)}
    _, schemas = models_json_schema([(m, 'validation') for m in sorted(models, key=lambda m: m.__name__)],
                                    ref_template='#/components/schemas/{model}')
    for schema in schemas.get('$defs', {}).values():
        tidy(schema)
    paths: dict = {}
    for route in ROUTES:
        paths.setdefault(openapi_path(route.rule), {})[route.method.lower()] = operation(route)
    return {'openapi': '3.1.0',
            'info': {'title': title, 'version': version, 'description': description},
            'paths': paths,
            'components': {'schemas': schemas.get('$defs', {}),
                           'securitySchemes': {'apiKey': {'type': 'http', 'scheme': 'bearer',
                                                          'description': 'Authorization: Bearer <api key>'}}}}


def tidy(schema: dict) -> None:
    """Drop pydantic's generated titles, and the `default: null` of PATCH fields that may be absent but
    never null (a client reading it would send null and get a 422)."""
    schema.pop('title', None)
    for prop in schema.get('properties', {}).values():
        prop.pop('title', None)
        nullable = any(option.get('type') == 'null' for option in prop.get('anyOf', ()))
        if 'default' in prop and prop['default'] is None and not nullable:
            del prop['default']


def operation(route: Route) -> dict:
    summary, _, description = route.doc.strip().partition('\n')
    op = {'operationId': route.name, 'summary': summary.strip() or route.name.replace('_', ' ').capitalize(),
          'tags': [route.rule.split('/')[3] if route.rule.startswith('/api/v1/') else route.rule.split('/')[1]],
          'parameters': parameters(route), 'responses': responses(route)}
    description = ' '.join(line.strip() for line in description.splitlines()).strip()
    op['description'] = f'{description}\n\nAuthorization: {AUTH_TEXT[route.auth]}.'.strip()
    if route.auth == 'none':
        op['security'] = []
    elif route.auth == 'metrics':
        op['security'] = [{'apiKey': []}, {}]
    else:
        op['security'] = [{'apiKey': []}]
    if route.body:
        required = bool(route.body.model_json_schema().get('required'))
        op['requestBody'] = {'required': required, 'content': {'application/json': {
            'schema': {'$ref': f'#/components/schemas/{route.body.__name__}'}}}}
    elif route.request:
        op['requestBody'] = {'required': True, 'content': route.request}
    return op


def parameters(route: Route) -> list:
    found = []
    for name, kind in PATH_PARAMETER.findall(route.rule):
        schema = {'type': 'integer', 'minimum': 1, 'maximum': MAX_ID} if kind == 'int' else \
            {'type': 'string', 'minLength': 1, 'maxLength': 64}
        found.append({'name': name, 'in': 'path', 'required': True, 'schema': schema})
    if route.query:
        schema = route.query.model_json_schema(by_alias=True)
        for name, prop in schema['properties'].items():
            found.append({'name': name, 'in': 'query', 'required': name in schema.get('required', ()),
                          'description': prop.pop('description', ''), 'schema': not_null(prop)})
    for name, (schema, description) in route.headers.items():
        found.append({'name': name, 'in': 'header', 'required': False, 'description': description, 'schema': schema})
    return found


def not_null(prop: dict) -> dict:
    """A query parameter is absent or a value: pydantic's anyOf [X, null] becomes X."""
    options = [option for option in prop.pop('anyOf', []) if option.get('type') != 'null']
    if options:
        prop.update(options[0])
    prop.pop('title', None)
    prop.pop('default', None) if prop.get('default') is None else None
    return prop


def responses(route: Route) -> dict:
    answers = {}
    for status, answer in route.answers.items():
        if answer is None:
            answers[str(status)] = {'description': 'done; no content'}
        elif isinstance(answer, tuple):
            media_type, schema = answer
            answers[str(status)] = {'description': 'the content', 'content': {media_type: {'schema': schema}}}
        else:
            answers[str(status)] = {'description': answer.__doc__.strip().split('\n')[0] if answer.__doc__ and
                                    answer.__doc__ != Answer.__doc__ else answer.__name__,
                                    'content': {'application/json': {'schema': {
                                        '$ref': f'#/components/schemas/{answer.__name__}'}}}}
    errors = standard_errors(route)
    for status, codes in route.errors.items():
        errors[status] = f'{errors[status]}; {codes}' if status in errors else codes
    for status, codes in sorted(errors.items()):
        answers[str(status)] = {'description': codes, 'content': {'application/json': {
            'schema': {'$ref': '#/components/schemas/Error'}}}}
    return answers


# ================================================================ the reference page's view of a schema

def ref_name(schema: dict) -> str | None:
    ref = schema.get('$ref', '')
    return ref.rsplit('/', 1)[-1] if ref else None


def type_html(schema: dict) -> str:
    """type_text as HTML for the reference page, each schema name a link to its table."""
    return re.sub(r'\x00(\w+)\x00', r'<a href="#schema-\1">\1</a>', html.escape(type_text(schema, marked=True)))


def type_text(schema: dict, marked: bool = False) -> str:
    """A schema in a few words: 'integer 1..65535', 'list of Address', ... (`marked`: names in NULs)."""
    if '$ref' in schema:
        return f'\x00{ref_name(schema)}\x00' if marked else ref_name(schema)
    if 'anyOf' in schema:
        return ' or '.join(type_text(option, marked) for option in schema['anyOf'])
    if 'const' in schema:
        return repr(schema['const'])
    if 'enum' in schema:
        return ' | '.join(map(repr, schema['enum']))
    kind = schema.get('type', 'any')
    if kind == 'array':
        return f'list of {type_text(schema.get("items", {}), marked)}' + bounds(schema, 'minItems', 'maxItems', ' items')
    if kind == 'object' and 'additionalProperties' in schema and isinstance(schema['additionalProperties'], dict):
        return f'object of {type_text(schema["additionalProperties"], marked)}'
    text = schema.get('format', kind) if kind == 'string' else kind
    if kind in ('integer', 'number'):
        text += bounds(schema, 'minimum', 'maximum', '')
    elif kind == 'string':
        text += bounds(schema, 'minLength', 'maxLength', ' chars')
    return text


def bounds(schema: dict, low_key: str, high_key: str, unit: str) -> str:
    low, high = schema.get(low_key), schema.get(high_key)
    if low is None and high is None:
        return ''
    return f' {"" if low is None else low}..{"" if high is None else high}{unit}'
