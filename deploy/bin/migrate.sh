#!/usr/bin/env bash
# One-shot job before (re)starting the others: schema migrations, then static files into
# ENCLAVE_VAR_DIR/static (served by WhiteNoise from the shared volume).
set -o errexit -o pipefail -o nounset
source "$(dirname "$0")/_common.sh"
"$PYTHON" -m django migrate --noinput
exec "$PYTHON" -m django collectstatic --noinput --verbosity 0
