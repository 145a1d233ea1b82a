#!/usr/bin/env bash
# One-shot job before (re)starting the others: schema migrations, then static files into
# ENCLAVE_VAR_DIR/static (served by WhiteNoise from the shared volume).
#
# Two database roles: migrations run as the tables' owner (DATABASE_OWNER_URL), and the
# application's role in DATABASE_URL is then created if missing and granted row access only
# (db_app_role): no superuser, no BYPASSRLS, owns nothing, so PostgreSQL row-level security
# binds every web, worker and beat process. Without DATABASE_OWNER_URL, DATABASE_URL
# migrates too (one role: the embedded SQLite default, or a deployment without the wall).
set -o errexit -o pipefail -o nounset
source "$(dirname "$0")/_common.sh"
if [[ -n "${DATABASE_OWNER_URL:-}" ]]; then
    app_url="${DATABASE_URL:?set DATABASE_URL (the application role) with DATABASE_OWNER_URL}"
    DATABASE_URL="$DATABASE_OWNER_URL" "$PYTHON" -m django migrate --noinput
    DATABASE_URL="$DATABASE_OWNER_URL" "$PYTHON" -m django db_app_role --app-url "$app_url"
else
    "$PYTHON" -m django migrate --noinput
fi
exec "$PYTHON" -m django collectstatic --noinput --verbosity 0
