#!/usr/bin/env bash
# Issue 4, asynchronous steps (docs/benchmarks.md "Run 11"), on one H200 (nvidia-h200).
#   lat:  the single-GPU GPU tests (async against sync steps in graphs among them), then Llama-2-7B batch-1
#         decode with asynchronous steps and with the old synchronous loop (--no-async-steps), alternated
#         twice in the same run, each beside the roofline measured in it;
#   tput: Llama-2-7B throughput on 1,000 requests (prompts 64-1024, outputs 32-512, seed 0) all offered at
#         once, max_num_seqs 256, beside HF generate in static batches of 64 on the first HF_BATCHES batches
#         of the same requests.
# Usage on the GPU machine: OUT=/some/dir scripts/bench_gpu6.sh lat|tput
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 HEXGEN_NO_VENV=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/hexgen-bench}; mkdir -p "$OUT"
M=${1:-lat}
PY=python3
F='it/s\]\|tensor/s\]'
step() { local t=$1; shift; echo "=== $* (limit ${t}s)"; timeout "$t" "$@"; echo "=== rc $?"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [ "$M" = lat ]; then
  step 200 $PY -m pytest -q -m gpu -p no:cacheprovider --timeout 100 -rA tests/test_gpu_fastpaths.py \
    -k "not multi_gpu" > "$OUT/pytest_single.log" 2>&1
  grep -h "PASSED\|FAILED\|ERROR\|passed\|failed\|Error\|assert" "$OUT"/pytest_single.log | head -30
  P="--preset llama-2-7b --random-weights --dtype bf16 --cuda-graphs --no-hf --reps 3"
  for i in 1 2; do
    step 80 $PY -m hexgen.cli bench latency $P --out "$OUT/lat_async_$i.json" 2>&1 | grep -v "$F" | tail -7
    step 80 $PY -m hexgen.cli bench latency $P --no-async-steps --out "$OUT/lat_sync_$i.json" 2>&1 \
      | grep "^engine \|roofline"
  done
fi
if [ "$M" = tput ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  step ${TPUT_LIMIT:-540} $PY -m hexgen.cli bench throughput --preset llama-2-7b --random-weights --dtype bf16 \
    --cuda-graphs --num-requests ${REQUESTS:-1000} --max-num-seqs ${SEQS:-256} --max-num-batched-tokens 4096 \
    --hf-max-batches ${HF_BATCHES:-2} --out "$OUT/tput_7b.json" 2>&1 | grep -v "$F" | tail -14
fi
date -u
