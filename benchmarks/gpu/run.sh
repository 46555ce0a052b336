#!/usr/bin/env bash
# Issue 19's GPU run in one command, on the GPU machine, from any directory:
#   bash benchmarks/gpu/run.sh [--copy-to DIR] [run.py options, e.g. --rows beam5_gpt2_124m]
# Installs the wheels of prepare_wheels.sh that the machine lacks and jaxgen (install.sh,
# offline, nothing already installed is replaced), then runs run.py under an
# 8-minute limit. Whether run.py ends or is stopped, the results file and RESULTS.md hold
# every finished row; --copy-to DIR copies both there at the end.
# Environment: PYTHON (default python3: on the GPU machine the one that has torch and JAX).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
python="${PYTHON:-python3}"
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then  # the plan only: nothing installed, nothing measured
    exec "$python" benchmarks/gpu/run.py "$@"
  fi
done
copy_to=""
if [ "${1:-}" = "--copy-to" ]; then
  copy_to="$2"
  shift 2
fi
PYTHON="$python" bash benchmarks/gpu/install.sh || exit 1
out="benchmarks/gpu/results-$(date -u +%Y-%m-%d-%H%M).jsonl"
PYTHONUNBUFFERED=1 timeout --kill-after=10 480 "$python" benchmarks/gpu/run.py --out "$out" "$@"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "run.sh: run.py stopped at 8 minutes; recording the rows it finished"
  "$python" benchmarks/gpu/report.py "$out" --results-md benchmarks/RESULTS.md
fi
if [ -n "$copy_to" ]; then
  cp "$out" benchmarks/RESULTS.md "$copy_to"/
fi
exit "$rc"
