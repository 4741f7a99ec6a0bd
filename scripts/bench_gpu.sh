#!/usr/bin/env bash
# One device call: GPU tests, then the Llama-2-7B latency and throughput benches (see docs/benchmarks.md).
# Usage on the GPU machine: OUT=/some/dir scripts/bench_gpu.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 HEXGEN_NO_VENV=1
OUT=${OUT:-/tmp/hexgen-bench}; mkdir -p "$OUT"
PY=python3
step() { local t=$1; shift; echo "=== $* (limit ${t}s)"; timeout "$t" "$@"; echo "=== rc $?"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
P="--preset llama-2-7b --random-weights --dtype bf16"
step 150 $PY -m hexgen.cli bench latency $P --cuda-graphs --out "$OUT/lat_graphs.json" 2>&1 | grep -v 'it/s\]\|tensor/s\]' | tee "$OUT/lat_graphs.log"
step 230 $PY -m hexgen.cli bench throughput $P --cuda-graphs --num-requests ${NREQ:-200} --hf-max-batches 1 \
  --out "$OUT/tput_graphs.json" 2>&1 | grep -v 'it/s\]\|tensor/s\]' | tee "$OUT/tput_graphs.log"
tests=tests/test_gpu_fastpaths.py; [ -f tests/test_gpu_layouts.py ] && tests="$tests tests/test_gpu_layouts.py"
step 120 $PY -m pytest -q -m gpu -p no:cacheprovider $tests 2>&1 | tee "$OUT/pytest_gpu.log"
step 80 $PY -m hexgen.cli bench latency $P --no-hf --reps 2 --out "$OUT/lat_ref.json" 2>&1 | grep -v 'it/s\]\|tensor/s\]' | tee "$OUT/lat_ref.log"
