"""Mail sessions a worker keeps open between tasks (IMAP, SMTP), so the next task does not pay connect and login."""
import contextlib
import os
import sys
import time

from mailkit.errors import TemporaryMailError


class SessionCache:
    """Mail sessions a worker keeps open between tasks, so the next task does not pay connect and login.

    Keyed by everything that reaching the account depends on, the stored
    password's ciphertext included, so a changed setting opens a new session.
    A session idle for long is probed (NOOP) first; one that saw an error is
    dropped, as its state on the server is unknown.
    """

    def __init__(self, size=8, check_after=30, expire_after=600):
        self.size, self.check_after, self.expire_after = size, check_after, expire_after
        self.pid, self.entries = None, {}

    @contextlib.contextmanager
    def session(self, key, open_session):
        if self.pid != os.getpid():  # a forked worker must not share its parent's sockets
            self.pid, self.entries = os.getpid(), {}
        session = self.checkout(key) or open_session()
        try:
            yield session
        except BaseException:
            session.__exit__(*sys.exc_info())
            raise
        self.checkin(key, session)

    def checkout(self, key):
        entry = self.entries.pop(key, None)
        if entry is None:
            return None
        session, last_used = entry
        idle = time.monotonic() - last_used
        if idle > self.expire_after:
            session.close()
            return None
        if not session.usable(probe=idle > self.check_after):
            session.__exit__(TemporaryMailError, None, None)
            return None
        return session

    def checkin(self, key, session):
        self.entries[key] = (session, time.monotonic())
        while len(self.entries) > self.size:  # the least recently used goes
            oldest = min(self.entries, key=lambda k: self.entries[k][1])
            self.entries.pop(oldest)[0].close()


