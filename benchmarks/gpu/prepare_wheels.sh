#!/usr/bin/env bash
# Wheels for the GPU machine (no network there): jaxgen's runtime dependencies that its
# image lacks (benchmarks/gpu/wheel_list.py), at the versions installed in this checkout's
# virtualenv, for the GPU machine's Python and platform. Run on a CPU machine with the
# registry at hand, from anywhere:
#   bash benchmarks/gpu/prepare_wheels.sh      # -> benchmarks/gpu/wheels/ (gitignored)
# Environment: PYTHON (default .venv/bin/python), GPU_PYTHON_VERSION (default 3.12).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python="${PYTHON:-.venv/bin/python}"
gpu_python="${GPU_PYTHON_VERSION:-3.12}"
out=benchmarks/gpu/wheels
rm -rf "$out"
mkdir -p "$out"
"$python" benchmarks/gpu/wheel_list.py --python-version "$gpu_python" >"$out/requirements.txt"
# pip matches manylinux_2_N tags exactly: name the common ones.
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
while read -r req; do
  if ! "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$gpu_python" \
    --implementation cp "${platforms[@]}" -d "$out" "$req" 2>/dev/null; then
    # Only a source release on the registry: build the wheel here (pure Python only, checked below).
    "$python" -m pip wheel --quiet --no-deps -w "$out" "$req"
  fi
done <"$out/requirements.txt"
tag="cp${gpu_python/./}"
for wheel in "$out"/*.whl; do
  case "$(basename "$wheel")" in
  *-none-any.whl | *-"$tag"-*.whl | *-abi3-*.whl) ;;
  *)
    echo "prepare_wheels: $(basename "$wheel") does not install on CPython $gpu_python" >&2
    exit 1
    ;;
  esac
done
echo "$(wc -l <"$out/requirements.txt") packages, $(du -sh "$out" | cut -f1) in $out:"
ls "$out"
