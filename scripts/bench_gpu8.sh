#!/usr/bin/env bash
# Issue 4, the measurement "Run 12" of docs/benchmarks.md leaves next: asynchronous against synchronous steps
# under load, alternating, after a throw-away warm-up run so no measured run compiles Triton kernels.
#   tp1: one H200 (nvidia-h200): Llama-2-7B `bench throughput`, 256 requests, with and without --no-async-steps,
#        twice each, alternating;
#   tp4: nvidia-h200-x4: Llama-2-70B TP 4 under the run-10 load (bench/planner/runs_h200x4.json): tp4-sync
#        (the first one a warm-up, not compared) and tp4-async alternating.
# Usage on the GPU machine: OUT=/some/dir scripts/bench_gpu8.sh tp1|tp4
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 HEXGEN_NO_VENV=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/hexgen-bench}; mkdir -p "$OUT"
M=${1:-tp1}
PY=python3
step() { local t=$1; shift; echo "=== $* (limit ${t}s)"; timeout "$t" "$@"; echo "=== rc $?"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
if [ "$M" = tp1 ]; then
  P="--preset llama-2-7b --random-weights --dtype bf16 --cuda-graphs --num-requests 256 --max-num-seqs 128 --no-hf"
  step 120 $PY -m hexgen.cli bench throughput $P --num-requests 32 --out "$OUT/warm.json" > /dev/null 2>&1
  for i in 1 2; do
    step 120 $PY -m hexgen.cli bench throughput $P --out "$OUT/tput_async_$i.json" 2>&1 | grep "^engine "
    step 120 $PY -m hexgen.cli bench throughput $P --no-async-steps --out "$OUT/tput_sync_$i.json" 2>&1 | grep "^engine "
  done
fi
if [ "$M" = tp4 ]; then
  step 540 $PY scripts/planner_measure.py bench/planner/runs_h200x4.json "$OUT/measure_tp4_ab.json" \
    tp4-sync,tp4-async,tp4-sync,tp4-async,tp4-sync 2>&1 | grep "^===\|^{" | cut -c1-300
fi
date -u
