#!/usr/bin/env bash
# Stop what deploy/local/start.sh started: SIGTERM each process group (the process and
# every child it forked: gunicorn's workers, Celery's pool, the SuperLink's apps), wait,
# then SIGKILL whatever is left. Removes the pid files; keeps the logs.
#
# Same ENCLAVE_LOCAL_RUN_DIR (or ENCLAVE_VAR_DIR) as start.sh. STOP_TIMEOUT: seconds (20).
set -o errexit -o pipefail -o nounset

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
run="${ENCLAVE_LOCAL_RUN_DIR:-${ENCLAVE_VAR_DIR:-$repo/var}/local}"
timeout="${STOP_TIMEOUT:-20}"

shopt -s nullglob
pidfiles=("$run"/pids/*.pid)
if ((${#pidfiles[@]} == 0)); then
    echo "stop.sh: nothing to stop in $run"
    exit 0
fi

alive() { kill -0 -- "-$1" 2>/dev/null; }

groups=()
for pidfile in "${pidfiles[@]}"; do
    pgid="$(cat "$pidfile")"
    [[ "$pgid" =~ ^[0-9]+$ ]] || { rm -f "$pidfile"; continue; }
    groups+=("$pgid")
    kill -TERM -- "-$pgid" 2>/dev/null || true
done

deadline=$((SECONDS + timeout))
for pgid in "${groups[@]}"; do
    while alive "$pgid" && ((SECONDS < deadline)); do
        sleep 0.2
    done
    if alive "$pgid"; then
        echo "stop.sh: process group $pgid ignored SIGTERM for ${timeout}s: SIGKILL" >&2
        kill -KILL -- "-$pgid" 2>/dev/null || true
    fi
done
# After SIGKILL only unreaped zombies can answer, and not for long.
deadline=$((SECONDS + 5))
for pgid in "${groups[@]}"; do
    while alive "$pgid" && ((SECONDS < deadline)); do sleep 0.1; done
done
# Safety net: anything still carrying start.sh's tag in its environment.
if [[ -r "$run/tag" ]]; then
    tag="ENCLAVE_LOCAL_TAG=$(cat "$run/tag")"
    for environ in /proc/[0-9]*/environ; do
        pid="${environ#/proc/}"
        pid="${pid%/environ}"
        if [[ "$pid" != "$$" ]] && grep -qzxF "$tag" "$environ" 2>/dev/null; then
            echo "stop.sh: pid $pid outlived its process group: SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
fi
rm -f "${pidfiles[@]}" "$run/beat.pid" "$run/tag"
echo "stopped ${#groups[@]} process groups"
