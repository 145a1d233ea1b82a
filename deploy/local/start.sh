#!/usr/bin/env bash
# Start Enclave's production topology on this machine, in the background:
#   migrate + collectstatic, web (gunicorn with uvicorn workers), a Celery worker on
#   `default`, a Celery worker on `train`, exactly one beat, and the Flower SuperLink (TLS).
# PostgreSQL and Redis are expected to be running already (DATABASE_URL, CELERY_BROKER_URL).
# Every process runs the same start script as the container image (deploy/bin/), in its own
# session (setsid), so deploy/local/stop.sh can end each one with all its children.
#
#   DATABASE_OWNER_URL=postgres://postgres@127.0.0.1:5432/enclave \
#   DATABASE_URL=postgres://enclave_app@127.0.0.1:5432/enclave \
#   CELERY_BROKER_URL=redis://127.0.0.1:6379/0 deploy/local/start.sh
#   deploy/local/stop.sh
#
# DATABASE_OWNER_URL (optional) is the tables' owner: only migrate.sh uses it (migrations,
# then the application role of DATABASE_URL is created and granted row access); the
# processes started here never see it and run as DATABASE_URL's role, which row-level
# security binds.
# Optional: ENCLAVE_LOCAL_RUN_DIR (pids, logs, certs; default $ENCLAVE_VAR_DIR/local),
# ENCLAVE_WEB_PORT (8000), ENCLAVE_SUPERLINK_PORT (9092), WEB_CONCURRENCY (2),
# CELERY_CONCURRENCY (1), ENCLAVE_LOCAL_SKIP_MIGRATE=1, PYTHON (default: the repo's .venv).
set -o errexit -o pipefail -o nounset

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin="$repo/deploy/bin"

: "${DATABASE_URL:?set DATABASE_URL (PostgreSQL)}"
: "${CELERY_BROKER_URL:?set CELERY_BROKER_URL (Redis)}"
export ENCLAVE_VAR_DIR="${ENCLAVE_VAR_DIR:-$repo/var}"
export ENCLAVE_LOCAL_RUN_DIR="${ENCLAVE_LOCAL_RUN_DIR:-$ENCLAVE_VAR_DIR/local}"
export PYTHON="${PYTHON:-$repo/.venv/bin/python}"
export PATH="$(dirname "$PYTHON"):$PATH"
export PYTHONPATH="$repo/platform:$repo${PYTHONPATH:+:$PYTHONPATH}"
export CELERY_CONCURRENCY="${CELERY_CONCURRENCY:-1}"
web_port="${ENCLAVE_WEB_PORT:-8000}"
link_port="${ENCLAVE_SUPERLINK_PORT:-9092}"
run="$ENCLAVE_LOCAL_RUN_DIR"
mkdir -p "$run/pids" "$run/logs"

if compgen -G "$run/pids/*.pid" >/dev/null; then
    echo "start.sh: $run/pids holds pid files: already running? run deploy/local/stop.sh" >&2
    exit 1
fi

# Every process started here carries this tag in its environment, so stop.sh can find a
# descendant that left its process group (none is known to; it is a safety net).
export ENCLAVE_LOCAL_TAG="$run:$$:$RANDOM$RANDOM"
echo "$ENCLAVE_LOCAL_TAG" >"$run/tag"

# start NAME COMMAND...: in its own session (setsid execs in place: pid = process group).
start() {
    local name="$1"
    shift
    setsid "$@" >>"$run/logs/$name.log" 2>&1 </dev/null &
    echo "$!" >"$run/pids/$name.pid"
}

fail() {
    echo "start.sh: $1; stopping what started. Logs: $run/logs" >&2
    "$here/stop.sh" >&2 || true
    exit 1
}

cd "$repo"
if [[ "${ENCLAVE_LOCAL_SKIP_MIGRATE:-0}" != 1 ]]; then
    "$bin/migrate.sh" >>"$run/logs/migrate.log" 2>&1 || fail "migrate failed"
fi
unset DATABASE_OWNER_URL  # the long-running processes get the application role only

# The federation's TLS: a CA and the SuperLink's certificate, made once per run dir.
if [[ ! -r "$run/certs/server.key" ]]; then
    "$PYTHON" -m federated certs --out "$run/certs" --host 127.0.0.1 --host localhost \
        >>"$run/logs/certs.log" 2>&1 || fail "making the SuperLink certificates failed"
fi

WEB_BIND="127.0.0.1:$web_port" WEB_WORKER_TMP_DIR="${WEB_WORKER_TMP_DIR:-/dev/shm}" \
    start web "$bin/web.sh"
WORKER_HOSTNAME="local-$web_port" start worker-cpu "$bin/worker-cpu.sh"
WORKER_HOSTNAME="local-$web_port" start worker-gpu "$bin/worker-gpu.sh"
BEAT_PIDFILE="$run/beat.pid" start beat "$bin/beat.sh"
SUPERLINK_CERTS_DIR="$run/certs" SUPERLINK_STATE_DIR="$run/superlink" \
    SUPERLINK_HOST=127.0.0.1 SUPERLINK_PORT="$link_port" start superlink "$bin/superlink.sh"

# Ready when /readyz answers 200, every worker logged "ready." and the SuperLink listens.
deadline=$((SECONDS + ${ENCLAVE_LOCAL_START_TIMEOUT:-120}))
until "$PYTHON" "$bin/healthcheck.py" http "http://127.0.0.1:$web_port/readyz" 2>/dev/null; do
    ((SECONDS < deadline)) || fail "web did not become ready on port $web_port"
    sleep 0.5
done
for name in worker-cpu worker-gpu; do
    until grep -q "ready\." "$run/logs/$name.log"; do
        ((SECONDS < deadline)) || fail "$name did not become ready"
        sleep 0.5
    done
done
until "$PYTHON" "$bin/healthcheck.py" tcp 127.0.0.1 "$link_port" 2>/dev/null; do
    ((SECONDS < deadline)) || fail "the SuperLink did not listen on port $link_port"
    sleep 0.5
done
for pidfile in "$run"/pids/*.pid; do
    kill -0 "$(cat "$pidfile")" 2>/dev/null || fail "$(basename "$pidfile" .pid) exited"
done

echo "Enclave is running (stop with deploy/local/stop.sh; logs in $run/logs):"
echo "  web        http://127.0.0.1:$web_port"
echo "  superlink  127.0.0.1:$link_port (TLS; CA: $run/certs/ca.crt)"
