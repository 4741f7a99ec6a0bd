#!/usr/bin/env bash
# The GPU benchmarks and GPU tests, one scenario at a time, from the repository root on a GPU machine:
#
#   OUT=/some/dir bench/gpu.sh SCENARIO [SCENARIO ...]
#
# Every scenario writes its JSON and logs under $OUT (default /tmp/hexgen-bench) and prints the lines that
# carry the figures. docs/benchmarks.md names the scenario behind each figure; docs/development.md lists them.
#
#   tests            the GPU tests of the kernels and fast paths (TESTS: the files, TEST_LIMIT: seconds)
#   latency          Llama-2-7B bf16 batch-1 decode beside the roofline measured in the same process; with
#                    VARIANTS="flags|flags" each variant runs ROUNDS times (default 2), alternating, e.g.
#                    VARIANTS="--kernel pdl=on|--kernel pdl=off" or VARIANTS="|--no-async-steps"
#   tp               batch-1 decode at TP 1, TP 2 with asynchronous steps and TP 2 synchronous (2 GPUs)
#   throughput       Llama-2-7B on REQUESTS (1,000) requests all at once beside HF static batches of 64 on the
#                    first HF_BATCHES (2) batches of the same requests
#   throughput-runs  RUNS="tag:preset:seqs:budget[:kv[:hf]] ..." (default: the figures of docs/benchmarks.md, "GPU:
#                    throughput against the ceiling"): REQUESTS (1,000) requests all at once each, with the printed
#                    ceiling; kv auto|fp8; hf 1: beside HF static batches of 64 on the first HF_BATCHES (1) batches
#                    and HF continuous batching on the first HF_CB (64) requests, else --no-hf. The loop's phase
#                    clock and the scheduler's counters (INFO) are kept in each log
#   decode-fp8       the paged decode kernel over an fp8 cache against a bf16 one, a few launch settings and
#                    ways of reading fp8 tiles (scripts/bench_decode_fp8.py: Llama-2-7B heads at batch 256 x
#                    context 700, Llama-3.1-8B heads at batch 512 x context 700)
#   throughput-ab    Llama-2-7B on REQUESTS (300) requests, no HF, VARIANTS alternating as for `latency`
#   serve            the Redis path against the engine driven directly (`hexgen bench serve`, 96 requests at a
#                    Poisson 4 req/s, once per DIRECT_INPUTS entry, default "text ids"), all at once
#                    (AT_ONCE=0 skips it), then the per-hop breakdown (BREAKDOWN=0 skips it). Needs
#                    redis-server on PATH or unpacked under .redis/usr/bin (dpkg -x of Debian's packages)
#   kernels          every launch setting of the paged decode kernel at throughput shapes and at batch 1, then
#                    the cost of each kind of engine step (scripts/bench_paged_decode.py, scripts/profile_steps.py)
#   profile          one captured decode step, its kernels and the engine loop's phases (scripts/profile_decode.py)
#   prefix           the prefix cache on against off in one run each (`hexgen bench prefix`, Llama-3.1-8B shape,
#                    random weights, bf16, CUDA graphs): SGLang's generated-shared-prefix shape (64 x 16, 2,048-token
#                    system prompts, 128-token questions, 256 outputs), multi-turn chat (200 x 5), and the
#                    no-sharing 1,000-request mix as `bench throughput` with --no-prefix-cache against without
#   planner-x2       2 GPUs: calibrations of Llama-2-70B layers (a whole H200 at TP 1 and 2, and one cut to 40
#                    SMs / 80 GiB), then the 70B layouts of bench/planner/runs_h200x2.json under load
#   planner-emulated 2 GPUs: the same load on the emulated unequal pair (bench/planner/runs_h200x2_emulated.json)
#   planner-phases   2 GPUs: decode-only and prefill-only loads on TP 2 and PP 2 (runs_h200x2_phases.json)
#   planner-x4       4 GPUs: calibrations at TP 1, 2 and 4 (NO_PROFILE=1 skips them), then the 70B layouts of
#                    bench/planner/runs_h200x4.json (X4_RUNS: a comma-separated subset, in that order)
#   fp8-weights      Llama-3.1-8B shape (random weights), bf16 against FP8 weights (--quantization fp8) in one call:
#                    the FP8 GPU tests, batch-1 decode (latency) of each, then REQUESTS (1,000) requests all at once
#                    of each (max-num-seqs 1024, budget 16384, no HF); FP8_PARTS: a subset of "tests latency
#                    throughput"; ACC_MODEL=dir adds `bench weight-accuracy` (bf16) on that checkpoint
#   planner-auto     CLUSTER=file BASE=spec.json [CALS="a.json b.json"]: plan the cluster, then measure the
#                    planner's layout against the best symmetric one (scripts/plan_runs.py)
#   overlap          Llama-3.1-8B shape (random weights, bf16), two-stream decode steps (--kernel overlap=on) against
#                    one stream: the decode step of 512 sequences at contexts 300 and 700 replayed from its graph
#                    (scripts/profile_steps.py), then REQUESTS (1,000) requests all at once (max-num-seqs 1024,
#                    budget 16384, no HF) of each, ROUNDS (1) times alternating; EXTRA goes to those runs;
#                    STEPS=0 skips the step profile
#   uneven-emulated  2 GPUs, cuda:1 cut to EMU (40:80 SMs:GiB) as in CLUSTER (config/clusters/h200x2-emulated.toml):
#                    per model of UNEVEN_MODELS (llama-3.1-8b llama-2-13b, random weights), uneven TP 2 at the
#                    planner's ratio, even TP 2 and the planner's best two-stage PP layout on REQUESTS (1,000)
#                    requests at once (scripts/uneven_runs.py writes the spec, scripts/planner_measure.py runs it)
set -u
SCENARIOS="tests latency tp throughput throughput-runs decode-fp8 throughput-ab serve prefix kernels profile planner-x2 planner-emulated planner-phases planner-x4 planner-auto fp8-weights overlap uneven-emulated"
[ $# -ge 1 ] || { echo "usage: bench/gpu.sh SCENARIO [SCENARIO ...]; scenarios: $SCENARIOS" >&2; exit 2; }
for S in "$@"; do
  case " $SCENARIOS " in *" $S "*) ;; *) echo "bench/gpu.sh: unknown scenario '$S'; choose from: $SCENARIOS" >&2; exit 2;; esac
done
cd "$(dirname "$0")/.."
# NVLink multicast stays off (the lent machines do not offer it)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HEXGEN_NO_VENV=1 TQDM_DISABLE=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/hexgen-bench}; mkdir -p "$OUT"
PY=${PY:-python3}
NOISE='it/s\]\|tensor/s\]'
step() { local t=$1; shift; echo "=== $* (limit ${t}s)"; timeout -s INT -k 30 "$t" "$@"; echo "=== rc $?"; }
keep() { grep --line-buffered "^===\|^{\|^engine \|^hf \|roofline\|Error\|error\|Traceback\|passed\|failed\|KV \|ratio" \
  | cut -c1-1500; }
M7="--preset llama-2-7b --random-weights --dtype bf16 --cuda-graphs"
PROF70="--preset llama-2-70b --dtype bf16 --batch 1 8 32 128 --context 128 1024 --prefill 128 512 2048 --quiet"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

# variants VAR_LIST: the `|`-separated flag sets of VARIANTS ("" when unset: one run of the defaults)
variants() { local IFS='|'; VAR_LIST=(${VARIANTS:-}); [ ${#VAR_LIST[@]} -eq 0 ] && VAR_LIST=(""); }

tests() {
  # the GPU image's torch and Triton differ from the versions CI pins: their deprecation notices are shown here,
  # not failed (every other warning is still an error, pyproject.toml)
  step "${TEST_LIMIT:-480}" $PY -m pytest -q -x -m gpu -p no:cacheprovider --durations=12 \
    -W default::DeprecationWarning -W default::FutureWarning \
    ${TESTS:-tests/test_fused.py tests/test_gpu_fastpaths.py tests/test_paged_decode.py tests/test_gpu_layouts.py tests/test_uneven_stage.py} \
    > "$OUT/gpu_tests.txt" 2>&1
  tail -20 "$OUT/gpu_tests.txt"
}

latency() {
  variants; local i=0 r v
  for r in $(seq "${ROUNDS:-$([ -n "${VARIANTS:-}" ] && echo 2 || echo 1)}"); do
    for v in "${!VAR_LIST[@]}"; do
      i=$((i + 1))
      step 150 $PY -m hexgen.cli bench latency $M7 --no-hf --reps 3 ${VAR_LIST[$v]} ${EXTRA:-} \
        --out "$OUT/lat_v${v}_$i.json" > "$OUT/lat_v${v}_$i.log" 2>&1
      echo "--- run $i, variant $v: ${VAR_LIST[$v]:-defaults}"; grep -v "$NOISE" "$OUT/lat_v${v}_$i.log" | keep | tail -6
    done
  done
}

tp() {
  local P="$M7 --no-hf --reps 3"
  step 90 $PY -m hexgen.cli bench latency $P --out "$OUT/lat_tp1.json" 2>&1 | keep
  step 90 $PY -m hexgen.cli bench latency $P --hetero-config 2 --async-steps-tp --out "$OUT/lat_tp2_async.json" 2>&1 | keep
  step 90 $PY -m hexgen.cli bench latency $P --hetero-config 2 --no-async-steps --out "$OUT/lat_tp2_sync.json" 2>&1 | keep
}

throughput() {
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step "${TPUT_LIMIT:-420}" $PY -m hexgen.cli bench throughput $M7 \
    --num-requests "${REQUESTS:-1000}" --max-num-seqs 256 --max-num-batched-tokens 4096 \
    --hf-max-batches "${HF_BATCHES:-2}" ${EXTRA:-} --out "$OUT/tput_7b.json" > "$OUT/tput_7b.log" 2>&1
  grep -v "$NOISE" "$OUT/tput_7b.log" | grep -v "preempting\|INFO" | tail -14
}

RUNS_DEFAULT="l31-8b:llama-3.1-8b:1024:16384:auto:1 l2-7b:llama-2-7b:256:4096:auto:1 l2-7b-fp8:llama-2-7b:512:8192:fp8:0"
throughput_runs() {
  local X tag m s b kv hf hfa
  for X in ${RUNS:-$RUNS_DEFAULT}; do
    IFS=: read -r tag m s b kv hf <<< "$X"
    hfa="--no-hf"
    [ "${hf:-0}" = 1 ] && hfa="--hf-max-batches ${HF_BATCHES:-1} --hf-cb-requests ${HF_CB:-64}"
    HEXGEN_LOG_LEVEL=INFO PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step "${TPUT_LIMIT:-200}" $PY -m hexgen.cli \
      bench throughput --preset "$m" --random-weights --dtype bf16 --cuda-graphs --kv-cache-dtype "${kv:-auto}" \
      --num-requests "${REQUESTS:-1000}" --max-num-seqs "$s" --max-num-batched-tokens "$b" $hfa ${EXTRA:-} \
      --out "$OUT/tput_$tag.json" > "$OUT/tput_$tag.log" 2>&1
    echo "--- $tag: $m, max-num-seqs $s, budget $b, kv ${kv:-auto}, $hfa"
    grep -v "$NOISE" "$OUT/tput_$tag.log" | grep -v "preempting\|INFO\|WARNING\|^\s*$" | tail -14 | cut -c1-400
    grep "scheduler:\|KV blocks" "$OUT/tput_$tag.log" | sed 's/^.*INFO//' | tail -2
  done
}

throughput_ab() {
  variants; local i=0 r v
  for r in $(seq "${ROUNDS:-$([ -n "${VARIANTS:-}" ] && echo 2 || echo 1)}"); do
    for v in "${!VAR_LIST[@]}"; do
      i=$((i + 1))
      PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step 200 $PY -m hexgen.cli bench throughput $M7 \
        --num-requests "${REQUESTS:-300}" --max-num-seqs 256 --max-num-batched-tokens 4096 --no-hf \
        ${VAR_LIST[$v]} ${EXTRA:-} --out "$OUT/tput_v${v}_$i.json" > "$OUT/tput_v${v}_$i.log" 2>&1
      echo "--- run $i, variant $v: ${VAR_LIST[$v]:-defaults}"
      grep -v "$NOISE" "$OUT/tput_v${v}_$i.log" | grep -v "preempting\|INFO" | tail -8
    done
  done
}

serve() {
  export PATH=$PWD/.redis/usr/bin:$PATH
  export LD_LIBRARY_PATH=$PWD/.redis/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  redis-server --version || { echo "redis-server: not found (PATH or .redis/usr/bin)"; return 1; }
  $PY -c "import redis, redis.utils as u; print('redis-py', redis.__version__, 'hiredis', u.HIREDIS_AVAILABLE)" || return 1
  # random weights: the head tokenizes with the tests' offline tiny tokenizer (the token counts matter, not the text)
  local TOK=$OUT/tiny-tokenizer i=0 D
  $PY -c "from tests.tiny_tokenizer import save_tiny_tokenizer; save_tiny_tokenizer('$TOK')" || return 1
  local A="$M7 --tokenizer $TOK --num-requests 96 --prompt-range 64 1024 --output-range 32 256 --seed 0"
  # the first run also compiles the Triton kernels (cached on disk for the later ones): its TTFT is not clean
  for D in ${DIRECT_INPUTS:-text ids}; do
    i=$((i + 1))
    step 200 $PY -m hexgen.cli bench serve $A --rate 4 --direct-input "$D" --log-dir "$OUT/logs_rate4_${i}_$D" \
      --out "$OUT/serve_rate4_${i}_$D.json"
  done
  [ "${AT_ONCE:-1}" = 1 ] && step 130 $PY -m hexgen.cli bench serve $A --log-dir "$OUT/logs_at_once" \
    --out "$OUT/serve_at_once.json"
  [ "${BREAKDOWN:-1}" = 1 ] && step 110 $PY scripts/serve_breakdown.py $A --rate 4 --log-dir "$OUT/logs_breakdown" \
    --out "$OUT/breakdown_rate4.json"
  return 0
}

prefix() {
  local P="--preset llama-3.1-8b --random-weights --dtype bf16 --cuda-graphs --max-num-seqs 256 --max-num-batched-tokens 8192"
  HEXGEN_LOG_LEVEL=INFO step "${PREFIX_LIMIT:-500}" $PY -m hexgen.cli bench prefix $P --workload shared --groups 64 \
    --per-group 16 --system-len 2048 --question-len 128 --new-tokens 256 --out "$OUT/prefix_shared.json" \
    > "$OUT/prefix_shared.log" 2>&1
  grep -v "$NOISE" "$OUT/prefix_shared.log" | grep -v "INFO\|WARNING" | tail -8
  HEXGEN_LOG_LEVEL=INFO step "${PREFIX_LIMIT:-500}" $PY -m hexgen.cli bench prefix $P --workload multi-turn \
    --conversations 200 --turns 5 --system-len 256 --question-len 64 --new-tokens 64 --out "$OUT/prefix_chat.json" \
    > "$OUT/prefix_chat.log" 2>&1
  grep -v "$NOISE" "$OUT/prefix_chat.log" | grep -v "INFO\|WARNING" | tail -8
  local F
  for F in "" "--no-prefix-cache"; do  # the no-sharing mix: the cache's bookkeeping must cost next to nothing
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step "${TPUT_LIMIT:-200}" $PY -m hexgen.cli bench throughput \
      --preset llama-3.1-8b --random-weights --dtype bf16 --cuda-graphs --num-requests 1000 --max-num-seqs 1024 \
      --max-num-batched-tokens 16384 --no-hf $F --out "$OUT/prefix_noshare${F:+_off}.json" > "$OUT/prefix_noshare${F:+_off}.log" 2>&1
    echo "--- no sharing ${F:-(cache on)}"; grep -v "$NOISE" "$OUT/prefix_noshare${F:+_off}.log" | grep "^engine " | tail -2
  done
}

kernels() {
  step 300 $PY scripts/bench_paged_decode.py --sweep 256 700 1024 --sweep 256 300 512 --sweep 128 1200 2048 \
    --sweep 1 384 4096 --out "$OUT/decode_sweep.json"
  step 200 $PY scripts/profile_steps.py --ctx 300 700 1200 > "$OUT/steps.log" 2>&1
  grep -v "^STEPS" "$OUT/steps.log" | tail -8
}

profile() {
  step 110 $PY scripts/profile_decode.py --tp 1 --loop 2>&1 | grep "^PROFILE" | cut -c1-3000
  [ "$(nvidia-smi -L | wc -l)" -ge 2 ] && step 80 $PY scripts/profile_decode.py --tp 2 2>&1 | grep "^PROFILE" | cut -c1-2500
  return 0
}

measure() {  # measure SPEC NAME [RUNS]: the layouts of a run spec under load (scripts/planner_measure.py)
  HEXGEN_LOG_LEVEL=${HEXGEN_LOG_LEVEL:-INFO} step "${MEASURE_LIMIT:-400}" $PY scripts/planner_measure.py "$1" \
    "$OUT/measure_$2.json" ${3:-} 2>&1 | tee "$OUT/measure_$2.log" | keep
}

planner_x2() {
  (timeout 150 $PY -m hexgen.cli profile $PROF70 --tp-degrees 1 --device cuda:1 --emulate 40:80 \
     --device-name H200-40SM --out "$OUT/cal_h200-40sm_70b.json" > "$OUT/profile_emulated.log" 2>&1
   echo "rc $?" >> "$OUT/profile_emulated.log") &
  step 150 $PY -m hexgen.cli profile $PROF70 --tp-degrees 1 2 --device cuda:0 --out "$OUT/cal_h200_70b.json"
  wait; tail -3 "$OUT/profile_emulated.log"
  measure bench/planner/runs_h200x2.json h200x2
}

planner_x4() {
  [ -z "${NO_PROFILE:-}" ] && step 200 $PY -m hexgen.cli profile $PROF70 --tp-degrees 1 2 4 --device cuda:0 \
    --out "$OUT/cal_h200_70b_x4.json"
  nvidia-smi topo -m | head -6
  measure bench/planner/runs_h200x4.json h200x4 "${X4_RUNS:-}"
}

fp8_weights() {
  local M8="--preset llama-3.1-8b --random-weights --dtype bf16 --cuda-graphs" q parts=" ${FP8_PARTS:-tests latency throughput} "
  if [[ $parts == *" tests "* ]]; then
    step 150 $PY -m pytest -q -x -m gpu -p no:cacheprovider -W default::DeprecationWarning \
      -W default::FutureWarning tests/test_fp8_weights.py > "$OUT/fp8_tests.txt" 2>&1
    tail -4 "$OUT/fp8_tests.txt"
  fi
  for q in auto fp8; do
    [[ $parts == *" latency "* ]] || break
    step 120 $PY -m hexgen.cli bench latency $M8 --no-hf --reps 3 --quantization $q ${EXTRA:-} \
      --out "$OUT/fp8w_lat_$q.json" > "$OUT/fp8w_lat_$q.log" 2>&1
    echo "--- batch 1, weights $q"; grep -v "$NOISE" "$OUT/fp8w_lat_$q.log" | keep | tail -6
  done
  for q in auto fp8; do
    [[ $parts == *" throughput "* ]] || break
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step "${TPUT_LIMIT:-170}" $PY -m hexgen.cli bench throughput $M8 \
      --quantization $q --num-requests "${REQUESTS:-1000}" --max-num-seqs 1024 --max-num-batched-tokens 16384 \
      --no-hf ${EXTRA:-} --out "$OUT/fp8w_tput_$q.json" > "$OUT/fp8w_tput_$q.log" 2>&1
    echo "--- ${REQUESTS:-1000} requests, weights $q"
    grep -v "$NOISE" "$OUT/fp8w_tput_$q.log" | grep -v "preempting\|INFO\|WARNING\|^\s*$" | tail -10 | cut -c1-400
  done
  if [ -n "${ACC_MODEL:-}" ]; then
    step 150 $PY -m hexgen.cli bench weight-accuracy --model "$ACC_MODEL" --dtype bf16 --cuda-graphs \
      --out "$OUT/fp8w_accuracy.json" 2>&1 | grep -v "$NOISE" | tail -4
  fi
  return 0
}

planner_auto() {
  : "${CLUSTER:?planner-auto needs CLUSTER=cluster.toml}" "${BASE:?planner-auto needs BASE=spec.json}"
  local CAL_ARGS=""; [ -n "${CALS:-}" ] && CAL_ARGS="--calibration $CALS"
  step 120 $PY -m hexgen.cli plan --cluster "$CLUSTER" --preset llama-2-70b --dtype bf16 --slo-latency 0 \
    --workload-prompt 288 --workload-output 144 --max-num-seqs 128 $CAL_ARGS --json > "$OUT/plan.json"
  step 30 $PY scripts/plan_runs.py "$OUT/plan.json" "$CLUSTER" "$BASE" "$OUT/runs_auto.json"
  measure "$OUT/runs_auto.json" auto
}

overlap() {
  local M8="--preset llama-3.1-8b --random-weights --dtype bf16 --cuda-graphs" v r
  for v in on off; do
    [ "${STEPS:-1}" = 1 ] || break
    step 200 $PY scripts/profile_steps.py --preset llama-3.1-8b --max-seqs 512 --budget 16384 --ctx 300 700 \
      --reps 20 --kernel overlap=$v > "$OUT/steps_overlap_$v.log" 2>&1
    echo "--- decode steps, overlap=$v"; grep "^{" "$OUT/steps_overlap_$v.log" | cut -c1-400
  done
  for r in $(seq "${ROUNDS:-1}"); do
    for v in on off; do
      PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step "${TPUT_LIMIT:-170}" $PY -m hexgen.cli bench throughput \
        $M8 --num-requests "${REQUESTS:-1000}" --max-num-seqs 1024 --max-num-batched-tokens 16384 --no-hf \
        --kernel overlap=$v ${EXTRA:-} --out "$OUT/overlap_tput_${v}_$r.json" > "$OUT/overlap_tput_${v}_$r.log" 2>&1
      echo "--- ${REQUESTS:-1000} requests, overlap=$v, round $r"
      grep -v "$NOISE" "$OUT/overlap_tput_${v}_$r.log" | grep -v "preempting\|INFO\|WARNING\|^\s*$" | tail -8 | cut -c1-400
    done
  done
}

uneven_emulated() {
  local M
  for M in ${UNEVEN_MODELS:-llama-3.1-8b llama-2-13b}; do
    step 60 $PY scripts/uneven_runs.py "${CLUSTER:-config/clusters/h200x2-emulated.toml}" "$M" \
      "$OUT/runs_uneven_$M.json" "${REQUESTS:-1000}" "${EMU:-40:80}"
    [ -f "$OUT/runs_uneven_$M.json" ] || continue
    MEASURE_LIMIT=${MEASURE_LIMIT:-560} measure "$OUT/runs_uneven_$M.json" "uneven_$M"
  done
}

for S in "$@"; do
  echo "##### $S"
  case "$S" in
    tests) tests ;;
    latency) latency ;;
    tp) tp ;;
    throughput) throughput ;;
    throughput-runs) throughput_runs ;;
    decode-fp8)
      step 150 $PY scripts/bench_decode_fp8.py --out "$OUT/decode_fp8.json" 2>&1 | grep -v "$NOISE" | head -14
      step 150 $PY scripts/bench_decode_fp8.py --heads 32 8 --batch 512 --out "$OUT/decode_fp8_gqa.json" 2>&1 \
        | grep -v "$NOISE" | head -10 ;;
    throughput-ab) throughput_ab ;;
    serve) serve ;;
    prefix) prefix ;;
    kernels) kernels ;;
    profile) profile ;;
    planner-x2) planner_x2 ;;
    planner-emulated) measure bench/planner/runs_h200x2_emulated.json emulated "${EMU_RUNS:-}" ;;
    planner-phases) measure bench/planner/runs_h200x2_phases.json phases ;;
    planner-x4) planner_x4 ;;
    planner-auto) planner_auto ;;
    fp8-weights) fp8_weights ;;
    overlap) overlap ;;
    uneven-emulated) uneven_emulated ;;
  esac
done
date -u
