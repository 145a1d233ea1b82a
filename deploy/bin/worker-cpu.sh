#!/usr/bin/env bash
# Celery worker for the `default` queue: short tasks (the lease reaper, file checks).
set -o errexit -o pipefail -o nounset
source "$(dirname "$0")/_common.sh"
exec "$PYTHON" -m celery -A controlplane worker \
    -Q default \
    -n "cpu@${WORKER_HOSTNAME:-%h}" \
    --concurrency "${CELERY_CONCURRENCY:-2}" \
    --without-gossip --without-mingle \
    --loglevel "${LOG_LEVEL:-INFO}"
