#!/usr/bin/env bash
# Celery beat: run EXACTLY ONE in the whole deployment (schedules live in the database,
# django-celery-beat's DatabaseScheduler; two beats would fire every schedule twice).
set -o errexit -o pipefail -o nounset
source "$(dirname "$0")/_common.sh"
exec "$PYTHON" -m celery -A controlplane beat \
    --scheduler django_celery_beat.schedulers:DatabaseScheduler \
    --pidfile "${BEAT_PIDFILE:-/tmp/enclave-beat.pid}" \
    --loglevel "${LOG_LEVEL:-INFO}"
