#!/usr/bin/env bash
# One device call (nvidia-h100-x1): the Triton paged attention kernels on the GPU — tests, a one-layer
# microbenchmark against the gather path, then throughput and latency with the kernels on and off.
set -u
export PYTHONUNBUFFERED=1 HEXGEN_NO_VENV=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-/tmp/hexgen-bench}; mkdir -p "$OUT"
PY=python3
step() { local t=$1; shift; echo "=== $* (limit ${t}s)"; timeout "$t" "$@"; echo "=== rc $?"; }
F='it/s\]\|tensor/s\]'
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
step 420 $PY -m pytest -q -x -p no:cacheprovider tests/test_paged_decode.py tests/test_attention.py \
  tests/test_gpu_fastpaths.py -k "not multi_gpu" 2>&1 | tee "$OUT/pytest_paged.log"
step 120 env PYTHONPATH=. $PY scripts/bench_paged_decode.py --out "$OUT/paged_decode.json" 2>&1 | tee "$OUT/paged_decode.log"
step 300 $PY -m hexgen.cli bench throughput --preset llama-2-7b --random-weights --dtype bf16 --cuda-graphs \
  --num-requests 128 --hf-max-batches 1 --out "$OUT/tput.json" 2>&1 | grep -v "$F" | tee "$OUT/tput.log"
step 300 $PY -m hexgen.cli bench throughput --kernel decode_kernel=off --kernel prefill_kernel=off \
  --preset llama-2-7b --random-weights --dtype bf16 --cuda-graphs --num-requests 128 --no-hf \
  --out "$OUT/tput_gather.json" 2>&1 | grep -v "$F" | tee "$OUT/tput_gather.log"
step 150 $PY -m hexgen.cli bench latency --preset llama-2-7b --random-weights --dtype bf16 --cuda-graphs --no-hf \
  --reps 2 --out "$OUT/lat_graphs.json" 2>&1 | grep -v "$F" | tee "$OUT/lat_graphs.log"
