#!/usr/bin/env bash
# Third device call (nvidia-h100-x2, warm): TP 2 eager (does TP 2 run at all), throughput on 1 GPU.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 HEXGEN_NO_VENV=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-/tmp/hexgen-bench}; mkdir -p "$OUT"
PY=python3
step() { local t=$1; shift; echo "=== $* (limit ${t}s)"; timeout "$t" "$@"; echo "=== rc $?"; }
F='it/s\]\|tensor/s\]'
step 70 $PY -m hexgen.cli bench latency --preset llama-2-7b --random-weights --dtype bf16 --hetero-config 2 --no-hf \
  --reps 1 --new-tokens 64 --out "$OUT/lat_tp2_eager.json" 2>&1 | grep -v "$F" | tee "$OUT/lat_tp2_eager.log"
step 300 $PY -m hexgen.cli bench throughput --preset llama-2-7b --random-weights --dtype bf16 --cuda-graphs \
  --num-requests 128 --hf-max-batches 1 --out "$OUT/tput.json" 2>&1 | grep -v "$F" | tee "$OUT/tput.log"
