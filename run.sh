#!/usr/bin/env bash
# emailsvc: one entry point for running, administering and testing the service.
#
#   ./run.sh                  web server, consumer and watcher on the embedded default (Ctrl-C stops all)
#   ./run.sh web | consumer | watcher   one of them, in the foreground (consumer --lanes send,delete:
#                             those lanes only)
#   ./run.sh admin ...        tenants, users, API keys, key rotation
#   ./run.sh tasks ...        inspect and manage tasks
#   ./run.sh test [args]      the whole suite, embedded and Redis + PostgreSQL modes
#   ./run.sh bench SCRIPT     a benchmark under bench/
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY="$VENV/bin/python"

# Create the venv and install a requirements file when it changed since the last install.
ensure_venv() {
    local requirements=$1 stamp
    if [ ! -x "$PY" ]; then
        python3 -m venv "$VENV"
    fi
    stamp="$VENV/.installed-$(basename "$requirements")"
    if [ ! -f "$stamp" ] || ! cmp -s "$requirements" "$stamp"; then
        "$PY" -m pip install --quiet --disable-pip-version-check -r "$requirements"
        cp "$requirements" "$stamp"
    fi
}

# Debian packages the tests start as real servers.
TEST_PACKAGES=(redis-server postgresql dovecot-imapd dovecot-pop3d chromium faketime)

ensure_test_packages() {
    local missing=() package
    for package in "${TEST_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "run.sh: the tests need ${missing[*]}; install them as root: apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    echo "run.sh: installing ${missing[*]}" >&2
    apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# pytest's exit 5 (nothing collected) is a failure here, not a pass.
run_pytest() {
    local mode=$1 status=0
    shift
    echo "== tests, $mode mode" >&2
    EMAILSVC_TEST_MODE=$mode "$PY" -m pytest -q -p no:cacheprovider "$@" || status=$?
    if [ "$status" -eq 5 ]; then
        echo "run.sh: no tests were collected in $mode mode" >&2
        return 1
    fi
    return "$status"
}

serve_both() {
    ensure_venv requirements.txt
    "$PY" emailsvc.py migrate --banner   # one short banner; the first-key hint while no key exists
    # setsid: a terminal's Ctrl-C goes to its whole process group; the children
    # stay out of it and get SIGINT from the trap alone, once. (A second SIGINT
    # is Huey's "stop now", which would cut a running send in half.) SIGTERM,
    # as `docker stop` sends it, takes the same path: running tasks finish.
    setsid "$PY" emailsvc.py consumer &
    local consumer=$!
    setsid "$PY" emailsvc.py web &
    local web=$!
    setsid "$PY" watcher.py &
    local watcher=$!
    trap 'kill -INT "$consumer" "$web" "$watcher" 2>/dev/null; wait "$consumer" "$web" "$watcher"; exit 0' INT TERM
    # Any child ending stops the others: a half-running service is worse than none.
    wait -n "$consumer" "$web" "$watcher" || true
    kill -INT "$consumer" "$web" "$watcher" 2>/dev/null || true
    wait "$consumer" "$web" "$watcher" 2>/dev/null || true
}

usage() {
    cat <<'EOF'
usage: ./run.sh [COMMAND] [ARGS]   (COMMAND --help says more)

  (none)              web server, consumer and watcher on the embedded default; Ctrl-C stops all
  web                 the HTTP API alone, in the foreground
  consumer            the task consumer alone, in the foreground; every lane, or --lanes send,delete
  watcher             the IMAP IDLE watcher alone (push: new mail synced within seconds), in the foreground
  migrate             upgrade the database schema
  admin ACTION        create-tenant, create-user, create-key, list-keys, revoke-key, rotate-key,
                      backup, generate-secrets
  tasks ACTION        active, status, queues, workers, stats, ping, revoke, dead, retry, purge
  test [PYTEST ARGS]  the whole suite, embedded and Redis + PostgreSQL modes
  bench SCRIPT        a benchmark under bench/
EOF
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
    "")
        serve_both ;;
    web|consumer|admin|tasks|migrate)
        ensure_venv requirements.txt
        exec "$PY" emailsvc.py "$command" "$@" ;;
    watcher)   # its own entry point: the HTTP layer's imports would only add to its memory
        ensure_venv requirements.txt
        exec "$PY" watcher.py "$@" ;;
    test)
        ensure_test_packages
        ensure_venv requirements-test.txt
        status=0
        run_pytest embedded "$@" || status=1
        run_pytest scaleout "$@" || status=1
        exit "$status" ;;
    bench)
        ensure_venv requirements-test.txt
        ensure_venv bench/requirements.txt
        script=${1:?usage: ./run.sh bench SCRIPT [args]}
        shift
        exec "$PY" "bench/${script%.py}.py" "$@" ;;
    -h|--help|help)
        usage
        exit 0 ;;
    *)
        echo "run.sh: unknown command '$command'; ./run.sh --help lists the commands" >&2
        exit 2 ;;
esac
