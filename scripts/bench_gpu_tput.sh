#!/usr/bin/env bash
# Issue 17, one H200 (nvidia-h200): where the default 1,000-request throughput workload's time goes.
# `sweep`: the Llama-3.1-8B shape (scripts/llama31_shape.py, random bf16 weights) under several batch limits and
# token budgets, each run's loop clock and scheduler counters (INFO lines), no HF baseline; a cProfile of the
# stage-0 loop on 300 requests. `steps`: scripts/profile_steps.py on the same shape with the kernel tables.
# Usage on the GPU machine: OUT=/some/dir scripts/bench_gpu_tput.sh [sweep] [steps]; CONFIGS="256:4096 ..."
set -u
export PYTHONUNBUFFERED=1 HEXGEN_NO_VENV=1 HEXGEN_LOG_LEVEL=INFO
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/hexgen-bench}; mkdir -p "$OUT/r"
R=$OUT/r
PY=python3
F='it/s\]\|tensor/s\]'
step() { local t=$1; shift; echo "=== $* (limit ${t}s)"; timeout "$t" "$@"; echo "=== rc $?"; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader; date -u
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
$PY scripts/llama31_shape.py /tmp/l31
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
T="$PY -m hexgen.cli bench throughput --model /tmp/l31 --random-weights --dtype bf16 --cuda-graphs --no-hf"
for M in ${*:-sweep steps}; do
if [ "$M" = sweep ]; then
  for C in ${CONFIGS:-256:4096 512:8192 1024:8192}; do
    S=${C%:*}; B=${C#*:}
    step 150 $T --num-requests ${REQUESTS:-1000} --max-num-seqs $S --max-num-batched-tokens $B \
      --out "$R/t31_${S}_$B.json" > "$R/t31_${S}_$B.log" 2>&1
    echo "--- llama-3.1-8b shape, max-num-seqs $S, budget $B"
    grep -v "$F" "$R/t31_${S}_$B.log" | grep -v "preempting" | grep -v "INFO" | tail -4
    grep "scheduler:\|asynchronous steps\|KV blocks" "$R/t31_${S}_$B.log" | sed 's/^.*INFO//' | tail -3
  done
  if [ -n "${PROFILE:-1024:8192}" ]; then
    C=${PROFILE:-1024:8192}; S=${C%:*}; B=${C#*:}
    HEXGEN_PROFILE_LOOP=$R/loop_profile.txt step 100 $T --num-requests 300 --max-num-seqs $S \
      --max-num-batched-tokens $B > "$R/t31_prof.log" 2>&1
    head -45 "$R/loop_profile.txt"
  fi
fi
if [ "$M" = steps ]; then
  step 170 $PY scripts/profile_steps.py --model /tmp/l31 --max-seqs ${SEQS:-512} --budget ${BUDGET:-8192} \
    --ctx 300 700 --kernels > "$R/steps.log" 2>&1
  grep -v "$F" "$R/steps.log" | grep -v INFO | tail -70
fi
done

date -u
