"""How many padding rows the decode graphs compute on the default throughput workload (CPU only, no model).

    python3 scripts/sim_decode_buckets.py [--seqs 1024] [--budget 16384] [--blocks 54732]

Runs the stage-0 scheduler on the 1,000 requests of `hexgen bench throughput` (prompts 64-1,024, outputs
32-512, seed 0), answering every plan with one token per sampling row (synchronous steps), and for each
all-decode step sums the rows and the rows of the graph bucket that replays it (``batch_buckets``). Prints
both sums: their ratio is the decode GEMM work padding adds. ``--blocks``: KV blocks of 16 tokens (the H200
figure for Llama-3.1-8B bf16 at max_num_seqs 1024).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hexgen.bench.workload import make_requests, mixed_shapes  # noqa: E402
from hexgen.engine.cuda_graph import batch_buckets, bucket_of  # noqa: E402
from hexgen.engine.kv_cache import BlockManager  # noqa: E402
from hexgen.engine.plan import StepResult  # noqa: E402
from hexgen.engine.scheduler import Scheduler  # noqa: E402


def decode_steps(seqs: int, budget: int, blocks: int, n: int = 1000) -> tuple[int, list[int]]:
    """(steps, rows of each all-decode step) of the workload under this scheduler configuration."""
    pending = make_requests(mixed_shapes(n, (64, 1024), (32, 512), 0), 32000, "r")
    s = Scheduler(BlockManager(blocks, 16), seqs, budget, 131072)
    rows, step = [], 0
    while True:
        cap = s.free_capacity
        while cap and pending:
            s.add(pending.pop(0))
            cap -= 1
        if not pending and s.idle:
            return step, rows
        plan = s.schedule(step)
        step += 1
        if plan is None:
            return step, rows
        if plan.q_lens and all(q == 1 for q in plan.q_lens):
            rows.append(len(plan.q_lens))
        by_id = {x.seq_id: x for x in s.running}
        res = StepResult(step)
        for sid, samples in zip(plan.seq_ids, plan.sample):
            if samples:
                seq = by_id[sid]
                res.seq_ids.append(sid)
                res.tokens.append(5)
                res.finished.append(seq.num_output + 1 >= seq.request.params.max_new_tokens)
        s.update(plan, res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=16384)
    ap.add_argument("--blocks", type=int, default=54732)
    a = ap.parse_args()
    steps, rows = decode_steps(a.seqs, a.budget, a.blocks)
    buckets = batch_buckets(a.seqs)
    padded = sum(bucket_of(n, buckets) for n in rows)
    print(f"max_num_seqs {a.seqs}, budget {a.budget}: {steps} steps, {len(rows)} all-decode; {sum(rows)} rows, "
          f"{padded} with padding ({padded / max(1, sum(rows)):.3f}x); buckets {buckets}")


if __name__ == "__main__":
    main()
