"""The queue machinery under tasks.py: Huey, the ledger, time limits, heartbeats and recovery.

    service.py   LedgerHuey (records at enqueue, registers service tasks), make_huey, retry delays,
                 the hard-limit watchdog and the consumer that records its kills
    ledger.py    the one writer of task records: states, signals, revoke, requeue, purge, prune
    workers.py   heartbeats and the recovery of dead workers' and lost tasks
    storage.py   the signed JSON serializer and the SQLite queue with a doorbell

tasks.py builds the instance and installs the handlers, as Huey's own style goes:

    huey = taskq.make_huey(SETTINGS)
    taskq.install(huey)

Nothing here imports tasks.py: what the machinery needs (settings, the task
registry) travels on the instance.
"""
from taskq import ledger, workers
from taskq.service import LedgerHuey, make_huey

__all__ = ['LedgerHuey', 'install', 'ledger', 'make_huey']


def install(huey):
    """Record every task's life in the ledger, and beat and recover in every worker of `huey`."""
    ledger.install(huey)
    workers.install(huey)
