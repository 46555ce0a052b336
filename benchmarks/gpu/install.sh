#!/usr/bin/env bash
# Installs what a GPU call needs, offline: the carried wheels of prepare_wheels.sh whose
# package the machine lacks (nothing already installed is replaced), then jaxgen without
# dependencies. Run from the repository root (run.sh and followup.sh do):
#   bash benchmarks/gpu/install.sh
# Environment: PYTHON (default python3: on the GPU machine the one that has torch and JAX).
set -uo pipefail
python="${PYTHON:-python3}"
wheels=benchmarks/gpu/wheels
if [ -f "$wheels/requirements.txt" ]; then
  mapfile -t missing < <("$python" benchmarks/gpu/wheel_list.py --missing "$wheels/requirements.txt")
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${#missing[@]} wheels: ${missing[*]}"
    "$python" -m pip install --quiet --no-index --no-deps --find-links "$wheels" "${missing[@]}" || exit 1
  fi
else
  echo "install.sh: no $wheels/requirements.txt (run prepare_wheels.sh on a CPU machine first);" \
    "assuming jaxgen's dependencies are installed"
fi
# No build isolation: it would fetch setuptools from the (unreachable) registry.
"$python" -m pip install --quiet --no-deps --no-build-isolation -e . || exit 1
