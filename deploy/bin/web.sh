#!/usr/bin/env bash
# Web: gunicorn supervising uvicorn workers (ASGI). Each worker hosts its own serving
# engine (loaded on first use), so WEB_CONCURRENCY multiplies the engine's memory.
# uvicorn's own `uvicorn.workers` module is deprecated; the worker class lives in the
# `uvicorn-worker` package (uvicorn_worker.UvicornWorker).
set -o errexit -o pipefail -o nounset
source "$(dirname "$0")/_common.sh"
exec "$PYTHON" -m gunicorn controlplane.asgi:application \
    --worker-class uvicorn_worker.UvicornWorker \
    --bind "${WEB_BIND:-0.0.0.0:8000}" \
    --workers "${WEB_CONCURRENCY:-2}" \
    --timeout "${WEB_TIMEOUT:-120}" \
    --graceful-timeout "${WEB_GRACEFUL_TIMEOUT:-30}" \
    --keep-alive 5 \
    --worker-tmp-dir "${WEB_WORKER_TMP_DIR:-/dev/shm}" \
    --forwarded-allow-ips "${FORWARDED_ALLOW_IPS:-127.0.0.1}" \
    --access-logfile - \
    --error-logfile - \
    --log-level "${WEB_LOG_LEVEL:-warning}"
