#!/usr/bin/env bash
# Flower SuperLink: the federation's meeting point. Members' SuperNodes dial it over TLS
# (the federation CA in SUPERLINK_CERTS_DIR; make it with `python -m federated certs`)
# and authenticate with their registered node keys.
set -o errexit -o pipefail -o nounset
source "$(dirname "$0")/_common.sh"
certs="${SUPERLINK_CERTS_DIR:-/certs}"
state="${SUPERLINK_STATE_DIR:-${ENCLAVE_VAR_DIR:-/var/lib/enclave}/superlink}"
mkdir -p "$state"
for f in ca.crt server.crt server.key; do
    [[ -r "$certs/$f" ]] || { echo "superlink: $certs/$f is missing" >&2; exit 1; }
done
exec "${FLOWER_SUPERLINK:-flower-superlink}" \
    --ssl-ca-certfile "$certs/ca.crt" \
    --ssl-certfile "$certs/server.crt" \
    --ssl-keyfile "$certs/server.key" \
    --enable-supernode-auth \
    --disable-runtime-dependency-installation \
    --host "${SUPERLINK_HOST:-0.0.0.0}" \
    --port "${SUPERLINK_PORT:-9092}" \
    --database "$state/state.db"
