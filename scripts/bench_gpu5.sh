#!/usr/bin/env bash
# Issue 4, second device call on nvidia-h100-x2 (after scripts/bench_gpu4.sh): GPU tests (single-GPU ones on
# the second card while the multi-GPU ones run, each with its own KV size), the decode profile at TP 1 and
# TP 2, then Llama-2-7B batch-1 decode: TP 1 with the old path (--kernel fused=off --kernel gemv=cublas), TP 1 and
# TP 2 with the fast paths (--kernel gemv=auto, the default when it ran) and TP 1 with the Triton GEMV
# everywhere (--kernel gemv=triton, the default since), in the same run; the profiles last. Run 7 of
# docs/benchmarks.md (it ran on two H200s: H100s were not available).
# Usage on the GPU machine: OUT=/some/dir scripts/bench_gpu5.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 HEXGEN_NO_VENV=1
OUT=${OUT:-/tmp/hexgen-bench}; mkdir -p "$OUT"
PY=python3
F='it/s\]\|tensor/s\]'
step() { local t=$1; shift; echo "=== $* (limit ${t}s)"; timeout "$t" "$@"; echo "=== rc $?"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
step 60 $PY -m pytest -q -p no:cacheprovider tests/test_fused.py 2>&1 | tail -3
T="-q -m gpu -p no:cacheprovider --timeout 100 -rA tests/test_gpu_fastpaths.py"
(CUDA_VISIBLE_DEVICES=1 timeout 200 $PY -m pytest $T -k "not multi_gpu" > "$OUT/pytest_single.log" 2>&1
 echo "rc $?" >> "$OUT/pytest_single.log") &
step 200 $PY -m pytest $T -k multi_gpu > "$OUT/pytest_multi.log" 2>&1
wait
grep -h "PASSED\|FAILED\|ERROR\|passed\|failed\|^rc\|Error\|assert" "$OUT"/pytest_*.log | head -40
P="--preset llama-2-7b --random-weights --dtype bf16 --cuda-graphs --no-hf --reps 2"
step 70 $PY -m hexgen.cli bench latency $P --kernel fused=off --kernel gemv=cublas --out "$OUT/lat_tp1_old.json" 2>&1 \
  | grep "^engine \|roofline"
step 70 $PY -m hexgen.cli bench latency $P --kernel gemv=auto --out "$OUT/lat_tp1.json" 2>&1 | grep -v "$F" | tail -9
step 90 $PY -m hexgen.cli bench latency $P --kernel gemv=auto --hetero-config 2 --out "$OUT/lat_tp2.json" 2>&1 \
  | grep -v "$F" | tail -9
step 70 $PY -m hexgen.cli bench latency $P --kernel gemv=triton --out "$OUT/lat_tp1_triton.json" 2>&1 \
  | grep "^engine \|roofline"
step 110 $PY scripts/profile_decode.py --tp 1 --loop 2>&1 | grep "^PROFILE" | cut -c1-3000
step 80 $PY scripts/profile_decode.py --tp 2 2>&1 | grep "^PROFILE" | cut -c1-2500
date -u
