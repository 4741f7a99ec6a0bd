#!/usr/bin/env bash
# Issue 4, one device call on nvidia-h100-x2: GPU tests of the fast paths (fused kernels, CUDA graphs with
# TP 2 through the symmetric-memory all-reduce), the decode profile at TP 1 and TP 2, then batch-1 decode
# latency of Llama-2-7B at TP 1 (one card) and TP 2 (both) in the same run. See docs/benchmarks.md.
# Usage on the GPU machine: OUT=/some/dir scripts/bench_gpu4.sh [tests] [profile] [bench]
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 HEXGEN_NO_VENV=1
OUT=${OUT:-/tmp/hexgen-bench}; mkdir -p "$OUT"
PY=python3
F='it/s\]\|tensor/s\]'
what=${*:-tests profile bench}
step() { local t=$1; shift; echo "=== $* (limit ${t}s)"; timeout "$t" "$@"; echo "=== rc $?"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
if [[ $what == *tests* ]]; then
  step 60 $PY -m pytest -q -p no:cacheprovider tests/test_fused.py 2>&1 | tail -8 | tee "$OUT/pytest_fused.log"
  step 150 $PY -m pytest -q -m gpu -p no:cacheprovider --timeout 60 tests/test_gpu_fastpaths.py 2>&1 \
    | tail -25 | tee "$OUT/pytest_gpu.log"
fi
if [[ $what == *profile* ]]; then
  step 120 $PY scripts/profile_decode.py --tp 1 --loop 2>&1 | grep -v "$F" | tail -5
  step 90 $PY scripts/profile_decode.py --tp 2 2>&1 | grep -v "$F" | tail -5
fi
if [[ $what == *bench* ]]; then
  P="--preset llama-2-7b --random-weights --dtype bf16 --cuda-graphs --no-hf --reps 2"
  step 80 $PY -m hexgen.cli bench latency $P --out "$OUT/lat_tp1.json" 2>&1 | grep -v "$F" | tail -12
  step 100 $PY -m hexgen.cli bench latency $P --hetero-config 2 --out "$OUT/lat_tp2.json" 2>&1 | grep -v "$F" | tail -12
fi
date -u
