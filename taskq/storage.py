"""Queue plumbing for Huey: a signed JSON serializer, lanes, tenant turns and a SQLite queue that wakes.

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

Lanes. Each lane (sync, send, delete, spam, periodic, webhooks: config.ini's
[lanes]) is a queue of its own in the same broker: a Redis sorted set
`huey.redis.<name>.<lane>`, or the rows of Huey's SQLite task table whose
`queue` column is `<name>.<lane>`. Everything else Huey keeps in its storage,
the schedule (delayed tasks, retries), revoke marks and locks, stays under the
one queue name and is shared by every lane, so revoking, retrying, recovery and
`lock_task` work the same whichever lane a task runs in. A worker pops from its
lane only, so a backlog in one lane never holds another.

Turns. Within a lane, a task's place is its priority first, then its tenant's
turn: start-time fair queueing (Goyal et al., 1996) with rounds for tags. The
n-th task a tenant has waiting in a priority band gets turn max(h, last + 1),
where h is the lowest turn still waiting in the band and last the tenant's
previous turn there; when the band has drained every tenant starts at 1 again.
So a tenant that queues 2,000 tasks takes turns 1..2,000, and another tenant's
task queued after them gets the turn at the head of the line: at most one task
of each other tenant runs before it. Ties keep enqueue order (Huey's time prefix
in Redis, the row id in SQLite). A task's score encodes both: priority * TURNS
minus the turn (SQLite's `priority desc`), or its negation (Redis's ZPOPMIN),
exact in a double while priorities stay within 0..1000. The turn is given in
the enqueue's one round trip (a Lua script in Redis, one transaction in
SQLite), and dequeues are Huey's own: fairness costs the hot path nothing.
Turns, not a cap on each tenant's running tasks: a cap leaves the line's order
as it is (a worker would pop and put back each of tenant A's 2,000 tasks to
reach tenant B's one) and idles workers when only one tenant has work.
"""
import contextlib
import datetime
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import mmap
import os
import re
import select
import stat
import struct
import threading
import time

from huey.registry import Message
from huey.serializer import Serializer
from huey.constants import EmptyData
from huey.storage import PriorityRedisStorage, SqliteStorage
from huey.utils import Error
import redis
from redis.exceptions import NoScriptError

logger = logging.getLogger('emailsvc.queue')

MAGIC = b'esv1:'


class PayloadRefused(ValueError):
    """A queue payload is not signed JSON of ours; it is dropped, never run."""


class SignedJsonSerializer(Serializer):
    def __init__(self, secret):
        super().__init__()
        self._key = hashlib.sha256(b'emailsvc task payload:' + secret.encode()).digest()

    def _sign(self, body):
        # hmac.digest: one call into OpenSSL, no HMAC object per payload.
        return hmac.digest(self._key, body, 'sha256').hex().encode()

    def serialize(self, data):
        body = COMPACT_JSON(encode(data)).encode()
        return MAGIC + self._sign(body) + b':' + body

    def deserialize(self, data):
        data = bytes(data)
        if not data.startswith(MAGIC):
            raise self._refuse('not a signed emailsvc payload', data)
        signature, _, body = data[len(MAGIC):].partition(b':')
        if not hmac.compare_digest(signature, self._sign(body)):
            raise self._refuse('bad signature', data)
        return json.loads(body, object_hook=decode_object)

    @staticmethod
    def _refuse(reason, data):
        logger.error('refused queue payload: %s (%d bytes)', reason, len(data))
        return PayloadRefused(f'refused queue payload: {reason}')


# One encoder for every payload: json.dumps with separators builds a new one per call.
COMPACT_JSON = json.JSONEncoder(separators=(',', ':')).encode

# JSON has no tuple, datetime or Huey message; tag them so they come back whole.
# Most of a message is strings, numbers and None, which JSON takes as they are:
# those are told by their exact type in one look (a task's message is ~18
# values, each of which went through seven isinstance checks).
PLAIN = frozenset((str, int, float, bool, type(None)))


def encode(value):
    if type(value) in PLAIN:
        return value
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


# json.loads calls this for each object, innermost first, so the tagged values
# inside come back already decoded; the parser walks the rest in C (a walk in
# Python over every value cost as much as the parse and the signature check).
DECODERS = {
    '$msg': lambda v: Message(*v),
    '$err': Error,
    '$tuple': tuple,
    '$dt': datetime.datetime.fromisoformat,
    '$td': lambda v: datetime.timedelta(seconds=v),
}


def decode_object(value):
    if len(value) == 1:
        (tag, inner), = value.items()
        decoder = DECODERS.get(tag)
        if decoder is not None:
            return decoder(inner)
    return value


# ---------------------------------------------------------------- a worker about to wait

# Run when a worker's queue has been empty for LINGER: what a busy worker
# keeps back to send with its next statement (taskq.ledger: a run's held final
# write) must not wait on an empty queue for long. Registered by the layer
# above, which this one does not import.
BEFORE_WAIT = []

# Seconds a worker whose lane ran dry waits for the next task before making
# what it holds. With more idle workers than tasks arriving (three consumers on
# one queue), each worker's next task came ~5 ms later: lingering keeps the held
# write for the next claim's round trip, where making it at once cost a
# statement per task. It delays only the held write: the wait for work has begun.
LINGER = 0.005


def before_wait():
    for hook in BEFORE_WAIT:
        hook()


def linger(connection):
    """While a blocking pop is on its way: before_wait() once no answer came within LINGER. A task
    the pop takes must still be read and run, so what goes wrong in before_wait() is logged, not raised."""
    if connection.can_read(timeout=LINGER):
        return
    try:
        before_wait()
    except Exception:
        logger.exception('a held write before waiting for work failed')


# ---------------------------------------------------------------- idle workers of one host

PARK_FIRST = 0.01   # seconds of a parked worker's first pause while a holder runs a task; each next one
PARK_LAST = 0.1     # doubles, up to this
PARK_IDLE = 0.5     # its pause while every holder waits for work (each wake costs ~150 us of CPU here)
BUSY = 0.02         # a holder in one task this long is busy: parked workers look for work
GONE = 3.0          # a holder unchanged this long (a waiting one marks every read_timeout) is gone or stopped
WAITING, RUNNING = 1, 2
SLOT = struct.Struct('<IB3x')   # a holder's marks in the state file: a counter bumped at each mark, its state


class WaitingSlots:
    """At most `count` of a lane's idle workers on one host wait for its next task; the others park.

    A task goes to a worker waiting for it: in Redis the one that has waited
    longest (blocked clients are served oldest first), on SQLite's bell one that
    epoll picks. With more idle workers than tasks arriving (three consumers on
    one host, each with the lane's workers) every task woke the coldest worker,
    its caches and its database backend cold: three consumers ran 0.82-0.98x
    the tasks/s of one on this 2-core machine. Here a worker waits for work only
    while it holds one of `count` slots, lock files under var/ (flock: a killed
    holder's slot is free at once), and keeps it across tasks, so short tasks go
    to the same warm workers, as with one consumer.

    A holder marks in a shared state file (mmap) whether it waits for work or
    runs a task. A worker without a slot parks: it pauses (PARK_IDLE while every
    holder waits; while one runs a task PARK_FIRST, doubling up to PARK_LAST),
    reads the marks, and looks for a task without waiting only when no holder
    can take one soon: each is in one task for BUSY or more (syncs, sends) or
    has not marked for GONE (stopped by SIGSTOP, or dead and its slot free,
    which the parked worker then takes). So tasks keep moving when every holder
    is busy or stopped, and while the holders keep up a parked worker costs a
    wake every PARK_IDLE. `count` is the lane's workers in one consumer
    (config.ini [lanes]): one consumer on a host parks nobody. Only workers take
    slots (a consumer's main process never does: a forked child would share the
    lock).
    """

    def __init__(self, directory, name, count):
        self.directory, self.name, self.count = directory, name, count
        self._state, self._state_pid = None, None
        self._threads = {}   # (pid, thread) -> Parked, or the slot number it holds

    def wait_turn(self):
        """True if this thread holds a slot (wait for work); else False, after a parked pause."""
        key = (os.getpid(), threading.get_ident())
        mine = self._threads.get(key)
        if isinstance(mine, int):
            return True
        if mine is None:   # a thread's first turn: any free slot
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            mine = self._threads[key] = Parked(self.count)
            if self._take(key, range(self.count)):
                return True
        before_wait()   # the pause may be long: make what the worker holds first
        PAUSE.wait(mine.pause)
        marks = self._marks()
        stuck = mine.stuck(marks, time.monotonic())
        if self._take(key, stuck):
            return True
        mine.look = len(stuck) == self.count
        running = any(state == RUNNING for _, state in marks)
        mine.pause = min(mine.pause * 2, PARK_LAST) if running else PARK_IDLE
        return False

    def look(self, pop):
        """A parked thread's look for a task: pop() without waiting when no holder can take one soon;
        when it finds one, the next pause is short again."""
        mine = self._threads[(os.getpid(), threading.get_ident())]
        if not mine.look:
            return None
        data = pop()
        if data is not None:
            mine.pause = PARK_FIRST
        return data

    def mark(self, state):
        """A holder's mark: WAITING for work, or RUNNING a task."""
        number = self._threads.get((os.getpid(), threading.get_ident()))
        if isinstance(number, int):
            state_map = self._state_map()
            counter, _ = SLOT.unpack_from(state_map, number * SLOT.size)
            SLOT.pack_into(state_map, number * SLOT.size, (counter + 1) & 0xFFFFFFFF, state)

    def _marks(self):
        state_map = self._state_map()
        return [SLOT.unpack_from(state_map, number * SLOT.size) for number in range(self.count)]

    def _take(self, key, numbers):
        for number in numbers:
            fd = os.open(self._path(number), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._threads[key] = number   # the descriptor stays open: it holds the lock
            self.mark(WAITING)
            return True
        return False

    def _path(self, suffix):
        return os.path.join(self.directory, f'{self.name}.{suffix}')

    def _state_map(self):
        if self._state_pid != os.getpid():
            fd = os.open(self._path('state'), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                size = SLOT.size * self.count
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
                self._state, self._state_pid = mmap.mmap(fd, size), os.getpid()
            finally:
                os.close(fd)
        return self._state


def next_task(waiting, pop_now, wait, first_pop=None):
    """A worker's next task (payload) or None: popped at once (`first_pop`, by default `pop_now`), or
    waited for while the worker holds a slot (`waiting`); a parked worker only looks (`pop_now`),
    after its pause."""
    if not waiting.wait_turn():
        return waiting.look(pop_now)
    data = (first_pop or pop_now)()
    if data is None:
        waiting.mark(WAITING)
        data = wait()
    if data is not None:
        waiting.mark(RUNNING)
    return data


class Parked:
    """What a parked thread saw of the holders: each slot's last marks and since when (its own clock)."""

    def __init__(self, count):
        self.pause, self.look = PARK_FIRST, False
        self.seen = [None] * count
        self.since = [0.0] * count

    def stuck(self, marks, now):
        """Slots whose holder cannot take a task soon: in one task for BUSY, or unchanged for GONE."""
        stuck = []
        for number, marked in enumerate(marks):
            if marked != self.seen[number]:
                self.seen[number], self.since[number] = marked, now
            elif now - self.since[number] >= (BUSY if marked[1] == RUNNING else GONE):
                stuck.append(number)
        return stuck


class EveryWorkerWaits:
    """No slots: every idle worker waits for work (a storage outside a service, tools and tests)."""

    @staticmethod
    def wait_turn():
        return True

    @staticmethod
    def look(pop):
        return pop()

    @staticmethod
    def mark(state):
        pass


# ---------------------------------------------------------------- turns within a lane

TURNS = 2 ** 32  # turns one priority band holds; see the module docstring


def band(priority):
    """The priority a task is queued at: None is 0, and the score must stay exact (0..1000)."""
    return max(0, min(int(priority or 0), 1000))


def tenant_key(tenant):
    return '' if tenant is None else str(tenant)


# KEYS: the lane's sorted set, the band's turns (tenant -> last turn); ARGV: member, priority, tenant.
ENQUEUE_LUA = f"""
local base = -tonumber(ARGV[2]) * {TURNS}
local head = redis.call('ZRANGEBYSCORE', KEYS[1], base, '(' .. (base + {TURNS}), 'WITHSCORES', 'LIMIT', 0, 1)
local turn = 1
if head[1] then
  local last = tonumber(redis.call('HGET', KEYS[2], ARGV[3]) or '0')
  turn = math.max(tonumber(head[2]) - base, last + 1)
else
  redis.call('DEL', KEYS[2])
end
redis.call('HSET', KEYS[2], ARGV[3], turn)
redis.call('ZADD', KEYS[1], base + turn, ARGV[1])
"""


# KEYS: the lane's sorted set, Huey's key-value hash; ARGV: revoke marks to drop first (the last run's).
# Returns nil, or the member and the task's two revoke marks (its own, its class's) as Huey reads them.
POP_LUA = """
if #ARGV > 0 then redis.call('HDEL', KEYS[2], unpack(ARGV)) end
local popped = redis.call('ZPOPMIN', KEYS[1])
if not popped[1] then return false end
local id, name = string.match(popped[1], '"%$msg":%["([^"]+)","([^"]+)"')
if not id then return {popped[1]} end
local marks = redis.call('HMGET', KEYS[2], 'r:' .. id, 'rt:' .. name)
return {popped[1], marks[1], marks[2]}
"""


# The task id and name, the first two fields of the signed envelope's message
# (POP_LUA reads them the same way): the keys of the task's revoke marks.
MESSAGE_NAMES = re.compile(rb'"\$msg":\["([^"]+)","([^"]+)"')


class Pusher:
    """A producer's own Redis connection for its pushes, one per process, shared by its threads.

    Each command through the pool takes a connection out and puts it back: a
    lock, four observability counters, and a poll(2) that checks the connection
    has nothing unread, ~20 us of an enqueue's CPU (measured). Pushes go over a
    connection this process keeps instead (redis-py's single-connection client:
    a lock around each command, the same retries and reconnects). Made at the
    first push, so a process starts while Redis is down; made again in a forked
    child, which must not share its parent's socket.
    """

    def __init__(self, pool):
        self.pool = pool
        self._client, self._pid = None, None
        self._lock = threading.Lock()

    def client(self):
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._client = redis.Redis(connection_pool=self.pool, single_connection_client=True)
                    self._pid = os.getpid()
        return self._client


class OwnConnection:
    """A worker's own Redis connection for its pops, one per process (made again in a forked child).

    Through the pool and redis-py's command wrappers each pop costs a checkout
    (a lock, observability counters, a poll(2)), the retry and deprecation
    wrappers and the Script object: 72 us of a busy worker's CPU per pop,
    35 us sent and read here (measured, 20,000 pops). Commands are sent at once
    and their answers read in order, so a pipeline is one write and one wait,
    and `while_waiting` runs between them (see LINGER). A connection the server
    closed while it sat idle (a restart) is noticed before sending, as the pool
    does; any other failure drops the connection, whose unread answers would
    otherwise be read as the next command's.
    """

    def __init__(self, pool):
        self.pool = pool
        self._connection, self._pid = None, None

    def call(self, commands, while_waiting=None):
        """The answers to `commands` ((name, *arguments) each), sent in one write; an error answer
        is raised once every answer has been read."""
        connection = self._ready()
        try:
            connection.send_packed_command(connection.pack_commands(commands))
            if while_waiting is not None:
                while_waiting(connection)
            answers = [read_answer(connection) for _ in commands]
        except BaseException:
            connection.disconnect()
            raise
        for answer in answers:
            if isinstance(answer, redis.ResponseError):
                raise answer
        return answers

    def _ready(self):
        if self._pid != os.getpid():
            self._connection, self._pid = self.pool.make_connection(), os.getpid()
        connection = self._connection
        try:
            stale = connection.can_read(0)   # connects first if it is not connected
        except redis.ConnectionError:
            stale = True
        if stale:
            connection.disconnect()
        return connection

    def close(self):
        if self._pid == os.getpid():
            self._connection.disconnect()


def read_answer(connection):
    try:
        return connection.read_response()
    except redis.ResponseError as error:   # an answer, not a broken connection
        return error


class LaneRedisStorage(PriorityRedisStorage):
    """Huey's priority Redis queue for one lane (lane=None: the storage Huey holds, see AllLanes).

    A busy worker pays one round trip per task here instead of Huey's three
    (pop, read the task's revoke marks, drop its revoke mark after the run):
    a script pops the next task with its marks (`marks`, which
    LedgerHuey.is_revoked reads instead of asking again) and drops the marks
    of the run before (`stale_marks`, which LedgerHuey.delete collects). An idle
    worker waits in Huey's blocking pop (BZPOPMIN), which wakes at once on a
    push, pipelined with what it needs next: the stale marks dropped before it,
    and after it the lane's depth (still empty: the next pop waits at once) and
    the size of Huey's key-value hash; what the worker holds is made while the
    pop waits, if it has waited LINGER. Redis runs a blocked client's pipelined
    commands when the pop returns, so it is one round trip. The hash holds only
    revoke marks here (no results, no locks), so when it is empty the task has
    none; otherwise a second round trip reads the task's own. With more idle
    workers in a lane than tasks arriving (three consumers on one queue) every
    task takes this path: one round trip, where an empty pop first made three.
    """

    def __init__(self, name='huey', lane=None, **kwargs):
        super().__init__(name, **kwargs)
        self.lane = lane
        if lane is not None:
            self.queue_key = f'huey.redis.{self.name}.{lane}'
        self._enqueue = self.conn.register_script(ENQUEUE_LUA)
        self._pop_with_marks = self.conn.register_script(POP_LUA)
        self.pusher = Pusher(self.conn.connection_pool)   # AllRedisLanes gives its lanes one to share
        self.own = OwnConnection(self.conn.connection_pool)
        self.marks = None        # the last popped task's revoke marks, if the script popped it
        self.stale_marks = []    # revoke marks to drop with the next pop
        self.idle = False        # the lane was empty at the last look: wait first
        self.waiting = EveryWorkerWaits   # which idle workers wait (LedgerHuey gives each lane its slots)

    def dequeue(self):
        return next_task(self.waiting, self.pop_now, self._wait_for_task, first_pop=self._pop_unless_idle)

    def _pop_unless_idle(self):
        """An idle lane's worker waits at once: the empty pop before the wait is skipped."""
        return None if self.idle else self.pop_now()

    def _wait_for_task(self):
        self.marks = None
        try:
            popped, depth, marked = self._wait_and_pop()
        except redis.TimeoutError:
            return None   # as Huey's dequeue; a ConnectionError backs the worker off
        self.idle = depth == 0
        if not popped:
            return None
        data = popped[1][8:]   # less Huey's time prefix
        names = MESSAGE_NAMES.search(data)
        if names:
            self.marks = self._read_marks(names) if marked else [None, None]
        return data

    def pop_now(self):
        """The next task's payload (its revoke marks in `marks`) without waiting, or None."""
        popped = self._pop_now_with_marks()
        self.stale_marks = []
        self.idle = not popped
        if not popped:
            self.marks = None
            return None
        self.marks = popped[1:] if len(popped) == 3 else None
        return popped[0][8:]   # less Huey's time prefix

    def _pop_now_with_marks(self):
        """POP_LUA's answer: None, or the member and its revoke marks (dropping the stale ones first)."""
        keys_and_args = (self.queue_key, self.result_key, *self.stale_marks)
        try:
            popped, = self.own.call([('EVALSHA', self._pop_with_marks.sha, 2, *keys_and_args)])
        except NoScriptError:   # a restarted or other server: the Script call loads it and runs it
            popped = self._pop_with_marks(keys=keys_and_args[:2], args=keys_and_args[2:])
        return popped

    def _wait_and_pop(self):
        """(BZPOPMIN's answer, the lane's depth after it, entries in Huey's hash) in one round trip;
        before_wait() runs while the pop waits, once no answer came within LINGER."""
        commands = [('HDEL', self.result_key, *self.stale_marks)] if self.stale_marks else []
        commands += [('BZPOPMIN', self.queue_key, self.read_timeout), ('ZCARD', self.queue_key),
                     ('HLEN', self.result_key)]
        answers = self.own.call(commands, while_waiting=linger)
        self.stale_marks = []
        return answers[-3:]

    def _read_marks(self, names):
        return self.conn.hmget(self.result_key, f'r:{names[1].decode()}', f'rt:{names[2].decode()}')

    def drop_stale_marks(self):
        """Drop the collected revoke marks now (a worker that stops pops no more)."""
        if self.stale_marks:
            self.conn.hdel(self.result_key, *self.stale_marks)
            self.stale_marks = []

    def close(self):
        self.own.close()
        return super().close()

    def enqueue(self, data, priority=None, tenant=None):
        priority = band(priority)
        # Huey's time prefix (RedisPriorityQueue.enqueue): enqueue order among equal scores.
        member = struct.pack('>Q', int(time.time() * 1e6)) + data
        keys_and_args = (self.queue_key, f'{self.queue_key}.turns.{priority}', member, priority, tenant_key(tenant))
        # EVALSHA as a plain command: redis-py's Script call costs an import and
        # a type check per call, a tenth of the producer's Redis CPU (measured).
        pusher = self.pusher.client()
        try:
            try:
                pusher.execute_command('EVALSHA', self._enqueue.sha, 2, *keys_and_args)
            except redis.ConnectionError:
                # A connection the server closed while it sat idle (a restart) fails at its next
                # command, which the pool would have noticed before sending; the client reconnects
                # for this second try. Had the first push been made after all, the task's second
                # copy finds its record taken and does not run (ledger.claim).
                pusher.execute_command('EVALSHA', self._enqueue.sha, 2, *keys_and_args)
        except NoScriptError:   # a restarted or other server: the Script call loads it and runs it
            self._enqueue(keys=keys_and_args[:2], args=keys_and_args[2:], client=pusher)

    def depth_by_priority(self, priorities):
        """{priority: waiting tasks} of this lane, counted without reading payloads."""
        with self.conn.pipeline(transaction=False) as pipe:
            for priority in priorities:
                base = -band(priority) * TURNS
                pipe.zcount(self.queue_key, base, f'({base + TURNS}')
            pipe.zcard(self.queue_key)
            *counts, total = pipe.execute()
        depth = dict(zip(priorities, counts))
        if total > sum(counts):
            depth[0] = depth.get(0, 0) + total - sum(counts)  # priorities outside the service's own
        return depth


# ---------------------------------------------------------------- writers of one SQLite file

PAUSE = threading.Event()   # never set: waiting on it is a sleep


class WriteTurns:
    """Writers of one SQLite file take turns on a lock file beside it, so a writer that finds
    another writing waits for it to finish, not for SQLite's busy handler to wake it.

    SQLite's busy handler (the busy timeout) sleeps 1, 2, 5, 10, 15, 20, 25 ms
    ... between tries, however short the write it waits for: in the queue
    benchmark (a producer and two workers, ~70 us writes) 8 % of the enqueue's
    ledger INSERTs and 7 % of the workers' UPDATEs slept 1-25 ms, several
    seconds in all, most of the embedded mode's time. Here a waiter tries
    the lock file's flock(2) every 20 us at first, doubling to 1 ms; after
    `patience` seconds (a holder stopped by SIGSTOP) it writes anyway and
    SQLite's own lock and busy timeout decide, as before. Only statements
    outside a transaction take a turn: a transaction that holds SQLite's lock
    and then waits for a turn could wait for a turn-holder waiting on SQLite.
    The lock file is a speed-up only; SQLite's locking keeps the data right.
    """

    def __init__(self, database_path, patience=1.0):
        self.path = f'{database_path}.writers'
        self.patience = patience
        self._fds = {}   # (pid, thread) -> this thread's own descriptor: flock excludes by open file

    def _fd(self):
        key = (os.getpid(), threading.get_ident())
        fd = self._fds.get(key)
        if fd is None:
            fd = self._fds[key] = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return fd

    @contextlib.contextmanager
    def turn(self):
        fd = self._fd()
        held = self._wait(fd)
        try:
            yield
        finally:
            if held:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _wait(self, fd):
        pause, deadline = 0.00002, None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                now = time.monotonic()
                deadline = deadline or now + self.patience
                if now > deadline:
                    return False
                # Not time.sleep: under libfaketime with its monotonic clock left alone
                # (the skewed hosts of tests/test_hosts.py) it fails with EINVAL, and the
                # ledger write waiting here failed with it, leaving its task `running`.
                PAUSE.wait(pause)
                pause = min(pause * 2, 0.001)


class WakingSqliteStorage(SqliteStorage):
    """SqliteStorage whose idle workers sleep on a FIFO doorbell instead of polling; one lane's tasks.

    A busy worker pays one transaction per task here instead of Huey's four
    statements, a transaction and two reads: the pop takes the next task with
    DELETE ... RETURNING, reads its revoke marks (`marks`, as the Redis lane
    does) and drops the last run's (`stale_marks`) in the same transaction; the
    read that spares an empty queue the write lock is made only by a worker
    whose last pop found nothing.
    """
    blocking = True
    table_turn = ('create table if not exists turn (queue text not null, priority integer not null, '
                  'tenant text not null, turn integer not null, primary key (queue, priority, tenant)) without rowid')
    ddl = SqliteStorage.ddl + [table_turn]

    def __init__(self, name='huey', lane=None, read_timeout=1.0, **kwargs):
        super().__init__(name, **kwargs)
        self.lane = lane
        self.queue = self.name if lane is None else f'{self.name}.{lane}'
        self.read_timeout = read_timeout
        self.bell_path = f'{self.filename}.bell' if lane is None else f'{self.filename}.{lane}.bell'
        self._bell_reader = None
        self._bell_poller = None
        self._bell_writer = None
        make_fifo(self.bell_path)
        self.turns = WriteTurns(self.filename)
        self.marks = None        # the last popped task's revoke marks
        self.stale_marks = []    # revoke marks to drop with the next pop
        self.busy = False        # the last pop found a task: the next one skips the look first
        self.waiting = EveryWorkerWaits   # which idle workers wait (LedgerHuey gives each lane its slots)

    def enqueue(self, data, priority=None, tenant=None):
        priority, tenant = band(priority), tenant_key(tenant)
        top = priority * TURNS
        with self.turns.turn(), self.db(commit=True) as curs:
            curs.execute('select max(priority) from task where queue = ? and priority > ? and priority < ?',
                         (self.queue, top - TURNS, top))
            head, = curs.fetchone()
            if head is None:  # the band drained: every tenant starts even
                curs.execute('delete from turn where queue = ? and priority = ?', (self.queue, priority))
            # The turn is max(h, last + 1): h for a tenant with none waiting before.
            curs.execute('insert into turn (queue, priority, tenant, turn) values (?, ?, ?, ?) '
                         'on conflict (queue, priority, tenant) do update set turn = max(excluded.turn, turn + 1) '
                         'returning turn', (self.queue, priority, tenant, 1 if head is None else int(top - head)))
            turn, = curs.fetchone()
            curs.execute('insert into task (queue, data, priority) values (?, ?, ?)',
                         (self.queue, self.to_blob(data), top - turn))
        self.ring()

    def dequeue(self):
        return next_task(self.waiting, self.pop_now, self._wait_for_task)

    def _wait_for_task(self):
        if not self.wait_for_bell():
            return None
        data = self.pop_now()
        return self.after_stale_ring() if data is None else data

    def after_stale_ring(self):
        """A ring found the lane empty: a busy worker took its task without reading it. Drop every
        ring left, then look once more (a task committed before the drop is seen now; one after it
        rings again), and pass a ring on if that look found one: the drop may have taken another's."""
        self.drain_bell()
        data = self.pop_now()
        if data is not None:
            self.ring()
        return data

    def pop_now(self):
        """Huey's SqliteStorage.dequeue, for this lane's queue: the next task's payload, or None;
        its revoke marks in `marks`."""
        self.marks = None
        if not self.busy and not self.stale_marks and \
                not self.sql('select 1 from task where queue = ? limit 1', (self.queue,), results=True):
            return None
        with self.turns.turn(), self.db(commit=True) as curs:
            if self.stale_marks:
                curs.execute(*self._drop_stale_marks_sql())
            curs.execute('delete from task where id = (select id from task where queue = ? '
                         'order by priority desc, id limit 1) returning data', (self.queue,))
            row = curs.fetchone()
            self.busy = row is not None
            if row is None:
                return None
            data = row[0]
            names = MESSAGE_NAMES.search(bytes(data))
            if names is not None:
                keys = (f'r:{names[1].decode()}', f'rt:{names[2].decode()}')
                curs.execute('select key, value from kv where queue = ? and key in (?, ?)', (self.name, *keys))
                found = dict(curs.fetchall())
                self.marks = [found.get(key) for key in keys]
        return data

    def drop_stale_marks(self):
        """Drop the collected revoke marks now (a worker that stops pops no more)."""
        if self.stale_marks:
            self.sql(*self._drop_stale_marks_sql(), commit=True)

    def _drop_stale_marks_sql(self):
        """The statement dropping the collected revoke marks, which are then no longer kept."""
        marks, self.stale_marks = self.stale_marks, []
        return f'delete from kv where queue = ? and key in ({", ".join("?" * len(marks))})', (self.name, *marks)

    def queue_size(self):
        return self.sql('select count(id) from task where queue = ?', (self.queue,), results=True)[0][0]

    def enqueued_items(self, limit=None):
        sql = 'select data from task where queue = ? order by priority desc, id'
        params = (self.queue,) if limit is None else (self.queue, limit)
        return [data for data, in self.sql(sql + (' limit ?' if limit is not None else ''), params, results=True)]

    def flush_queue(self):
        self.sql('delete from task where queue = ?', (self.queue,), commit=True)

    def depth_by_priority(self, priorities=()):
        """{priority: waiting tasks} of this lane, counted without reading payloads."""
        # A score is priority * TURNS - turn, 0 < turn < TURNS: adding TURNS - 1 and truncating gives the priority.
        rows = self.sql('select cast((priority + ?) / ? as integer) as band, count(*) from task '
                        'where queue = ? group by band', (TURNS - 1, TURNS, self.queue), results=True)
        return {int(priority): count for priority, count in rows}

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
        """Wait up to read_timeout for a ring and take it; True if this worker took one. What the
        worker holds is made (before_wait) if no ring came within LINGER.

        A ring is one byte and a worker takes one byte: each enqueue sends one
        idle worker to look. A ring wakes one of the waiting workers (epoll's
        EPOLLEXCLUSIVE; with select(), every one of them), and a worker that
        finds it taken goes back to waiting without looking (with three
        consumers, six idle workers of a lane looked for every task).
        """
        wait = self._waiter()
        if not wait(LINGER):
            before_wait()
        deadline = time.monotonic() + self.read_timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not wait(remaining):
                return False
            try:
                os.read(self._reader(), 1)
                return True
            except BlockingIOError:
                continue   # another worker took the ring
        return False

    def drain_bell(self):
        """Drop every ring waiting in the FIFO."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._reader(), 4096):
                pass

    def _waiter(self):
        """wait(seconds) -> True once the bell has a ring to take (or may have: look)."""
        if not hasattr(select, 'EPOLLEXCLUSIVE'):   # not Linux
            return lambda seconds: select.select([self._reader()], [], [], seconds)[0]
        if self._bell_poller is None:
            self._bell_poller = select.epoll()
            self._bell_poller.register(self._reader(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
        return self._bell_poller.poll

    def _reader(self):
        if self._bell_reader is None:
            # O_RDWR keeps a writer open on our side, so poll() does not report
            # a hang-up (and spin) while no web process has the FIFO open.
            self._bell_reader = os.open(self.bell_path, os.O_RDWR | os.O_NONBLOCK)
        return self._bell_reader

    def _close_writer(self):
        if self._bell_writer is not None:
            os.close(self._bell_writer)
            self._bell_writer = None

    def close(self):
        self._close_writer()
        if self._bell_poller is not None:
            self._bell_poller.close()
            self._bell_poller = None
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


# ---------------------------------------------------------------- every lane

class AllLanes:
    """The storage Huey itself holds: the schedule, revoke marks and locks of every lane, and the
    lanes' queues as one (what recovery, health and `pending_count` read). Tasks go into a lane
    through `lanes[name].enqueue`; a worker pops from its own lane's storage."""

    lanes = {}
    default_lane = None

    def add_lanes(self, names, default, **kwargs):
        """One storage per lane, for the same broker and queue name (in Redis, pushing over one connection)."""
        self.lanes = {lane: self.lane_class(self.name, lane=lane, **kwargs) for lane in names}
        self.default_lane = default
        for lane in self.lanes.values():
            if hasattr(lane, 'pusher'):
                lane.pusher = self.pusher

    def enqueue(self, data, priority=None, tenant=None):
        """A payload queued without its lane (LedgerHuey.enqueue picks the lane of a task) goes to the default."""
        self.lanes[self.default_lane].enqueue(data, priority, tenant)

    def dequeue(self):
        for lane in self.lanes.values():   # not a worker's path (a worker serves one lane): tools and tests
            data = lane.pop_now()
            if data is not None:
                return data
        return None

    def queue_size(self):
        return sum(lane.queue_size() for lane in self.lanes.values())

    def enqueued_items(self, limit=None):
        items = [item for lane in self.lanes.values() for item in lane.enqueued_items()]
        return items if limit is None else items[:limit]

    def flush_queue(self):
        for lane in self.lanes.values():
            lane.flush_queue()

    def close(self):
        for lane in self.lanes.values():   # forked workers must not share a parent's connection
            lane.close()
        return super().close()


class AllRedisLanes(AllLanes, LaneRedisStorage):
    lane_class = LaneRedisStorage


class AllSqliteLanes(AllLanes, WakingSqliteStorage):
    lane_class = WakingSqliteStorage
