#!/usr/bin/env bash
# Second device call (nvidia-h100-x2): multi-GPU tests, TP 2 vs TP 1 batch-1 decode, throughput on 1 GPU.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 HEXGEN_NO_VENV=1
OUT=${OUT:-/tmp/hexgen-bench}; mkdir -p "$OUT"
PY=python3
step() { local t=$1; shift; echo "=== $* (limit ${t}s)"; timeout "$t" "$@"; echo "=== rc $?"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nvidia-smi topo -m | head -4
P="--preset llama-2-7b --random-weights --dtype bf16 --cuda-graphs"
F='it/s\]\|tensor/s\]'
tests=tests/test_gpu_fastpaths.py; [ -f tests/test_gpu_layouts.py ] && tests="$tests tests/test_gpu_layouts.py"
step 150 $PY -m pytest -q -m gpu -p no:cacheprovider $tests 2>&1 | tee "$OUT/pytest_gpu.log"
step 60 $PY -m hexgen.cli bench latency $P --no-hf --reps 2 --out "$OUT/lat_tp1.json" 2>&1 | grep -v "$F" | tee "$OUT/lat_tp1.log"
step 80 $PY -m hexgen.cli bench latency $P --hetero-config 2 --no-hf --reps 2 --out "$OUT/lat_tp2.json" 2>&1 | grep -v "$F" | tee "$OUT/lat_tp2.log"
step 280 $PY -m hexgen.cli bench throughput $P --num-requests ${NREQ:-128} --hf-max-batches 1 \
  --out "$OUT/tput.json" 2>&1 | grep -v "$F" | tee "$OUT/tput.log"
