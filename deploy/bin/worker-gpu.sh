#!/usr/bin/env bash
# Celery worker for the `train` queue: one long job per process (concurrency 1,
# prefetch 1, acks late in controlplane/celery.py). One per GPU.
set -o errexit -o pipefail -o nounset
source "$(dirname "$0")/_common.sh"
exec "$PYTHON" -m celery -A controlplane worker \
    -Q train \
    -n "gpu@${WORKER_HOSTNAME:-%h}" \
    --concurrency 1 \
    --prefetch-multiplier 1 \
    --without-gossip --without-mingle \
    --loglevel "${LOG_LEVEL:-INFO}"
