"""The published contract: /api/v1/openapi.json names every route with its answers and errors, from the
same pydantic models that validate requests; /api/v1/docs shows it as a page that needs no other host."""
import re

import pytest

import contract
import emailsvc
from tests.conftest import assert_api_error
from tests.test_api import ACCOUNT


def bottle_routes():
    """(method, OpenAPI path) of every route the web app answers, the dashboard's HTML pages excepted
    (a Bottle app of their own, mounted at /dashboard: forms and sessions, not the JSON API)."""
    found = set()
    for route in emailsvc.app.routes:
        if route.rule.startswith('/dashboard'):
            continue
        found.add((route.method, contract.openapi_path(route.rule)))
    return found


@pytest.fixture(scope='module')
def document(web):
    resp = web.client.get('/api/v1/openapi.json')   # no key
    assert resp.status == 200 and resp.headers['Content-Type'].startswith('application/json'), resp.text
    return resp.json


def test_every_route_is_in_the_document(document):
    documented = {(method.upper(), path) for path, methods in document['paths'].items() for method in methods}
    routes = bottle_routes()
    assert len(routes) >= 25
    assert routes - documented == set(), 'routes missing from the OpenAPI document'
    assert documented - routes == set(), 'documented routes the app does not have'


def test_the_document_is_openapi_3_1_that_schemathesis_loads(document):
    import schemathesis
    assert document['openapi'] == '3.1.0'
    schema = schemathesis.openapi.from_dict(document)
    assert len(list(schema.get_all_operations())) == len(bottle_routes())


def test_each_route_declares_its_errors_in_the_one_shape(document):
    error = {'$ref': '#/components/schemas/Error'}
    for path, methods in document['paths'].items():
        for method, op in methods.items():
            statuses = set(op['responses'])
            where = f'{method.upper()} {path}'
            if op['security']:
                assert {'401', '503'} <= statuses, where
            if '{' in path:
                assert '404' in statuses, where
            if 'requestBody' in op:
                assert {'400', '413', '422'} <= statuses, where
            for status, answer in op['responses'].items():
                if int(status) >= 400 and path != '/health/detailed':
                    assert answer['content']['application/json']['schema'] == error, (where, status)
    assert set(document['components']['schemas']['Error']['required']) == {'error', 'message'}


def test_request_bodies_refuse_unknown_fields_and_responses_allow_new_ones(document):
    schemas = document['components']['schemas']
    assert schemas['AccountCreate']['additionalProperties'] is False
    assert schemas['SendBody']['additionalProperties'] is False
    assert schemas['Account'].get('additionalProperties', True) is not False
    assert 'password' not in schemas['ServerShown']['properties']
    # PATCH fields may be left out but are never null; smtp: null removes the server.
    patch = schemas['AccountUpdate']['properties']
    assert patch['email']['type'] == 'string' and 'default' not in patch['email']
    assert {'type': 'null'} in patch['smtp']['anyOf']


def test_validation_errors_keep_their_shape_and_paths(client, make_key, unique):
    alice = client.as_key(make_key(unique))
    body = dict(ACCOUNT, incoming=dict(ACCOUNT['incoming'], port='993', colour='blue'), smtp=5)
    resp = alice.post('/api/v1/accounts', body)
    assert_api_error(resp, 422, 'validation_failed')
    assert resp.json['fields'] == {'incoming.port': 'must be an integer', 'incoming.colour': 'is not a known field',
                                   'smtp': 'must be an object'}
    assert resp.json['message'] == 'incoming.port: must be an integer'
    resp = alice.post('/api/v1/messages/delete', {'email_ids': [1, 0, 'x']})
    assert_api_error(resp, 422, 'validation_failed')
    assert set(resp.json['fields']) == {'email_ids[1]', 'email_ids[2]'}


def test_query_errors_are_invalid_filter_with_fields(client, make_key, unique):
    alice = client.as_key(make_key(unique))
    resp = alice.get('/api/v1/messages?limit=0&unread=yes&since=' + '9' * 5000)
    assert_api_error(resp, 422, 'invalid_filter')
    assert set(resp.json['fields']) == {'limit', 'unread', 'since'}


def test_the_reference_page_shows_every_route_and_needs_no_other_host(web, document):
    resp = web.client.get('/api/v1/docs')
    assert resp.status == 200 and resp.headers['Content-Type'].startswith('text/html')
    assert "default-src 'none'" in resp.headers['Content-Security-Policy']
    page = resp.text
    for path, methods in document['paths'].items():
        for method in methods:
            assert f'{method.upper()} {path}' in page
    assert not re.search(r'(src|href)="(https?:)?//', page), 'the page loads something from another host'
    assert '<script' not in page


@pytest.mark.parametrize('path', [
    '/api/v1/messages?account_id=',                                   # fuzzer: an empty value passed for an integer
    '/api/v1/messages?since=0001-01-01T00:00:00%2B01:00',              # before year 1 in UTC: OverflowError, a 500
    '/api/v1/messages?limit=' + '9' * 5000,                            # int() refuses 4,301+ digits
    '/api/v1/messages?q=a%00b',                                        # PostgreSQL refuses NUL in a string: a 500
    '/api/v1/tasks?cursor=%00',
    '/api/v1/tasks?since=9999-12-31T23:00:00-05:00',
])
def test_hostile_query_values_are_422(client, make_key, unique, path):
    assert_api_error(client.as_key(make_key(unique)).get(path), 422, 'invalid_filter')


def test_hostile_path_ids_and_strings_are_4xx(client, make_key, unique):
    alice = client.as_key(make_key(unique))
    assert_api_error(alice.get('/api/v1/tasks/a%00b'), 404, 'not_found')      # PostgreSQL: NUL in a string
    assert_api_error(alice.get('/api/v1/tasks/' + 'x' * 65), 404, 'not_found')
    # JSON's \ud800 is a lone surrogate: no driver can store it.
    raw = b'{"email": "a@example.com", "incoming": {"protocol": "imap", "host": "h.example.com", "port": 993, ' \
          b'"security": "tls", "username": "\\ud800", "password": "p"}, "sync_enabled": false}'
    resp = alice.request('POST', '/api/v1/accounts', raw=raw, headers={'Content-Type': 'application/json'})
    assert_api_error(resp, 422, 'validation_failed')
    assert 'incoming.username' in resp.json['fields']
