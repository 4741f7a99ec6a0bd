"""The paged decode kernel over an fp8 (e4m3) K/V cache against the same kernel over a bf16 cache, at one shape,
for a few launch settings, its tiles converted to fp16 (the default with bf16 activations) or to bf16
(``paged_decode``'s ``fp8_f16``): does halving the bytes halve the time?

    PYTHONPATH=. python3 scripts/bench_decode_fp8.py [--heads 32 32] [--batch 256] [--ctx 700] [--out FILE]

Each case is captured in a CUDA graph and replayed (hexgen.kernels.timing.replay_time). TB/s counts the live
K and V bytes a step must read in the cache's own dtype (2 bytes bf16, 1 byte fp8). Every fp8 setting is
checked against the fp8 default's output (same function, another schedule).
"""
from __future__ import annotations

import argparse
import json

import torch

from hexgen.kernels import paged_decode
from hexgen.kernels.timing import replay_time

D, BS = 128, 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, nargs=2, default=(32, 32), metavar=("N_Q", "N_KV"))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=700)
    ap.add_argument("--out")
    a = ap.parse_args()
    n_q, n_kv = a.heads
    blocks = -(-a.ctx // BS)
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(a.batch * blocks * BS, n_kv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(k.shape, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(a.batch, n_q, D, device="cuda", dtype=torch.bfloat16, generator=g)
    tables = torch.randperm(a.batch * blocks, device="cuda", generator=g).view(a.batch, blocks)
    lens = torch.full((a.batch,), a.ctx, device="cuda")
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    ones = torch.ones(n_kv, device="cuda", dtype=torch.float32)
    elems = a.batch * a.ctx * n_kv * D * 2  # K and V elements read
    scale = D ** -0.5

    def run(kc, vc, **kw):
        extra = {"k_scale": ones, "v_scale": ones} if kc.dtype == torch.float8_e4m3fn else {}
        return paged_decode.paged_decode(q, kc, vc, tables, lens, scale, BS, **extra, **kw)

    rows = []
    us = replay_time(lambda: run(k, v), reps=30) * 1e6
    rows.append({"cache": "bf16", "setting": "default", "us": round(us, 1), "TBps": round(elems * 2 / us / 1e6, 3)})
    ref = run(k8, v8).float()
    launches = [(64, 2, 2), (64, 2, 3), (64, 4, 2), (128, 4, 2), (128, 4, 3), (128, 8, 2), (256, 4, 2), (256, 8, 2)]
    cases = [dict(fp8_f16=f16, block_n=n, num_warps=w, num_stages=st) for f16 in (True, False) for n, w, st in launches]
    for kw in cases:
        try:
            err = (run(k8, v8, **kw).float() - ref).abs().max().item()
            us = replay_time(lambda kw=kw: run(k8, v8, **kw), reps=30) * 1e6
        except Exception as e:  # noqa: BLE001 - a setting Triton cannot compile
            rows.append({"cache": "fp8", "setting": kw, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        rows.append({"cache": "fp8", "setting": kw, "us": round(us, 1), "TBps": round(elems / us / 1e6, 3),
                     "max_diff_vs_default": err})
    fp8 = [r for r in rows if r["cache"] == "fp8" and "us" in r]
    best = min(fp8, key=lambda r: r["us"])
    default = next(r for r in fp8 if r["setting"] == cases[0])
    summary = {"gpu": torch.cuda.get_device_name(), "heads": [n_q, n_kv], "batch": a.batch, "ctx": a.ctx,
               "bf16_us": rows[0]["us"], "fp8_default_us": default["us"], "fp8_best": best,
               "bf16_over_fp8_default": round(rows[0]["us"] / default["us"], 3),
               "bf16_over_fp8_best": round(rows[0]["us"] / best["us"], 3)}
    print("FP8DECODE " + json.dumps(summary), flush=True)
    for r in sorted(rows, key=lambda r: r.get("us", float("inf"))):  # fastest first
        print(json.dumps(r), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
