"""Every task run twice under the same id leaves the state one run leaves."""

import models
import tasks
from taskq import ledger
from tests.conftest import record, wait_for, wait_for_state
from tests.test_send import MAIL, sender, smtp_server  # noqa: F401 (fixtures)
from tests.test_sync import message, user  # noqa: F401 (fixture)


def run_twice(wrapper, *args, **kwargs):
    """Run the same task (same id, same arguments) to the end, then once more."""
    task = wrapper.s(*args, **kwargs)
    tasks.huey.enqueue(task)
    first = wait_for_state(task.id, 'succeeded', 'failed', 'dead', timeout=90)
    # As if the first run's end never reached the ledger (its worker died just after the effects) and
    # recovery queued it again: a copy of a task whose record is final is refused by the claim.
    ledger.update(task.id, state=ledger.PENDING, finished_at=None)
    again = wrapper.s(*args, **kwargs, id=task.id)
    tasks.huey.enqueue(again)
    # One ledger row for both runs: the second has ended when attempts moved on and the state is final.
    second = wait_for(lambda: (r := record(task.id)).attempts > first.attempts and
                      r.state in ledger.FINAL_STATES and r, timeout=90, message='the second run to end')
    return first, second


def stored(account):
    with models.all_tenants():
        return sorted((m.folder_id, m.uid) for m in models.EmailMessage.select().where(
            models.EmailMessage.client == account, models.EmailMessage.is_deleted == False))  # noqa: E712


def test_sync_twice(sender, consumer):
    sender.mailbox.append(message(1), message(2))
    first, second = run_twice(tasks.sync_emails, sender.account, *sender.ids)
    assert first.result['messages_synced'] == 2
    assert second.result['messages_synced'] == 0
    assert len(stored(sender.account)) == 2


def test_send_twice(sender, smtp_server, consumer):
    first, second = run_twice(tasks.send_email, sender.account, *sender.ids, MAIL['to'], subject='once')
    assert first.state == second.state == 'succeeded'
    assert first.result['message_id'] == second.result['message_id']
    assert len(smtp_server.received()) == 1


def test_delete_twice(sender, consumer):
    sender.mailbox.append(message(1), message(2))
    run_twice(tasks.sync_emails, sender.account, *sender.ids)
    with models.all_tenants():
        ids = [m.id for m in models.EmailMessage.select().where(models.EmailMessage.client == sender.account)]
    first, second = run_twice(tasks.delete_emails, ids, *sender.ids, permanent=True)
    assert first.result['deleted_count'] == 2 and second.result['deleted_count'] == 0
    assert stored(sender.account) == []


def test_noop_twice(consumer):
    first, second = run_twice(tasks.noop)
    assert first.result == second.result == {'status': 'ok'}
