#!/usr/bin/env bash
# Issue 4 (docs/benchmarks.md "Run 15"), one H200 (nvidia-h200): batch-1 decode with programmatic dependent
# launch (hexgen/model/pdl.py) against without (--kernel pdl=off), alternating, each beside the roofline measured
# in its own process; the GEMV tuner's per-shape timings (INFO log lines "gemv [N, K]"); the GPU tests of the
# kernels first.
# `tput`: Llama-2-7B on REQUESTS (300) requests all at once with and without PDL (no HF baseline), a check
# that the larger steps do not lose.
# Usage on the GPU machine: OUT=/some/dir scripts/bench_gpu11.sh [test] [lat] [tput] (ORDER="1 0 1 0": PDL per
# latency run)
set -u
export PYTHONUNBUFFERED=1 HEXGEN_NO_VENV=1 HEXGEN_LOG_LEVEL=INFO
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/hexgen-bench}; mkdir -p "$OUT"
PY=python3
F='it/s\]\|tensor/s\]'
step() { local t=$1; shift; echo "=== $* (limit ${t}s)"; timeout "$t" "$@"; echo "=== rc $?"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
$PY -c "import torch, triton; from hexgen.model import pdl; print('torch', torch.__version__, 'triton', triton.__version__,
'pdl', pdl.enabled(torch.zeros(1, device='cuda')))"
for M in ${*:-test lat}; do
if [ "$M" = test ]; then
  # the kernels' GPU tests take about 7 minutes in all; TESTS picks a subset
  step ${TEST_LIMIT:-480} $PY -m pytest -q -x -p no:cacheprovider --durations=12 ${TESTS:-tests/test_fused.py \
    tests/test_gpu_fastpaths.py tests/test_paged_decode.py -k "not multi_gpu"} > "$OUT/pytest.log" 2>&1
  tail -20 "$OUT/pytest.log"
fi
if [ "$M" = lat ]; then
  i=0
  for P in ${ORDER:-1 0 1 0}; do
    i=$((i + 1))
    step 150 $PY -m hexgen.cli bench latency --preset llama-2-7b --random-weights --dtype bf16 --kernel pdl=$P \
      --cuda-graphs --no-hf --reps 3 --out "$OUT/lat_pdl${P}_$i.json" > "$OUT/lat_pdl${P}_$i.log" 2>&1
    echo "--- run $i pdl=$P"; grep -v "$F" "$OUT/lat_pdl${P}_$i.log" | grep -v INFO | tail -5
    [ $i -le 2 ] && grep "gemv \[" "$OUT/lat_pdl${P}_$i.log" | sed 's/^.*gemv \[/gemv [/'
  done
fi
if [ "$M" = tput ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  for P in 1 0; do
    step 200 $PY -m hexgen.cli bench throughput --preset llama-2-7b --random-weights --dtype bf16 --kernel pdl=$P \
      --cuda-graphs --num-requests ${REQUESTS:-300} --max-num-seqs 256 --max-num-batched-tokens 4096 --no-hf \
      --out "$OUT/tput_pdl$P.json" > "$OUT/tput_pdl$P.log" 2>&1
    echo "--- throughput pdl=$P"; grep -v "$F" "$OUT/tput_pdl$P.log" | grep -v "preempting\|INFO" | tail -8
  done
  unset PYTORCH_CUDA_ALLOC_CONF
fi
done
date -u
