"""The long fuzz run: 2,000 generated cases a route (valid and invalid; a user key, an operator key,
none) against a live web server, from /api/v1/openapi.json; tests/fuzzing.py says how. The suite's
tests/test_fuzz.py runs the same with 200. Prints server errors and schema violations per route and
ends with the two targets.

Embedded (SQLite) by default; --mode scaleout starts Redis and PostgreSQL on loopback (tests/services.py).

    .venv/bin/python bench/fuzz.py [--examples 2000] [--mode embedded|scaleout]
"""
import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import fuzzing, services  # noqa: E402 (after the path)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--examples', type=int, default=2000)
    parser.add_argument('--mode', choices=('embedded', 'scaleout'), default='embedded')
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix='fuzz-bench-')
    from cryptography.fernet import Fernet
    # Scaled out, nothing is generated into var/: the secret and the credential key must be given.
    os.environ.update(EMAILSVC_CONFIG=os.path.join(work, 'absent.ini'),
                      EMAILSVC_SERVER_SECRET='bench-' + os.urandom(16).hex(), EMAILSVC_LOG_LEVEL='WARNING',
                      EMAILSVC_SECURITY_CREDENTIAL_KEYS=Fernet.generate_key().decode())
    running = []
    postgres = redis = None
    if args.mode == 'scaleout':
        redis = services.start_redis(pathlib.Path(work) / 'redis')
        postgres = services.start_postgres(pathlib.Path(work) / 'postgres')
        running += [redis, postgres]
    env = fuzzing.target_env(work, args.mode, postgres, redis.url if redis else None)
    port = services.free_port()
    env['EMAILSVC_SERVER_PORT'] = str(port)
    web = subprocess.Popen([sys.executable, 'emailsvc.py', 'web'], cwd=ROOT, env=env,
                           stdout=open(os.path.join(work, 'web.log'), 'ab'), stderr=subprocess.STDOUT)
    try:
        base = f'http://127.0.0.1:{port}'
        wait_for_health(base, web)
        started = time.monotonic()
        tallies = fuzzing.run_all(fuzzing.Target(base, env), args.examples)
        elapsed = time.monotonic() - started
    finally:
        web.terminate()
        web.wait(10)
        services.stop_all(running)
    cases = sum(t.cases for t in tallies.values())
    errors = sum(t.server_errors for t in tallies.values())
    violations = sum(t.violations for t in tallies.values())
    print(f'{args.mode}: {cases} cases over {len(tallies)} routes in {elapsed:.0f} s '
          f'({cases / elapsed:.0f} cases/s); web log: {work}/web.log')
    print(f'0 server errors {"met" if errors == 0 else f"NOT MET ({errors})"}')
    print(f'0 schema violations {"met" if violations == 0 else f"NOT MET ({violations})"}')


def wait_for_health(base, web):
    import requests
    deadline, last = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        if web.poll() is not None:
            raise SystemExit(f'the web server exited with {web.returncode}')
        try:
            last = requests.get(base + '/health', timeout=2).status_code
            if last == 200:
                return
        except requests.RequestException as exc:   # not listening yet: asked again until the deadline
            last = exc
        time.sleep(0.1)
    raise SystemExit(f'the web server did not answer /health within 30 s (last: {last})')


if __name__ == '__main__':
    main()
