#!/usr/bin/env bash
# Issue 17, one H200 (nvidia-h200): the default 1,000-request throughput workload, where its time goes, and the
# figures docs/benchmarks.md quotes. Modes (in the order given):
#   test     the GPU tests of the graph and kernel fast paths (TESTS overrides the files)
#   decode   the paged decode kernel's launch settings at Llama-3.1-8B's GQA shape (bench_paged_decode --quick)
#   sweep    RUNS="tag:model:seqs:budget[:kv] ..." throughput runs without the HF baseline; model is a preset name
#            or l31 (scripts/llama31_shape.py); each run's loop clock and scheduler counters (INFO lines)
#   hf       RUNS the same way, each with both HF baselines (static: HF_BATCHES batches of 64; continuous
#            batching: HF_CB requests)
#   lat      batch-1 decode against the roofline, LAT="preset ..."
#   fp8dec   scripts/bench_decode_fp8.py: the decode kernel over an fp8 against a bf16 cache (Llama-2-7B shape)
#   steps    scripts/profile_steps.py with the kernel tables (STEPS_MODEL, SEQS, BUDGET)
# Usage on the GPU machine: OUT=/some/dir scripts/bench_gpu_tput.sh test decode sweep ...
set -u
export PYTHONUNBUFFERED=1 HEXGEN_NO_VENV=1 HEXGEN_LOG_LEVEL=INFO
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/hexgen-bench}; R=$OUT/r; mkdir -p "$R"
PY=python3
F='it/s\]\|tensor/s\]'
step() { local t=$1; shift; echo "=== $* (limit ${t}s)"; timeout "$t" "$@"; echo "=== rc $?"; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader; date -u
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
$PY scripts/llama31_shape.py /tmp/l31
model_args() { case $1 in l31) echo "--model /tmp/l31 --random-weights";; *) echo "--preset $1 --random-weights";; esac; }
tput() {  # tag model seqs budget kv hf-args...
  local tag=$1 m=$2 s=$3 b=$4 kv=$5; shift 5
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step ${TPUT_LIMIT:-150} $PY -m hexgen.cli bench throughput \
    $(model_args $m) --dtype bf16 --cuda-graphs --kv-cache-dtype $kv --num-requests ${REQUESTS:-1000} \
    --max-num-seqs $s --max-num-batched-tokens $b "$@" --out "$R/t_$tag.json" > "$R/t_$tag.log" 2>&1
  echo "--- $tag: $m, max-num-seqs $s, budget $b, kv $kv"
  grep -v "$F" "$R/t_$tag.log" | grep -v "preempting\|INFO\|WARNING\|^\s*$" | tail -12
  grep "scheduler:\|KV blocks" "$R/t_$tag.log" | sed 's/^.*INFO//' | tail -2
}
for M in "$@"; do
case $M in
test)
  step ${TEST_LIMIT:-240} $PY -m pytest -q -x -p no:cacheprovider -m gpu --durations=8 \
    ${TESTS:-tests/test_gpu_fastpaths.py -k "not multi_gpu and not tp2"} > "$R/pytest.log" 2>&1
  tail -12 "$R/pytest.log";;
decode)
  step 150 $PY scripts/bench_paged_decode.py --heads 32 8 --quick --sweep 512 300 1536 --sweep 512 700 1536 \
    --sweep 16 1000 1536 --out "$R/decode_sweep_gqa.json" > "$R/decode.log" 2>&1
  grep -v "$F" "$R/decode.log" | tail -8;;
sweep|hf)
  for X in ${RUNS:-}; do
    IFS=: read -r tag m s b kv <<< "$X"
    if [ "$M" = hf ]; then
      tput "$tag" "$m" "$s" "$b" "${kv:-auto}" --hf-max-batches ${HF_BATCHES:-1} --hf-cb-requests ${HF_CB:-300} \
        --hf-batch-size ${HF_BS:-64}
    else
      tput "$tag" "$m" "$s" "$b" "${kv:-auto}" --no-hf
    fi
  done;;
lat)
  for P in ${LAT:-llama-2-7b llama-3.1-8b}; do
    step 150 $PY -m hexgen.cli bench latency --preset $P --random-weights --dtype bf16 --cuda-graphs --no-hf --reps 3 \
      --out "$R/lat_$P.json" > "$R/lat_$P.log" 2>&1
    echo "--- latency $P"; grep -v "$F" "$R/lat_$P.log" | grep -v "INFO\|WARNING" | tail -5
  done;;
fp8dec)
  step 90 $PY scripts/bench_decode_fp8.py --batch 256 --ctx 700 --out "$R/decode_fp8.json" > "$R/decode_fp8.log" 2>&1
  grep -v "$F" "$R/decode_fp8.log" | tail -12;;
steps)
  step 170 $PY scripts/profile_steps.py $(model_args ${STEPS_MODEL:-l31} | sed 's/--random-weights//') \
    --max-seqs ${SEQS:-512} --budget ${BUDGET:-8192} --ctx 300 700 --kernels > "$R/steps.log" 2>&1
  grep -v "$F" "$R/steps.log" | grep -v INFO | tail -70;;
esac
done
date -u
