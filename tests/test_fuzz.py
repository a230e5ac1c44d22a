"""Fuzzing in the suite: every route of /api/v1/openapi.json, 200 generated cases each (valid and invalid
bodies, parameters and headers; a user key, an operator key and none), against a live web server.
Zero 5xx and zero contract violations. tests/fuzzing.py says how; bench/fuzz.py runs 2,000 a route."""
import os
import time

import pytest

from tests import fuzzing
from tests.conftest import MODE, STATE, WebServer

EXAMPLES = int(os.environ.get('EMAILSVC_FUZZ_EXAMPLES', '200'))


@pytest.fixture(scope='module')
def target():
    env = fuzzing.target_env(str(STATE['workdir']), MODE, STATE.get('postgres'), getattr(STATE.get('redis'), 'url', None))
    extra = {k: v for k, v in env.items() if k.startswith('EMAILSVC_')}
    server = WebServer(STATE['workdir'], name='web-fuzz', **extra)
    yield fuzzing.Target(f'http://127.0.0.1:{server.port}', env)
    server.stop()


@pytest.fixture(scope='module')
def operations(target):
    return fuzzing.operations(fuzzing.load_schema(target))


def test_every_route_is_fuzzed(operations):
    from tests.test_contract import bottle_routes
    assert len(operations) == len(bottle_routes())


def test_no_server_errors_and_no_contract_violations(target, operations):
    started = time.monotonic()
    lines = []
    tallies = fuzzing.run_all(target, EXAMPLES, report=lines.append)
    elapsed = time.monotonic() - started
    print('\n'.join(lines) + f'\n{sum(t.cases for t in tallies.values())} cases in {elapsed:.1f} s ({MODE})')
    # Hypothesis stops early only when a route has fewer distinct inputs than the budget (no parameters).
    assert all(t.cases >= EXAMPLES or len(t.keys) == 3 for t in tallies.values()), '\n'.join(lines)
    problems = [line for line in lines if line.startswith('    ')]
    assert not problems, '\n'.join(lines)
