"""Health checks, and 503 (never 500) while a dependency is down."""
import pytest

import tasks
from tests import services
from tests.conftest import STATE, WebServer, assert_api_error


def test_health_is_open_and_ok(client):
    resp = client.get('/health')
    assert resp.status == 200 and resp.json == {'status': 'ok'}


def test_detailed_health_reports_every_dependency(client, consumer):
    body = client.get('/health/detailed').json
    assert body['status'] == 'ok'
    assert body['database'] == {'ok': True} and body['broker'] == {'ok': True}
    assert body['consumers']['alive'] >= 1 and body['consumers']['workers'] >= 2
    assert set(body['queue']['by_priority']) == {'10', '9', '8', '5', '3'}   # 9: periodic syncs
    assert body['queue']['depth'] == sum(body['queue']['by_priority'].values())
    by_lane = body['queue']['by_lane']
    assert set(by_lane) == {'sync', 'send', 'delete', 'spam', 'periodic', 'webhooks'}
    assert body['queue']['depth'] == sum(lane['depth'] for lane in by_lane.values())


def test_queue_depth_counts_waiting_tasks_by_priority(client, consumer, make_key, unique):
    import tasks
    from tests import probe_tasks
    consumer.stop()
    try:
        before = client.get('/health/detailed').json['queue']
        for priority in (10, 10, 3):
            tasks.huey.enqueue(probe_tasks.sleeps.s(0, priority=priority))
        after = client.get('/health/detailed').json['queue']
        assert after['by_priority']['10'] - before['by_priority']['10'] == 2
        assert after['by_priority']['3'] - before['by_priority']['3'] == 1
        assert after['depth'] - before['depth'] == 3
    finally:
        consumer.start()


@pytest.fixture(scope='module')
def broken_broker():
    server = WebServer(STATE['workdir'], name='web-no-broker',
                       EMAILSVC_QUEUE_URL=f'redis://127.0.0.1:{services.free_port()}/0')
    yield server.client
    server.stop()


@pytest.fixture(scope='module')
def broken_database():
    server = WebServer(STATE['workdir'], name='web-no-db',
                       EMAILSVC_DATABASE_URL=f'postgresql://u:p@127.0.0.1:{services.free_port()}/x')
    yield server.client
    server.stop()


def test_broker_down_is_503(broken_broker):
    resp = broken_broker.get('/health/detailed')
    assert resp.status == 503 and resp.headers['Content-Type'].startswith('application/json')
    assert resp.json['status'] == 'degraded' and resp.json['broker']['ok'] is False
    assert resp.json['database']['ok'] is True


def test_database_down_is_503_for_health_and_api(broken_database, make_key, unique):
    resp = broken_database.get('/health/detailed')
    assert resp.status == 503 and resp.json['database']['ok'] is False
    assert_api_error(broken_database.as_key('esk_any').get('/api/v1/accounts'), 503, 'unavailable')
    assert broken_database.get('/health').status == 200  # liveness does not depend on it


def ping():
    import subprocess
    import sys
    from tests.conftest import ROOT
    return subprocess.run([sys.executable, 'emailsvc.py', 'tasks', 'ping'], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_no_live_consumer_is_degraded_after_the_start_up_grace_and_ping_fails(consumer):
    import datetime
    import uuid

    import models
    from taskq import ledger
    answered = ping()
    workers = sum(tasks.huey.lane_workers.values())   # every lane's
    assert answered.returncode == 0 and f':{consumer.proc.pid}: pong ({workers} workers' in answered.stdout
    strict = WebServer(STATE['workdir'], name='web-no-grace', EMAILSVC_CONSUMER_STARTUP_GRACE='0',
                       EMAILSVC_HEALTH_MAX_WAIT_SECONDS='5')
    lenient = WebServer(STATE['workdir'], name='web-grace', EMAILSVC_CONSUMER_STARTUP_GRACE='300')
    waiting = uuid.uuid4().hex
    try:
        # (Earlier tests may have left a task waiting: only the consumer's reason is this test's.)
        assert 'no live consumer' not in strict.client.get('/health/detailed').json['reasons']
        consumer.stop()
        resp = strict.client.get('/health/detailed')
        assert resp.status == 503 and resp.json['status'] == 'degraded'
        assert 'no live consumer' in resp.json['reasons'] and resp.json['consumers']['alive'] == 0
        assert resp.json['database'] == {'ok': True}  # today's fields stay
        starting = lenient.client.get('/health/detailed')
        assert starting.status == 200 and starting.json['consumers']['starting'] is True
        silent = ping()
        assert silent.returncode != 0 and silent.stdout == ''
        assert len(silent.stderr.strip().splitlines()) == 1 and 'no consumer answers' in silent.stderr
        # A task waiting longer than health.max_wait_seconds is a reason of its own.
        ledger.insert(waiting, state='pending', name='noop', args={},
                      enqueued_at=models.utcnow() - datetime.timedelta(seconds=60))
        waited = strict.client.get('/health/detailed').json
        assert waited['queue']['oldest_waiting_seconds'] >= 60
        assert any(reason.startswith('oldest waiting task has waited') for reason in waited['reasons'])
    finally:
        ledger.update(waiting, state='revoked', finished_at=models.utcnow())
        strict.stop()
        lenient.stop()
        consumer.start()


def test_outages_are_named_as_reasons(broken_broker, broken_database):
    assert 'broker unreachable' in broken_broker.get('/health/detailed').json['reasons']
    assert 'database unreachable' in broken_database.get('/health/detailed').json['reasons']
