#!/usr/bin/env bash
# Issue 4, "the Redis path costs ≤ 3% throughput and ≤ 2 ms p50 TTFT against the direct engine", on one GPU:
#   1. `hexgen bench serve` at a Poisson rate well below capacity (4 req/s; run 11's throughput, 4,267 tok/s
#      with outputs of 32-512 tokens, is about 15 req/s): the engine driven directly, then the same requests at
#      the same times through redis-server, a head and a worker;
#   2. the same, every request offered at once (throughput);
#   3. scripts/serve_breakdown.py at the shapes and rate of 1: where each request's first token spends its time.
# Llama-2-7B shape, random bf16 weights, CUDA graphs, 96 requests, prompts 64-1024, outputs 32-256, seed 0.
# The head tokenizes with the tests' offline tiny tokenizer (tests/tiny_tokenizer.py; random weights: the text
# does not matter, the token counts do); the worker has no tokenizer and posts ids only.
# Needs redis-server unpacked under .redis/ (dpkg -x of the Debian .debs: .redis/usr/bin/redis-server and its
# libraries under .redis/usr/lib/x86_64-linux-gnu) and redis-py installed. About 6 minutes on an H200.
# Run 17 on: step 1 runs once per DIRECT_INPUTS entry ("text ids": the direct engine tokenizes on arrival as
# the head does, then is given ids); AT_ONCE=0 skips step 2, BREAKDOWN=0 step 3. hiredis is used when
# it is importable.
# Usage on the GPU machine (nvidia-h200): OUT=/some/dir [DIRECT_INPUTS="text ids"] [AT_ONCE=1] [BREAKDOWN=1] \
#   scripts/bench_gpu_serve.sh
set -u
export PYTHONUNBUFFERED=1 HEXGEN_NO_VENV=1 TQDM_DISABLE=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PATH=$PWD/.redis/usr/bin:$PATH
export LD_LIBRARY_PATH=$PWD/.redis/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
OUT=${OUT:-/tmp/hexgen-bench}; mkdir -p "$OUT"
PY=python3
# SIGINT at the limit: bench serve stops its deployment (redis-server, head, workers) in a finally block
step() { local t=$1; shift; echo "=== $* (limit ${t}s)"; timeout -s INT -k 30 "$t" "$@"; echo "=== rc $?"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
redis-server --version || { echo "redis-server: not found under .redis/usr/bin"; exit 1; }
$PY -c "import redis, redis.utils as u; print('redis-py', redis.__version__, 'hiredis', u.HIREDIS_AVAILABLE)" || exit 1
TOK=$OUT/tiny-tokenizer
$PY -c "from tests.tiny_tokenizer import save_tiny_tokenizer; save_tiny_tokenizer('$TOK')" || exit 1
M="--preset llama-2-7b --random-weights --dtype bf16 --cuda-graphs --tokenizer $TOK"
W="--num-requests 96 --prompt-range 64 1024 --output-range 32 256 --seed 0"
# the first run also compiles the Triton kernels (cached on disk for the later ones)
i=0
for D in ${DIRECT_INPUTS:-text ids}; do
  i=$((i + 1))
  step 200 $PY -m hexgen.cli bench serve $M $W --rate 4 --direct-input $D --log-dir "$OUT/logs_rate4_${i}_$D" \
    --out "$OUT/serve_rate4_${i}_$D.json"
done
[ "${AT_ONCE:-1}" = 1 ] && step 130 $PY -m hexgen.cli bench serve $M $W --log-dir "$OUT/logs_at_once" \
  --out "$OUT/serve_at_once.json"
[ "${BREAKDOWN:-1}" = 1 ] && step 110 $PY scripts/serve_breakdown.py $M $W --rate 4 --log-dir "$OUT/logs_breakdown" \
  --out "$OUT/breakdown_rate4.json"
date -u
