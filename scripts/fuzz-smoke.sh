#!/usr/bin/env bash
# The short form of the coverage-guided fuzzing that CI runs: every target of fuzz/targets.py for a bounded number
# of inputs (default 5000 each; FUZZ_RUNS to change). The long form: .venv/bin/python fuzz/run.py TARGET -max_total_time=600
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${FUZZ_RUNS:-5000}
for target in $(.venv/bin/python fuzz/run.py --list 2>/dev/null); do
  .venv/bin/python fuzz/run.py "$target" -runs="$runs" -max_total_time=60 >/tmp/connproxy-fuzz-"$target".log 2>&1 || {
    echo "fuzz target $target failed:"; tail -40 /tmp/connproxy-fuzz-"$target".log; exit 1; }
  echo "fuzz $target: $(grep -Eo 'Done [0-9]+ runs in [0-9]+ second' /tmp/connproxy-fuzz-"$target".log)"
done
