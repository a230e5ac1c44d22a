"""Queue plumbing for Huey: a signed JSON serializer and a SQLite queue that wakes.

Payloads on the broker are JSON signed with HMAC-SHA256 under the service
secret, never pickle: a payload that is unsigned, signed with another key,
altered, or not our JSON is refused with `PayloadRefused` before anything in it
is interpreted. Huey drops a message it cannot read and keeps running.

`WakingSqliteStorage` removes the polling delay of the embedded queue. Huey's
SQLite workers poll with a backoff that reaches seconds when idle; here an
enqueue writes one byte into a FIFO beside the queue file and idle workers
wait on it with poll(), so a task starts within a millisecond of its enqueue
however long the queue was idle. The FIFO is only a doorbell: the task itself
is in the database, so a lost or spurious ring costs at most `read_timeout`.
"""
import datetime
import errno
import hashlib
import hmac
import json
import logging
import os
import select
import stat

from huey.registry import Message
from huey.serializer import Serializer
from huey.constants import EmptyData
from huey.storage import RedisPriorityQueue, SqliteStorage
from huey.utils import Error

logger = logging.getLogger('emailsvc.queue')

MAGIC = b'esv1:'


class PayloadRefused(ValueError):
    """A queue payload is not signed JSON of ours; it is dropped, never run."""


class SignedJsonSerializer(Serializer):
    def __init__(self, secret):
        super().__init__()
        self._key = hashlib.sha256(b'emailsvc task payload:' + secret.encode()).digest()

    def _sign(self, body):
        return hmac.new(self._key, body, hashlib.sha256).hexdigest().encode()

    def serialize(self, data):
        body = json.dumps(encode(data), separators=(',', ':')).encode()
        return MAGIC + self._sign(body) + b':' + body

    def deserialize(self, data):
        data = bytes(data)
        if not data.startswith(MAGIC):
            raise self._refuse('not a signed emailsvc payload', data)
        signature, _, body = data[len(MAGIC):].partition(b':')
        if not hmac.compare_digest(signature, self._sign(body)):
            raise self._refuse('bad signature', data)
        return decode(json.loads(body))

    @staticmethod
    def _refuse(reason, data):
        logger.error('refused queue payload: %s (%d bytes)', reason, len(data))
        return PayloadRefused(f'refused queue payload: {reason}')


# JSON has no tuple, datetime or Huey message; tag them so they come back whole.

def encode(value):
    if isinstance(value, Message):
        return {'$msg': [encode(v) for v in value]}
    if isinstance(value, Error):
        return {'$err': encode(value.metadata)}
    if isinstance(value, tuple):
        return {'$tuple': [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, datetime.datetime):
        return {'$dt': value.isoformat()}
    if isinstance(value, datetime.timedelta):
        return {'$td': value.total_seconds()}
    return value


DECODERS = {
    '$msg': lambda v: Message(*[decode(x) for x in v]),
    '$err': lambda v: Error(decode(v)),
    '$tuple': lambda v: tuple(decode(x) for x in v),
    '$dt': datetime.datetime.fromisoformat,
    '$td': lambda v: datetime.timedelta(seconds=v),
}


def decode(value):
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1:
            (tag, inner), = value.items()
            if tag in DECODERS:
                return DECODERS[tag](inner)
        return {k: decode(v) for k, v in value.items()}
    return value


class WakingSqliteStorage(SqliteStorage):
    """SqliteStorage whose idle workers sleep on a FIFO doorbell instead of polling."""
    blocking = True

    def __init__(self, *args, read_timeout=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout
        self.bell_path = f'{self.filename}.bell'
        self._bell_reader = None
        self._bell_writer = None
        make_fifo(self.bell_path)

    def enqueue(self, data, priority=None):
        super().enqueue(data, priority)
        self.ring()

    def dequeue(self):
        data = super().dequeue()
        if data is None and self.wait_for_bell():
            data = super().dequeue()
        return data

    def _create_connection(self):
        conn = super()._create_connection()
        # Huey leaves WAL at synchronous=FULL, an fsync per commit (1.6 ms
        # here, most of a task's cost). NORMAL is what SQLite recommends with
        # WAL: a killed process loses nothing; only an OS crash or power loss
        # can lose the last commits, never corrupt the file.
        conn.execute('pragma synchronous=NORMAL')
        return conn

    def pop_data(self, key):
        # Huey pops every task's revoke key after it runs, and SQLite's pop
        # takes the exclusive write lock; nearly always there is nothing to
        # pop, and a read under WAL sees that without blocking any writer.
        if self.peek_data(key) is EmptyData:
            return EmptyData
        return super().pop_data(key)

    def ring(self):
        """Wake idle workers; harmless when none is listening."""
        try:
            if self._bell_writer is None:
                # O_NONBLOCK: opening for writing fails at once (ENXIO) when no
                # consumer has it open, instead of blocking the web request.
                self._bell_writer = os.open(self.bell_path, os.O_WRONLY | os.O_NONBLOCK)
            os.write(self._bell_writer, b'\0')
        except BlockingIOError:
            return  # the pipe is full of rings nobody read yet: workers are busy anyway
        except OSError as exc:
            if exc.errno not in (errno.ENXIO, errno.EPIPE, errno.EBADF):
                raise
            self._close_writer()  # no consumer running; try again on the next ring

    def wait_for_bell(self):
        """Wait up to read_timeout for a ring; True if one came."""
        if self._bell_reader is None:
            # O_RDWR keeps a writer open on our side, so poll() does not report
            # a hang-up (and spin) while no web process has the FIFO open.
            self._bell_reader = os.open(self.bell_path, os.O_RDWR | os.O_NONBLOCK)
        ready, _, _ = select.select([self._bell_reader], [], [], self.read_timeout)
        if not ready:
            return False
        try:
            os.read(self._bell_reader, 4096)
        except BlockingIOError:
            return True  # another worker took the ring first; look anyway
        return True

    def _close_writer(self):
        if self._bell_writer is not None:
            os.close(self._bell_writer)
            self._bell_writer = None

    def close(self):
        self._close_writer()
        if self._bell_reader is not None:
            os.close(self._bell_reader)
            self._bell_reader = None
        return super().close()


def make_fifo(path):
    try:
        os.mkfifo(path, 0o600)
    except FileExistsError:
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            raise RuntimeError(f'{path} exists and is not a FIFO; remove it') from None


def depth_by_priority(storage, priorities):
    """{priority: waiting tasks}, counted in the broker without reading payloads."""
    if isinstance(storage, SqliteStorage):
        rows = storage.sql('select priority, count(*) from task where queue = ? group by priority',
                           (storage.name,), results=True)
        return {int(priority): count for priority, count in rows}
    if isinstance(storage, RedisPriorityQueue):
        # The sorted set's score is the negated priority (huey.storage.RedisPriorityQueue).
        with storage.conn.pipeline(transaction=False) as pipe:
            for priority in priorities:
                pipe.zcount(storage.queue_key, -priority, -priority)
            pipe.zcard(storage.queue_key)
            *counts, total = pipe.execute()
        depth = dict(zip(priorities, counts))
        if total > sum(counts):
            depth[0] = total - sum(counts)  # priorities outside the service's own
        return depth
    raise TypeError(f'no queue depth for {type(storage).__name__}')
