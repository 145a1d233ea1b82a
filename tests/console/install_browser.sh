#!/usr/bin/env bash
# Install what the console's browser tests need, idempotently: Debian's chromium (the
# tests launch /usr/bin/chromium themselves; Playwright never downloads a browser) and
# Playwright for Python in the project's virtual environment.
#   usage: tests/console/install_browser.sh [path/to/venv/bin/python]
set -o errexit -o pipefail -o nounset

PY="${1:-.venv/bin/python}"
CHROMIUM=/usr/bin/chromium

if ! [ -x "$CHROMIUM" ]; then
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
"$CHROMIUM" --version

if ! "$PY" -c "import playwright" 2>/dev/null; then
    "$PY" -m pip install --quiet "playwright>=1.49"
fi
"$PY" -c "import importlib.metadata as m; print('playwright', m.version('playwright'))"
