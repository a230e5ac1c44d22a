"""Structured JSON logs with the request id that caused them.

A `request_id` is set when an HTTP request arrives, travels inside the task
payload, and is set again in the worker that runs the task, so every line a
request causes, in any process, can be found by one id.
"""
import contextvars
import json
import logging
import sys
import time
import traceback
import uuid

request_id = contextvars.ContextVar('request_id', default=None)
task_id = contextvars.ContextVar('task_id', default=None)

# Names whose values never reach a log line, whatever a caller passes in `extra`.
SECRET_WORDS = ('password', 'secret', 'token', 'authorization', 'api_key')


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, ids, extras."""

    RESERVED = set(vars(logging.makeLogRecord({}))) | {'message', 'asctime'}

    def format(self, record):
        entry = {
            'ts': time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(record.created)) + f'.{int(record.msecs):03d}Z',
            'level': record.levelname,
            'logger': record.name,
            'message': record.getMessage(),
        }
        for name, var in (('request_id', request_id), ('task_id', task_id)):
            if var.get():
                entry[name] = var.get()
        for key, value in vars(record).items():
            if key not in self.RESERVED and not key.startswith('_'):
                entry[key] = '[redacted]' if any(w in key.lower() for w in SECRET_WORDS) else value
        if record.exc_info:
            entry['traceback'] = ''.join(traceback.format_exception(*record.exc_info))
        return json.dumps(entry, default=str)


def configure(level='INFO', stream=None):
    """Send every logger to `stream` (stderr) as JSON lines; nothing to do if they go there already.

    (A forked worker inherits its consumer's logging. Setting the level again
    clears every logger's cache, which copies their shared pages into it.)
    """
    root = logging.getLogger()
    if len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, JsonFormatter) \
            and getattr(root.handlers[0], 'stream', None) is (stream or sys.stderr) \
            and root.level == logging.getLevelName(level):
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [handler]
    root.setLevel(level)


def new_request_id():
    return uuid.uuid4().hex[:16]

