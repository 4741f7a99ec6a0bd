#!/usr/bin/env bash
# Issue 4 (docs/benchmarks.md "Run 13"), one H200 (nvidia-h200): after the paged decode kernel's new launch
# settings, Llama-2-7B throughput on 1,000 requests beside HF static batches of 64 (as run 11), with the
# scheduler's and the loop's counters logged (HEXGEN_LOG_LEVEL=INFO, lines "scheduler: ..."); then batch-1
# decode beside the roofline.
# Usage on the GPU machine: OUT=/some/dir scripts/bench_gpu10.sh [tput] [lat]
set -u
export PYTHONUNBUFFERED=1 HEXGEN_NO_VENV=1 HEXGEN_LOG_LEVEL=INFO
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/hexgen-bench}; mkdir -p "$OUT"
PY=python3
F='it/s\]\|tensor/s\]'
step() { local t=$1; shift; echo "=== $* (limit ${t}s)"; timeout "$t" "$@"; echo "=== rc $?"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
for M in ${*:-tput lat}; do
if [ "$M" = tput ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  step ${TPUT_LIMIT:-420} $PY -m hexgen.cli bench throughput --preset llama-2-7b --random-weights --dtype bf16 \
    --cuda-graphs --num-requests ${REQUESTS:-1000} --max-num-seqs ${SEQS:-256} --max-num-batched-tokens \
    ${BUDGET:-4096} --hf-max-batches ${HF_BATCHES:-2} ${EXTRA:-} --out "$OUT/tput_7b${TAG:-}.json" > "$OUT/tput${TAG:-}.log" 2>&1
  grep -v "$F" "$OUT/tput${TAG:-}.log" | grep -v "preempting\|INFO" | tail -14; grep "scheduler:\|asynchronous steps:" "$OUT/tput${TAG:-}.log"
  unset PYTORCH_CUDA_ALLOC_CONF
fi
if [ "$M" = lat ]; then
  step 120 $PY -m hexgen.cli bench latency --preset llama-2-7b --random-weights --dtype bf16 --cuda-graphs --no-hf \
    --reps 3 --out "$OUT/lat.json" 2>&1 | grep -v "$F" | grep -v INFO | tail -7
fi
done
date -u
