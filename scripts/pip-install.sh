#!/usr/bin/env bash
# pip install into a virtual environment without pip's harmless "WARNING: Location ... is ignored" lines
# (tooling.md: the machine's pip config names local indexes that do not exist); a failed install fails (pip's
# exit status) and shows pip's output. Usage: scripts/pip-install.sh VENV PIP-INSTALL-ARGS...
set -euo pipefail
venv=$1
shift
status=0
out=$("$venv/bin/python" -m pip install -q "$@" 2>&1) || status=$?
printf '%s\n' "$out" | grep -v -e 'WARNING: Location' -e '^$' >&2 || true
exit "$status"
