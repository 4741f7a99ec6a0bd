#!/usr/bin/env bash
# Issue 4, throughput: where a 7B throughput run's time goes, and the paged decode kernel's launch settings.
#   sweep: every launch setting of the paged decode kernel (grid order, tile, warps, stages, splits) at
#          throughput shapes (batch 256 × context 300/700, batch 128 × 1200) and at batch 1 (docs/bench/run13_*);
#   steps: scripts/profile_steps.py: graph decode, eager mixed and eager prefill steps of Llama-2-7B at batch 256.
# Usage on the GPU machine (nvidia-h200): OUT=/some/dir scripts/bench_gpu9.sh
set -u
export PYTHONUNBUFFERED=1 HEXGEN_NO_VENV=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/hexgen-bench}; mkdir -p "$OUT"
step() { local t=$1; shift; echo "=== $* (limit ${t}s)"; timeout "$t" "$@"; echo "=== rc $?"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
step 300 python3 scripts/bench_paged_decode.py --sweep 256 700 1024 --sweep 256 300 512 --sweep 128 1200 2048 \
  --sweep 1 384 4096 --out "$OUT/decode_sweep.json"
step 200 python3 scripts/profile_steps.py --ctx 300 700 1200 > "$OUT/steps.log" 2>&1; grep -v "^STEPS" "$OUT/steps.log" | tail -8
date -u
