#!/usr/bin/env bash
# The GPU call prepared after the 2026-12-04 15:30 exploratory call (RESULTS.md), for the
# next session with a GPU; at most ~565 s of command time (give the device call 590 s):
#   bash benchmarks/gpu/followup.sh        # from the repository root, wheels carried
# 1. rows 1, 2, 5, 8 with their peers: the train row with pretraining padding as attention
#    lengths, the decode rows with the loop as one CUDA graph (per-jit option), beam search;
# 2. row 9 (compile time 12 vs 48 layers), jaxgen alone;
# 3. train GPT-2 124M with train.loss_chunk=1024 (no recompute of the head), jaxgen alone;
# 4. clean profiles (a warm-up run first) of the train row and of Llama batch-32 decoding.
# Results files land in benchmarks/gpu/ and sections in benchmarks/RESULTS.md; everything
# is also copied to $OUT (default /tmp/out), which the device tool brings back.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
T0=$(date +%s)
elapsed() { echo $(($(date +%s) - T0)); }
py="${PYTHON:-python3}"
out="${OUT:-/tmp/out}"
mkdir -p "$out"
exec > >(tee -a "$out/followup.log") 2>&1
PYTHON="$py" bash benchmarks/gpu/install.sh || exit 1
export PYTHONUNBUFFERED=1
stamp=$(date -u +%Y-%m-%d-%H%M)
run() { # run.py with a wall-clock limit a little above its own deadline
  local limit=$1
  shift
  timeout --kill-after=5 "$limit" "$py" benchmarks/gpu/run.py --deadline-s "$((limit - 10))" "$@"
}
echo "== [$(elapsed) s] rows 1, 2, 5, 8 with peers"
run 235 --repeats 2 --rows train_gpt2_124m,decode_gpt2_124m_b1,decode_gpt2_124m_b64,beam5_gpt2_124m \
  --out "benchmarks/gpu/results-$stamp.jsonl"
echo "== [$(elapsed) s] row 9, jaxgen alone"
run 125 --no-peers --repeats 1 --rows compile_12_vs_48 --out "benchmarks/gpu/results-$stamp-row9.jsonl"
echo "== [$(elapsed) s] train.loss_chunk=1024, jaxgen alone"
run 85 --no-peers --repeats 2 --rows train_gpt2_124m --set train.loss_chunk=1024 \
  --out "benchmarks/gpu/results-$stamp-loss-chunk-1024.jsonl"
left=$((565 - $(elapsed)))
echo "== [$(elapsed) s] profiles (${left} s left)"
timeout "$left" "$py" benchmarks/gpu/profile_rows.py --rows train_gpt2_124m,decode_llama_1b_b32 \
  --summary-dir "benchmarks/gpu/profiles/$stamp" --top 30
cp benchmarks/gpu/results-"$stamp"*.jsonl benchmarks/RESULTS.md "$out"/
cp -r "benchmarks/gpu/profiles/$stamp" "$out"/profiles 2>/dev/null
echo "== [$(elapsed) s] done"
