"""Time one layer's decode attention on the GPU: the Triton paged kernel against the gather path.

Llama-2-7B shapes (32 query and KV heads, head_dim 128, bf16, block size 16). Each case is captured in a
CUDA graph and replayed, as the engine does. Bandwidth counts the live K and V bytes each step must read
(sum of context lengths × heads × head_dim × 2 tensors × 2 bytes), so 3 TB/s is the H100 ceiling.

    PYTHONPATH=. python3 scripts/bench_paged_decode.py [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json

import torch

from hexgen.kernels import paged_decode
from hexgen.kernels.timing import replay_time
from hexgen.model import attention

N_Q, N_KV, D, BS = 32, 32, 128, 16


def _time(fn, reps: int = 50) -> float:
    """Mean µs per call of ``fn`` replayed from a CUDA graph."""
    return replay_time(fn, warmup=2, reps=reps) * 1e6


def case(batch: int, ctx: int, width_tokens: int) -> dict:
    blocks = -(-width_tokens // BS)
    n_blocks = batch * blocks + 1
    k = torch.randn(n_blocks * BS, N_KV, D, device="cuda", dtype=torch.bfloat16)  # [slots, n_kv, d]
    v = torch.randn_like(k)
    q = torch.randn(batch, N_Q, D, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(batch * blocks, device="cuda").view(batch, blocks)  # non-contiguous blocks
    lens = torch.full((batch,), ctx, device="cuda")
    scale = D ** -0.5
    gather = attention.decode_meta(tables, lens, BS, kernel=False)
    kernel_us = _time(lambda: paged_decode.paged_decode(q, k, v, tables, lens, scale, BS))
    gather_us = _time(lambda: attention._decode(q, k, v, gather, scale))
    ref = attention._decode(q, k, v, gather, scale).float()
    err = (paged_decode.paged_decode(q, k, v, tables, lens, scale, BS).float() - ref).abs().max().item()
    live = batch * ctx * N_KV * D * 2 * 2
    return dict(batch=batch, ctx=ctx, width=width_tokens, splits=paged_decode.num_splits(batch, N_KV,
                blocks * BS, q.device), kernel_us=round(kernel_us, 1), gather_us=round(gather_us, 1),
                speedup=round(gather_us / kernel_us, 2), kernel_tb_s=round(live / kernel_us / 1e6, 2),
                max_err=err)


QUICK = ((False, True), (32, 64, 128), (2, 4), (2, 3))  # --quick: head order, tile, warps, stages
QUICK_GRID = False
DEFAULTS = (64, 2, 2, True)  # paged_decode's defaults: block_n, num_warps, num_stages, head_major


def sweep(batch: int, ctx: int, width_tokens: int) -> list[dict]:
    """Every launch setting of the kernel at one shape: TB/s of live K/V reads, best first."""
    blocks = -(-width_tokens // BS)
    k = torch.randn(batch * blocks * BS + BS, N_KV, D, device="cuda", dtype=torch.bfloat16)  # [slots, n_kv, d]
    v = torch.randn_like(k)
    q = torch.randn(batch, N_Q, D, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(batch * blocks, device="cuda").view(batch, blocks)
    lens = torch.full((batch,), ctx, device="cuda")
    live = batch * ctx * N_KV * D * 2 * 2
    ref = paged_decode.paged_decode(q, k, v, tables, lens, D ** -0.5, BS).float()
    out = []
    grid = QUICK if QUICK_GRID else ((False, True), (16, 32, 64), (2, 4, 8), (1, 2, 3))
    for head_major in grid[0]:
        for block_n in grid[1]:
            for warps in grid[2]:
                for stages in grid[3]:
                    for splits in sorted({1, 2, paged_decode.num_splits(batch, N_KV, blocks * BS, q.device)}):
                        kw = dict(splits=splits, block_n=block_n, num_warps=warps, num_stages=stages,
                                  head_major=head_major)
                        try:
                            err = (paged_decode.paged_decode(q, k, v, tables, lens, D ** -0.5, BS, **kw).float()
                                   - ref).abs().max().item()
                            us = _time(lambda: paged_decode.paged_decode(q, k, v, tables, lens, D ** -0.5, BS,
                                                                         **kw), reps=20)
                        except Exception as e:  # a setting Triton cannot compile (out of resources)
                            out.append(dict(kw, error=type(e).__name__))
                            continue
                        out.append(dict(kw, us=round(us, 1), tb_s=round(live / us / 1e6, 3), max_err=err))
    out.sort(key=lambda r: r.get("us", 1e18))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--sweep", type=int, nargs=3, action="append", metavar=("BATCH", "CTX", "WIDTH"),
                    help="time every launch setting at this shape (repeatable); the 5 best are printed")
    ap.add_argument("--heads", type=int, nargs=2, metavar=("N_Q", "N_KV"), default=(32, 32),
                    help="query and KV heads (default 32 32, Llama-2-7B; 32 8 is Llama-3.1-8B)")
    ap.add_argument("--quick", action="store_true", help="sweep: a smaller grid of settings (%s)" % (QUICK,))
    args = ap.parse_args()
    global N_Q, N_KV, QUICK_GRID
    N_Q, N_KV = args.heads
    QUICK_GRID = args.quick
    if args.sweep:
        res = []
        for batch, ctx, width in args.sweep:
            rows = sweep(batch, ctx, width)
            res.append({"batch": batch, "ctx": ctx, "width": width, "rows": rows})
            splits = paged_decode.num_splits(batch, N_KV, -(-width // BS) * BS, torch.device("cuda", 0))
            default = [r for r in rows if r["splits"] == splits and DEFAULTS == (
                r.get("block_n"), r.get("num_warps"), r.get("num_stages"), r.get("head_major"))]
            print(json.dumps({"heads": [N_Q, N_KV], "batch": batch, "ctx": ctx, "best": rows[:5],
                              "default": default}), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "sweeps": res}, f, indent=1)
        return
    rows = []
    # (batch, live context, table width): batch-1 latency shapes, and batch-64 throughput shapes
    for batch, ctx, width in [(1, 384, 4096), (1, 4096, 4096), (8, 1024, 2048), (64, 256, 512),
                              (64, 1024, 2048), (64, 1024, 4096)]:
        row = case(batch, ctx, width)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
