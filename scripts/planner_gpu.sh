#!/usr/bin/env bash
# The planner's measured validation (docs/planner.md), on nvidia-h200-x2 (two H200s on NVLink).
#   part 1: calibrations (`hexgen profile`, Llama-2-70B layer shapes: a whole H200 at TP 1 and 2, and an H200
#           cut to 40 SMs under an 80 GiB cap), the emulation's GPU test, then four 70B layouts under load
#           (bench/planner/runs_h200x2.json);
#   part 2: the same load on the emulated heterogeneous pair (bench/planner/runs_h200x2_emulated.json).
#   part 3: decode-only and prefill-only loads on TP 2 and PP 2 (bench/planner/runs_h200x2_phases.json),
#           then the GPU tests;
#   x4: on nvidia-h200-x4: calibrations at TP 1, 2 and 4 (skipped with NO_PROFILE=1), then the 70B layouts of
#       bench/planner/runs_h200x4.json (4-stage pipelining with one and four micro-batches in flight first);
#   auto: CLUSTER=file BASE=spec.json [CALS="a.json b.json"]: plan the cluster here, then measure the planner's
#         layout against the best symmetric one (scripts/plan_runs.py);
#   homog: part 1's layouts only; measure: homog, then part 2;
#   all: part 1 without the test, then part 2, each step with its own limit.
# Usage on the GPU machine: OUT=/some/dir scripts/planner_gpu.sh 1|2|3|homog|measure|all
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 HEXGEN_NO_VENV=1
OUT=${OUT:-/tmp/hexgen-planner}; mkdir -p "$OUT"
M=${1:-1}
case "$M" in 1|2|3|homog|measure|all|x4|auto) ;; *) echo "planner_gpu.sh: unknown part $M" >&2; exit 2;; esac
PY=python3; export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step() { local t=$1; shift; echo "=== $* (limit ${t}s)"; timeout "$t" "$@"; echo "=== rc $?"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
keep() { grep --line-buffered "^===\|^{\|Error\|error\|Traceback\|passed\|failed\|KV budget\|KV blocks\|nvidia\|MiB" | cut -c1-1500; }
export HEXGEN_LOG_LEVEL=${HEXGEN_LOG_LEVEL:-INFO}
if [ "$M" = 1 ] || [ "$M" = all ]; then
  PROF="--preset llama-2-70b --dtype bf16 --batch 1 8 32 128 --context 128 1024 --prefill 128 512 2048 --quiet"
  (timeout 150 $PY -m hexgen.cli profile $PROF --tp-degrees 1 --device cuda:1 --emulate 40:80 \
     --device-name H200-40SM --out "$OUT/cal_h200-40sm_70b.json" > "$OUT/profile_emulated.log" 2>&1
   echo "rc $?" >> "$OUT/profile_emulated.log") &
  step 150 $PY -m hexgen.cli profile $PROF --tp-degrees 1 2 --device cuda:0 --out "$OUT/cal_h200_70b.json"
  wait; tail -3 "$OUT/profile_emulated.log"
fi
if [ "$M" = 1 ] || [ -n "${QUICK_TESTS:-}" ]; then
  [ -n "${QUICK_TESTS:-}" ] && step 150 $PY -m pytest -q -m gpu -p no:cacheprovider -rA --timeout 120 \
    tests/test_gpu_fastpaths.py -k "not multi_gpu" 2>&1 | grep "PASSED\|FAILED\|passed\|failed"
  [ "$M" = 1 ] && step 60 $PY -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_emulation.py 2>&1 | tail -5
fi
if [ "$M" = 1 ] || [ "$M" = homog ] || [ "$M" = all ] || [ "$M" = measure ]; then
  step ${HOMOG_LIMIT:-330} $PY scripts/planner_measure.py bench/planner/runs_h200x2.json "$OUT/measure_h200x2.json" 2>&1 \
    | tee "$OUT/measure_h200x2.log" | keep
fi
if [ "$M" = 2 ] || [ "$M" = all ] || [ "$M" = measure ]; then
  step ${EMU_LIMIT:-400} $PY scripts/planner_measure.py bench/planner/runs_h200x2_emulated.json "$OUT/measure_emulated.json" ${EMU_RUNS:-} 2>&1 \
    | tee "$OUT/measure_emulated.log" | keep
fi
if [ "$M" = x4 ]; then
  [ -z "${NO_PROFILE:-}" ] && step 200 $PY -m hexgen.cli profile --preset llama-2-70b --dtype bf16 --batch 1 8 32 128 \
    --context 128 1024 --prefill 128 512 2048 --quiet --tp-degrees 1 2 4 --device cuda:0 --out "$OUT/cal_h200_70b_x4.json"
  nvidia-smi topo -m | head -6
  step ${X4_LIMIT:-380} $PY scripts/planner_measure.py bench/planner/runs_h200x4.json "$OUT/measure_h200x4.json" \
    ${X4_RUNS:-} 2>&1 | tee "$OUT/measure_h200x4.log" | keep
fi
if [ "$M" = auto ]; then
  CAL_ARGS=""; [ -n "${CALS:-}" ] && CAL_ARGS="--calibration $CALS"
  step 120 $PY -m hexgen.cli plan --cluster "$CLUSTER" --preset llama-2-70b --dtype bf16 --slo-latency 0 \
    --workload-prompt 288 --workload-output 144 --max-num-seqs 128 $CAL_ARGS --json > "$OUT/plan.json"
  step 30 $PY scripts/plan_runs.py "$OUT/plan.json" "$CLUSTER" "$BASE" "$OUT/runs_auto.json"
  step ${AUTO_LIMIT:-400} $PY scripts/planner_measure.py "$OUT/runs_auto.json" "$OUT/measure_auto.json" 2>&1 \
    | tee "$OUT/measure_auto.log" | keep
fi
if [ "$M" = 3 ]; then
  step ${PHASE_LIMIT:-250} $PY scripts/planner_measure.py bench/planner/runs_h200x2_phases.json "$OUT/measure_phases.json" \
    2>&1 | tee "$OUT/measure_phases.log" | keep
  T="-q -m gpu -p no:cacheprovider --timeout 120 -rA"
  (CUDA_VISIBLE_DEVICES=1 timeout 220 $PY -m pytest $T tests/test_gpu_fastpaths.py tests/test_paged_decode.py \
     tests/test_fused.py -k "not multi_gpu" > "$OUT/pytest_single.log" 2>&1; echo "rc $?" >> "$OUT/pytest_single.log") &
  step 220 $PY -m pytest $T tests/test_gpu_fastpaths.py tests/test_gpu_layouts.py -k "multi_gpu or layouts" \
    > "$OUT/pytest_multi.log" 2>&1
  wait
  grep -h "PASSED\|FAILED\|ERROR\|SKIPPED\|passed\|failed\|^rc" "$OUT"/pytest_*.log | cut -c1-300 | head -60
fi
date -u
