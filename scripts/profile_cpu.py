#!/usr/bin/env python3
"""Where a CPU decode step's time goes (the CPU rows of docs/benchmarks.md).

    python scripts/profile_cpu.py --model DIR [--rows 1 4 8 64 256] [--batch 64] [--ctx 64 400]

DIR needs only a config.json: the weights are random. Prints:

1. per linear weight shape of the model, ``F.linear`` time with the weight row-major (as loaded) and
   column-major (hexgen.kernels.cpu_layout), for each ``--rows`` input rows. Enough copies of the shape rotate
   to pass 64 MiB, so the weights come from memory; the two orders alternate, medians of 5;
2. one decode step of ``--batch`` rows with contexts drawn uniformly from ``--ctx`` (the whole stage forward
   and the logits, the weights laid out by ``cpu_layout.tune`` as the engine lays them), with the reference
   path's decode groups on and off (build_meta's group_rows), alternating, medians of 5; then the operators
   of one grouped step (torch.profiler).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hexgen.config import Layout, ModelConfig  # noqa: E402
from hexgen.kernels import cpu_layout  # noqa: E402
from hexgen.model.attention import build_meta  # noqa: E402
from hexgen.model.loader import build_stage, init_random  # noqa: E402
from hexgen.model.rope import RotaryCache  # noqa: E402
from hexgen.parallel.groups import TPContext  # noqa: E402

CPU = torch.device("cpu")
BLOCK = 16


def linear_orders(linears: list[torch.nn.Module], rows: list[int]) -> None:
    shapes = sorted({tuple(m.weight.shape) for m in linears}, key=lambda s: s[0] * s[1])
    print(f"{'weight [N, K]':<16}{'rows':>6}{'row-major µs':>15}{'column-major µs':>18}{'column is':>12}")
    for n, k in shapes:
        copies = max(2, -(-cpu_layout.TIMED_BYTES // (n * k * 4)))
        row_w = [torch.randn(n, k) for _ in range(copies)]
        col_w = [cpu_layout.column_major(w) for w in row_w]
        for m in rows:
            x = torch.randn(m, k)
            a, b = [], []
            for _ in range(5):
                a.append(cpu_layout.time_linear(row_w, x))
                b.append(cpu_layout.time_linear(col_w, x))
            ra, rb = statistics.median(a), statistics.median(b)
            print(f"{str([n, k]):<16}{m:>6}{ra * 1e6:>15.1f}{rb * 1e6:>18.1f}{ra / rb:>11.2f}x")
        del row_w, col_w


def decode_step(model, cfg: ModelConfig, batch: int, ctx_range: tuple[int, int], seed: int = 0):
    rng = random.Random(seed)
    ctx = [rng.randint(*ctx_range) for _ in range(batch)]
    blocks = [-(-c // BLOCK) for c in ctx]
    order = list(range(sum(blocks)))
    rng.shuffle(order)  # scattered blocks, as a running engine's are
    tables, i = [], 0
    for n in blocks:
        tables.append(order[i:i + n])
        i += n
    kv = torch.randn(cfg.num_layers, 2, sum(blocks) * BLOCK, cfg.num_kv_heads, cfg.head_dim) * 0.1
    rotary = RotaryCache(cfg, ctx_range[1] + 1, CPU)
    tokens = torch.randint(0, cfg.vocab_size, (batch,))

    def step(grouped: bool = True) -> torch.Tensor:
        meta = build_meta([c - 1 for c in ctx], [1] * batch, ctx, tables, BLOCK, CPU, kernel=False,
                          group_rows=grouped)
        cos, sin = rotary.lookup(meta.positions, torch.float32)
        with torch.no_grad():
            return model.logits(model(tokens, cos, sin, kv, meta))
    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a folder with the model's config.json")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 64, 256])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, nargs=2, default=(64, 400))
    a = ap.parse_args()
    cfg = ModelConfig.from_dir(a.model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    stage = Layout.build(cfg, (1,), (cfg.num_layers,)).stage_of_rank(0)
    model = build_stage(cfg, stage, TPContext(0, 1, None), torch.float32, CPU)
    init_random(model, 0, 0)
    linears = [m for m in model.modules() if hasattr(m, "gemv")]
    linear_orders(linears, a.rows)

    print("layouts chosen:", {f"{n}x{k}": v for (n, k), v in cpu_layout.tune(linears).items()})
    step = decode_step(model, cfg, a.batch, tuple(a.ctx))
    times: dict[str, list[float]] = {"1": [], "0": []}
    for g in times:  # warm-up
        step(g == "1")
    for _ in range(5):
        for g in times:
            t = time.perf_counter()
            step(g == "1")
            times[g].append(time.perf_counter() - t)
    for g, label in (("1", "grouped"), ("0", "ungrouped")):
        print(f"decode step, {a.batch} rows, contexts {a.ctx[0]}-{a.ctx[1]}, {label}: "
              f"{statistics.median(times[g]) * 1e3:.1f} ms (median of 5)")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    return 0


if __name__ == "__main__":
    sys.exit(main())
