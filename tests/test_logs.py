"""mailkit/logs.py: JSON lines, configured once per process tree."""
import io
import logging

from mailkit import logs


def test_configuring_again_the_same_way_changes_nothing():
    """A forked worker inherits its consumer's logging; configuring it again the same way must not set the
    level again (that clears every logger's cache, copying their shared pages into the worker)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        logs.configure('WARNING', stream)
        handler = root.handlers[0]
        logging.getLogger('emailsvc.test').isEnabledFor(logging.INFO)   # fills that logger's cache
        logs.configure('WARNING', stream)
        assert root.handlers == [handler]
        assert logging.getLogger('emailsvc.test')._cache == {logging.INFO: False}
        logs.configure('INFO', stream)   # another level: configured anew
        assert root.level == logging.INFO and logging.getLogger('emailsvc.test')._cache == {}
        logging.getLogger('emailsvc.test').warning('still %s', 'json')
        assert '"still json"' in stream.getvalue()
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
