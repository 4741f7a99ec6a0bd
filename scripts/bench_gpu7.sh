#!/usr/bin/env bash
# Issue 4 on nvidia-h200-x2 (docs/benchmarks.md "Run 12"): Llama-2-7B batch-1 decode at TP 1 and TP 2 with
# asynchronous steps (at TP 2 --async-steps-tp, opt-in since; the run predates the flag and had them on), and TP 2 with the synchronous loop, in the same run (the GEMV tuner timing graph
# replays); then the GPU tests of the fused SiLU/down GEMV and of asynchronous steps at TP 1 and TP 2.
# Usage on the GPU machine: OUT=/some/dir scripts/bench_gpu7.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 HEXGEN_NO_VENV=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/hexgen-bench}; mkdir -p "$OUT"
PY=python3
step() { local t=$1; shift; echo "=== $* (limit ${t}s)"; timeout "$t" "$@"; echo "=== rc $?"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
P="--preset llama-2-7b --random-weights --dtype bf16 --cuda-graphs --no-hf --reps 3"
keep() { grep "^engine \|roofline\|gemv \[\|Error\|error\|symmetric\|graphs are off" | cut -c1-600; }
step 80 env HEXGEN_LOG_LEVEL=INFO $PY -m hexgen.cli bench latency $P --out "$OUT/lat_tp1_async.json" 2>&1 | keep
step 90 $PY -m hexgen.cli bench latency $P --hetero-config 2 --async-steps-tp --out "$OUT/lat_tp2_async.json" 2>&1 \
  | keep
step 90 $PY -m hexgen.cli bench latency $P --hetero-config 2 --no-async-steps --out "$OUT/lat_tp2_sync.json" 2>&1 | keep
step 60 $PY -m pytest -q -p no:cacheprovider tests/test_fused.py 2>&1 | tail -2
step ${TEST_LIMIT:-200} $PY -m pytest -q -m gpu -p no:cacheprovider --timeout 120 -rA tests/test_gpu_fastpaths.py \
  -k "fused_kernels or async" > "$OUT/pytest_fast.log" 2>&1
grep -h "PASSED\|FAILED\|ERROR\|passed\|failed\|Error\|assert" "$OUT"/pytest_fast.log | head -30
date -u
