#!/usr/bin/env bash
# Install connproxy with its test tools into .venv and run everything CI runs: ruff, mypy, the unit tests
# (plain pytest, hypothesis and trial-style tests; no running reactor) and the integration tests (pytest-twisted,
# real sockets on 127.0.0.1). The two pytest runs are separate processes on purpose: trial-style TestCases and
# pytest-twisted's reactor greenlet do not mix in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# scripts/pip-install.sh: pip without its harmless "WARNING: Location" lines; a failed install fails the run.
./scripts/pip-install.sh .venv --upgrade pip
# compat editable mode: the flat layout's twisted/plugins must be on sys.path for twistd to find the plugins.
./scripts/pip-install.sh .venv -e '.[test]' --config-settings editable_mode=compat
.venv/bin/python -c 'import connproxy, h11, jwt, pytest_twisted, hypothesis' # fail early on a broken install
# kubectl (for `kubectl kustomize`, no cluster): the machine's if it has one, else the test extra's wheel in .venv.
export PATH="$PATH:$PWD/.venv/bin"
.venv/bin/ruff check connproxy tests twisted bench fuzz scripts
.venv/bin/mypy
.venv/bin/pytest -p no:twisted -q tests/unit "$@"
.venv/bin/pytest -q tests/integration "$@"
.venv/bin/python bench/run.py --smoke  # the benchmark in seconds (tiny sizes, no timing claims), so it cannot rot
.venv/bin/python bench/floor.py --smoke | tail -n 1  # the bare-relay floor (bench/floor.py), likewise
./scripts/fuzz-smoke.sh
# The soak run's short form (bench/soak.py: 10 minutes by default).
.venv/bin/python bench/soak.py --duration 20 --clients 12 --stallers 2 --restart-every 8 --max-size 1048576 >/tmp/connproxy-soak.json
echo "soak: $(.venv/bin/python -c 'import json,sys; r=json.load(open("/tmp/connproxy-soak.json")); print(r["requests_total"], "requests,", r["bytes"], "bytes, errors", r["errors_by_cause"])')"
# The memory-waves run's short form (bench/waves.py; one small wave: the 5th tunnel of an identity refused, stalled
# streams and silent connections cleaned up), so it cannot rot either.
.venv/bin/python bench/waves.py --waves 1 --hold 2 --settle 4 --downloads 5 --uploads 5 --handshakes 20 \
  --idle-http 20 --download-size 8MiB --upload-size 8MiB | tail -n 4
# Deployment: Kubernetes manifests and Dockerfile offline (schemas, hadolint, shellcheck), then the image's build
# steps outside a container with the manifests' configuration, run and probed on 127.0.0.1.
./scripts/check-k8s.sh
./scripts/build-steps.sh
