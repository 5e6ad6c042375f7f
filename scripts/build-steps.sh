#!/usr/bin/env bash
# Carry out the container image's build steps (Dockerfile) outside a container, then run the result the way the
# Kubernetes manifests do and check that it answers. For CI and machines without an image builder or registry.
#
#   1. wheels:  pip wheel of the Dockerfile's build context (pyproject.toml setup.cfg README.md connproxy twisted)
#   2. install: a fresh venv, only from those wheels (--no-index), Twisted's plugin cache written while the tree is
#               still writable, then the tree made read-only (chmod -R a-w), as in the image
#   3. user:    as root, the image's non-root user (uid/gid 10001, created as a system user `connproxy` if no user
#               has uid 10001) runs the processes; otherwise the current user does
#   4. config:  for each overlay (dedicated, shared), the proxy ConfigMap rendered by `kubectl kustomize
#               k8s/overlays/<overlay>` and the connector example (k8s/examples/connector) laid out at their mount paths under a temp dir, with Secret files minted by
#               `connproxy certs init/connector` and `connproxy token` (scripts/k8s_smoke.py stage); listeners on
#               127.0.0.1, on the configured ports where free
#   5. run:     `twistd -n --pidfile= connproxy --config ...` and `twistd -n --pidfile= connproxy-connector ...`
#   6. check:   HTTP proxy answers HTTP, SOCKS5 answers a greeting, GET /healthcheck over TLS is 200, /metrics
#               answers, the connector's tunnel registers, a request goes through proxy and connector
#               (scripts/k8s_smoke.py probe); then both processes are stopped by their PIDs (SIGTERM) and must shut
#               down cleanly
#
# Needs python3 (with venv), kubectl (for kustomize: the machine's, else .venv's from the test extra) and PyPI for
# step 1. Usage: scripts/build-steps.sh
# Environment: PYTHON (default python3), OVERLAYS (default "dedicated shared"), KEEP_WORK=1 keeps the temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:$PWD/.venv/bin"
PY=${PYTHON:-python3}
OVERLAYS=${OVERLAYS:-dedicated shared}
APP_UID=10001
STOP_SECONDS=40   # SIGTERM to exit: above the drain deadline (shutdown.drainTimeoutSeconds, default 20)
export PIP_DISABLE_PIP_VERSION_CHECK=1
started=$(date +%s)

if ! command -v kubectl >/dev/null 2>&1; then
  echo "build-steps: kubectl is required (for 'kubectl kustomize') and was not found on PATH" >&2
  exit 1
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/connproxy-build-steps.XXXXXX")
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  if [ "${KEEP_WORK:-0}" = 1 ]; then
    echo "build-steps: kept $WORK" >&2
  else
    chmod -R u+w "$WORK" 2>/dev/null || true
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

step() { printf '[%3ss] %s\n' "$(($(date +%s) - started))" "$*"; }

# Run a quiet pip command; show its output only if it fails (without pip's harmless 'WARNING: Location' lines).
quiet_pip() {
  if ! "$@" >"$WORK/pip.log" 2>&1; then
    grep -v 'WARNING: Location' "$WORK/pip.log" >&2 || true
    echo "build-steps: failed: $*" >&2
    exit 1
  fi
}

# 1. wheels (the Dockerfile's first stage), from a copy of exactly its build context
step "wheels: pip wheel of the build context"
mkdir -p "$WORK/context"
cp -R pyproject.toml setup.cfg README.md connproxy twisted "$WORK/context/"
find "$WORK/context" \( -name __pycache__ -o -name dropin.cache \) -prune -exec rm -rf {} +
"$PY" -m venv "$WORK/build-venv"
quiet_pip "$WORK/build-venv/bin/python" -m pip wheel --wheel-dir "$WORK/wheels" "$WORK/context"
step "wheels: $(find "$WORK/wheels" -name '*.whl' | wc -l) built or fetched"

# 2. install (the Dockerfile's second stage)
VENV=$WORK/opt/venv
step "install: fresh venv, --no-index from the wheels"
"$PY" -m venv "$VENV"
quiet_pip "$VENV/bin/python" -m pip install --no-cache-dir --no-index --find-links "$WORK/wheels" \
  "$WORK"/wheels/connproxy-*.whl
PLUGINS_DIR=$("$VENV/bin/python" -c 'import os, twisted.plugins; print(os.path.dirname(twisted.plugins.__file__))')
"$VENV/bin/python" -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
test -s "$PLUGINS_DIR/dropin.cache" || { echo "build-steps: no plugin cache in $PLUGINS_DIR" >&2; exit 1; }
# As in the Dockerfile: image layers keep whole seconds, and Twisted rewrites a cache that is not newer than a plugin.
touch -d "@$(($(date +%s) + 1))" "$PLUGINS_DIR/dropin.cache"
test -f "$PLUGINS_DIR/connproxy_plugin.py" || { echo "build-steps: connproxy_plugin.py not installed" >&2; exit 1; }
chmod -R a-w "$VENV"
step "install: $("$VENV/bin/python" -c 'import connproxy, twisted; print("connproxy", connproxy.__version__, "twisted", twisted.__version__)'), plugin cache written, tree read-only"

# 3. the user the processes run as
RUN_AS=()
if [ "$(id -u)" = 0 ]; then
  if ! getent group "$APP_UID" >/dev/null; then
    groupadd --system --gid "$APP_UID" connproxy
  fi
  if ! getent passwd "$APP_UID" >/dev/null; then
    useradd --system --uid "$APP_UID" --gid "$APP_UID" --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin connproxy
    step "user: created system user connproxy (uid $APP_UID)"
  fi
  RUN_AS=(setpriv --reuid="$APP_UID" --regid="$APP_UID" --clear-groups --)
  RUN_USER="$(getent passwd "$APP_UID" | cut -d: -f1) (uid $APP_UID)"
else
  RUN_USER="$(id -un) (uid $(id -u), not root: no user switch)"
fi
step "user: processes run as $RUN_USER"

# 4.-6. for each overlay: configuration and Secrets, run, check, stop
show_logs() {
  echo "--- proxy log (last lines)" >&2; tail -n 30 "$RUN_DIR/proxy.log" >&2 || true
  echo "--- connector log (last lines)" >&2; tail -n 30 "$RUN_DIR/connector.log" >&2 || true
}

# run_twistd POD_NAME LOG TWISTD-ARGS...: start twistd as the image does (its environment plus the pod's POD_NAME),
# as the image's user; sets LAST_PID.
run_twistd() {
  local pod=$1 log=$2
  shift 2
  env -i PATH="$VENV/bin:/usr/bin:/bin" HOME=/nonexistent LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 VIRTUAL_ENV="$VENV" POD_NAME="$pod" \
    "${RUN_AS[@]}" "$VENV/bin/twistd" -n --pidfile= "$@" >"$log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

# stop PID NAME LOG: SIGTERM, wait (bounded), require a clean shutdown.
stop() {
  local pid=$1 name=$2 log=$3 rc=0 deadline
  kill -TERM "$pid"
  deadline=$(($(date +%s) + STOP_SECONDS))
  while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
    echo "build-steps: $name (pid $pid) did not exit within ${STOP_SECONDS}s of SIGTERM" >&2
    show_logs
    exit 1
  fi
  wait "$pid" || rc=$?
  case $rc in
    0) step "stop: $name (pid $pid) exited 0 after SIGTERM" ;;
    *)
      echo "build-steps: $name (pid $pid) exited $rc after SIGTERM (the contract: drain, then exit 0)" >&2
      show_logs
      exit 1 ;;
  esac
  if grep -q 'Unable to write to plugin cache' "$log"; then
    echo "build-steps: $name tried to rewrite Twisted's plugin cache (a stale dropin.cache)" >&2
    show_logs
    exit 1
  fi
}

run_overlay() {
  local overlay=$1 stage
  RUN_DIR=$WORK/$overlay
  mkdir -p "$RUN_DIR/pki"
  step "$overlay: kubectl kustomize k8s/overlays/$overlay and k8s/examples/connector; Secrets from a fresh PKI"
  kubectl kustomize "k8s/overlays/$overlay" >"$RUN_DIR/proxy-manifests.yaml"
  kubectl kustomize k8s/examples/connector >"$RUN_DIR/connector-manifests.yaml"
  stage=$("$VENV/bin/python" scripts/k8s_smoke.py stage --proxy-manifests "$RUN_DIR/proxy-manifests.yaml" \
    --connector-manifests "$RUN_DIR/connector-manifests.yaml" --pki "$RUN_DIR/pki" --work "$RUN_DIR")
  eval "$stage"   # PROXY_CONFIG, CONNECTOR_CONFIG
  if [ ${#RUN_AS[@]} -gt 0 ]; then
    chmod 0755 "$WORK" "$RUN_DIR"
    chown -R "$APP_UID:$APP_UID" "$RUN_DIR/proxy-root" "$RUN_DIR/connector-root"
  fi
  step "$overlay: $PROXY_CONFIG"
  step "$overlay: $CONNECTOR_CONFIG"

  run_twistd connectivity-proxy-0 "$RUN_DIR/proxy.log" connproxy --config "$PROXY_CONFIG"
  local proxy_pid=$LAST_PID
  run_twistd connproxy-connector-0 "$RUN_DIR/connector.log" connproxy-connector --config "$CONNECTOR_CONFIG"
  local connector_pid=$LAST_PID
  step "$overlay: started twistd -n --pidfile= connproxy (pid $proxy_pid), connproxy-connector (pid $connector_pid)"

  if ! "$VENV/bin/python" scripts/k8s_smoke.py probe --state "$RUN_DIR/state.json" \
      --proxy-pid "$proxy_pid" --connector-pid "$connector_pid"; then
    show_logs
    exit 1
  fi
  stop "$connector_pid" connector "$RUN_DIR/connector.log"
  stop "$proxy_pid" proxy "$RUN_DIR/proxy.log"
}

for overlay in $OVERLAYS; do
  run_overlay "$overlay"
done

if [ -n "$(find "$VENV" -newer "$PLUGINS_DIR/dropin.cache" -print -quit)" ]; then
  echo "build-steps: files in the install tree changed while running:" >&2
  find "$VENV" -newer "$PLUGINS_DIR/dropin.cache" >&2
  exit 1
fi
step "summary: build steps ok; proxy (overlays: $OVERLAYS) and connector (k8s/examples/connector) served as" \
  "$RUN_USER from a read-only install; $(($(date +%s) - started)) s in all"
