"""Health checks, and 503 (never 500) while a dependency is down."""
import pytest

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
    assert set(body['queue']['by_priority']) == {'10', '8', '5', '3'}
    assert body['queue']['depth'] == sum(body['queue']['by_priority'].values())


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
