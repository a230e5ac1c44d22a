"""GET /metrics: access, task and mail counters from the shared database, HTTP metrics, the access log."""
import datetime
import json
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

import models
import tasks
from taskq import ledger, metrics
from tests import probe_tasks
from tests.conftest import STATE, WebServer, assert_api_error, wait_for, wait_for_state


def scrape(client, key):
    resp = client.as_key(key).get('/metrics')
    assert resp.status == 200, resp.text
    assert resp.headers['Content-Type'].startswith('text/plain')
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, metric, **labels):
    return samples.get((metric, tuple(sorted(labels.items()))), 0)


@pytest.fixture(scope='module')
def operator():
    return models.ApiKey.issue(operator=True)[1]


def test_metrics_need_an_operator_key(client, make_key, unique):
    assert_api_error(client.get('/metrics'), 401, 'unauthorized')
    assert_api_error(client.as_key('esk_wrong').get('/metrics'), 401, 'unauthorized')
    assert_api_error(client.as_key(make_key(unique)).get('/metrics'), 403, 'forbidden')
    # X-Forwarded-For is the client's word, not its address.
    assert_api_error(client.get('/metrics', headers={'X-Forwarded-For': '10.1.2.3'}), 401, 'unauthorized')


def test_an_allowed_network_needs_no_key():
    server = WebServer(STATE['workdir'], name='web-metrics-open', EMAILSVC_METRICS_ALLOWED_NETWORKS='10.0.0.0/8, 127.0.0.1/32')
    try:
        resp = server.client.get('/metrics')
        assert resp.status == 200 and 'emailsvc_build_info' in resp.text
    finally:
        server.stop()


def test_finished_tasks_retries_and_times_are_counted(client, consumer, operator):
    before = scrape(client, operator)
    done = [tasks.huey.enqueue(probe_tasks.sleeps.s(0.3)) for _ in range(2)]
    dead = tasks.huey.enqueue(probe_tasks.always_fails.s())
    for task in done:
        wait_for_state(task.id, 'succeeded')
    wait_for_state(dead.id, 'dead', timeout=20)
    after = scrape(client, operator)

    def delta(metric, **labels):
        return value(after, metric, **labels) - value(before, metric, **labels)
    assert delta('emailsvc_tasks_finished_total', name='sleeps', state='succeeded') == 2
    assert delta('emailsvc_tasks_finished_total', name='always_fails', state='dead') == 1
    assert delta('emailsvc_task_retries_total', name='always_fails') == 2
    assert delta('emailsvc_task_run_seconds_count', name='sleeps') == 2
    assert delta('emailsvc_task_run_seconds_bucket', name='sleeps', le='0.25') == 0
    assert delta('emailsvc_task_run_seconds_bucket', name='sleeps', le='0.5') == 2
    assert delta('emailsvc_task_run_seconds_sum', name='sleeps') >= 0.6
    assert delta('emailsvc_task_queue_wait_seconds_count', name='sleeps') == 2
    assert value(after, 'emailsvc_consumers_alive') >= 1 and value(after, 'emailsvc_workers_alive') >= 2
    assert {'10', '8', '5', '3'} <= {dict(labels)['priority'] for name, labels in after
                                     if name == 'emailsvc_queue_depth'}
    assert any(name == 'emailsvc_build_info' for name, _ in after)

    # Rolling everything up (as a later scrape does) keeps the totals: nothing counted twice or lost.
    with models.database.connection_context():
        metrics.roll_up(settle_seconds=0)
    rolled = scrape(client, operator)
    for key in ('emailsvc_tasks_finished_total', 'emailsvc_task_retries_total', 'emailsvc_task_run_seconds_count'):
        for name in ('sleeps', 'always_fails'):
            assert value(rolled, key, name=name, **({'state': 'succeeded'} if 'finished' in key else {})) == \
                value(after, key, name=name, **({'state': 'succeeded'} if 'finished' in key else {}))
    assert value(rolled, 'emailsvc_tasks_finished_total', name='always_fails', state='dead') == \
        value(after, 'emailsvc_tasks_finished_total', name='always_fails', state='dead')


def finished_record(name, result):
    now = models.utcnow()
    ledger.insert(uuid.uuid4().hex, state='succeeded', name=name, attempts=1, result=result,
                  enqueued_at=now - datetime.timedelta(seconds=2), started_at=now - datetime.timedelta(seconds=1),
                  finished_at=now)


def test_messages_and_spam_verdicts_come_from_task_results(client, operator):
    before = scrape(client, operator)
    finished_record('sync_emails', {'status': 'success', 'messages_synced': 7, 'messages_deleted': 1})
    finished_record('send_email', {'status': 'success', 'recipients_sent': 2})
    finished_record('delete_emails', {'status': 'success', 'deleted_count': 3})
    finished_record('check_spam', {'status': 'success', 'is_spam': True, 'spam_score': 0.9})
    finished_record('check_spam', {'status': 'success', 'is_spam': False, 'spam_score': 0.1})
    finished_record('check_spam', {'status': 'success', 'is_spam': False, 'spam_score': 0.2})
    after = scrape(client, operator)
    for metric, labels, expected in (('emailsvc_messages_total', {'action': 'synced'}, 7),
                                   ('emailsvc_messages_total', {'action': 'sent'}, 1),
                                   ('emailsvc_messages_total', {'action': 'deleted'}, 3),
                                   ('emailsvc_spam_verdicts_total', {'verdict': 'spam'}, 1),
                                   ('emailsvc_spam_verdicts_total', {'verdict': 'ham'}, 2)):
        assert value(after, metric, **labels) - value(before, metric, **labels) == expected, (metric, labels)


def test_two_web_processes_answer_the_same_task_counters(client, consumer, operator):
    task = tasks.noop()
    wait_for_state(task.id, 'succeeded')
    other = WebServer(STATE['workdir'], name='web-metrics-2')
    try:
        def finished(samples):
            return {k: v for k, v in samples.items() if k[0] == 'emailsvc_tasks_finished_total'}
        # Equal unless a task of another test finishes between the two scrapes: ask again then.
        wait_for(lambda: finished(scrape(client, operator)) == finished(scrape(other.client, operator)),
                 timeout=10, message='two web processes to agree on the task counters')
    finally:
        other.stop()


def test_http_requests_are_counted_by_route_template_and_logged(web, client, operator):
    task = tasks.noop()
    wait_for_state(task.id, 'succeeded')
    before = scrape(client, operator)
    resp = client.as_key(operator).get(f'/api/v1/tasks/{task.id}', headers={'X-Request-ID': 'metrics-test-1'})
    assert resp.status == 200
    client.as_key(operator).get('/api/v1/tasks/no-such-task')
    after = scrape(client, operator)
    route = '/api/v1/tasks/<task_id>'
    for status in ('200', '404'):
        labels = dict(method='GET', route=route, status=status)
        assert value(after, 'emailsvc_http_requests_total', **labels) - \
            value(before, 'emailsvc_http_requests_total', **labels) == 1
    assert value(after, 'emailsvc_http_request_duration_seconds_count', method='GET', route=route) >= 2

    def logged():
        for line in web.log.read_text().splitlines():
            if line.startswith('{') and '"metrics-test-1"' in line:
                return json.loads(line)
        return None
    entry = wait_for(logged, message='the access-log line of the request')
    assert entry['logger'] == 'emailsvc.access'
    assert (entry['method'], entry['route'], entry['status']) == ('GET', route, 200)
    assert entry['duration_ms'] >= 0 and entry['request_id'] == 'metrics-test-1'
