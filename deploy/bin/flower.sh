#!/usr/bin/env bash
# Celery Flower (monitoring), always behind HTTP basic auth: FLOWER_BASIC_AUTH=user:password.
set -o errexit -o pipefail -o nounset
source "$(dirname "$0")/_common.sh"
: "${FLOWER_BASIC_AUTH:?set FLOWER_BASIC_AUTH=user:password}"
exec "$PYTHON" -m celery -A controlplane flower \
    --address="${FLOWER_ADDRESS:-0.0.0.0}" \
    --port="${FLOWER_PORT:-5555}" \
    --basic-auth="$FLOWER_BASIC_AUTH" \
    --persistent=False
