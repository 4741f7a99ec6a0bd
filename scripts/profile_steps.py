"""Where a throughput run's time goes (GPU, TP 1): the cost of each kind of step the engine runs under load.

    python3 scripts/profile_steps.py [--preset llama-2-7b] [--max-seqs 256] [--budget 4096] [--ctx 300 700 1200]
        [--kernel NAME=VALUE ...] [--decode-only] [--sm-carveout SMS]

For each context length: a decode step of ``--max-seqs`` sequences replayed from its CUDA graph, and the same
step's attention alone (the paged decode kernel, one layer, times the layers); then an eager mixed step
(``max-seqs - 1`` decode rows plus one prefill chunk filling the token budget) and an eager prefill-only step
of the budget (``--decode-only`` skips those two). ``--sm-carveout`` leaves that many SMs out of every cuBLAS
GEMM the graphs capture (PyTorch's SM carveout), for trying SM partitions between the two halves of
``--kernel overlap=on``. Times are CUDA-event medians over repeats after warm-up. Prints one JSON line and
writes it to $OUT/profile_steps.json when OUT is set. Together with the step counts of a bench run (decode tokens ÷
sequences per step, prefill tokens ÷ budget) this says which step kind the run's time goes to.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hexgen.config import EngineConfig, KernelConfig, Layout, ModelConfig, preset  # noqa: E402
from hexgen.engine.plan import StepPlan  # noqa: E402
from hexgen.engine.runner import ModelSpec, StageRunner  # noqa: E402
from hexgen.kernels import paged_decode  # noqa: E402
from hexgen.parallel.groups import PipelineGroups  # noqa: E402
from hexgen.procs import free_port  # noqa: E402


def _median_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if not torch.cuda.is_available():  # CPU smoke run (tests of this script's plans only)
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


class Blocks:
    """Hands out disjoint block numbers, so that every sequence of a step owns its own cache blocks."""

    def __init__(self, bs: int, limit: int) -> None:
        self.bs, self.next, self.limit = bs, 0, limit

    def take(self, tokens: int) -> list[int]:
        n = -(-tokens // self.bs)
        if self.next + n > self.limit:
            self.next = 0  # wrap: contents are garbage anyway; only the read pattern matters
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def _plan(step: int, decode_ctx: list[int], prefill: list[tuple[int, int]], blocks: Blocks) -> StepPlan:
    """decode_ctx: context per decode row; prefill: (chunk tokens, context after the chunk) per sequence."""
    p = StepPlan(step)
    for i, c in enumerate(decode_ctx):
        p.seq_ids.append(i)
        p.input_ids.append(5)
        p.positions.append(c - 1)
        p.q_lens.append(1)
        p.ctx_lens.append(c)
        p.block_tables.append(blocks.take(c))
        p.sample.append(True)
        p.out_lens.append(1)
    for j, (q, c) in enumerate(prefill):
        p.seq_ids.append(len(decode_ctx) + j)
        p.input_ids += [7] * q
        p.positions += list(range(c - q, c))
        p.q_lens.append(q)
        p.ctx_lens.append(c)
        p.block_tables.append(blocks.take(c))
        p.sample.append(True)
        p.out_lens.append(0)
    return p


def _eager_step(r: StageRunner, plan: StepPlan) -> None:
    ids = torch.tensor(plan.input_ids, device=r.device)
    saved, r.graphs = r.graphs, None  # the eager path, as the engine runs a step with a prefill chunk
    try:
        h = r.forward(plan, ids)
        r.logits(plan, h).argmax(-1)
    finally:
        r.graphs = saved


def _graph_step(r: StageRunner, plan: StepPlan) -> None:
    ids = torch.tensor(plan.input_ids, device=r.device)
    h = r.forward(plan, ids)
    r.logits(plan, h).argmax(-1)


def _kernel_table(name: str, fn) -> None:
    """The CUDA kernels of three runs of ``fn`` by total device time, and the host time they took."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    print(f"KERNELS {name} (3 steps)", flush=True)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-2-7b")
    ap.add_argument("--model", help="a model directory (its config.json gives the shape; weights random)")
    ap.add_argument("--kernels", action="store_true",
                    help="also print the CUDA kernel times of one mixed and one decode step (torch.profiler)")
    ap.add_argument("--max-seqs", type=int, default=256)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--ctx", type=int, nargs="+", default=[300, 700, 1200])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--kernel", action="append", default=[], metavar="NAME=VALUE",
                    help="a kernel setting (hexgen.config.KernelConfig), e.g. overlap=on; repeatable")
    ap.add_argument("--decode-only", action="store_true", help="skip the eager mixed and prefill steps")
    ap.add_argument("--sm-carveout", type=int, default=0, metavar="SMS",
                    help="SMs every captured cuBLAS GEMM leaves free (torch._C._set_sm_carveout_experimental)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if args.sm_carveout:
        torch._C._set_sm_carveout_experimental(args.sm_carveout)
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    cfg = ModelConfig.from_dir(args.model) if args.model else preset(args.preset)
    spec = ModelSpec(model_dir=args.model, random_weights=True) if args.model else \
        ModelSpec(preset=args.preset, random_weights=True)
    groups = PipelineGroups(Layout.build(cfg, [1]), 0, f"tcp://127.0.0.1:{free_port()}", dev)
    engine = EngineConfig(dtype="bfloat16" if cuda else "float32", device=dev.type, cuda_graphs=cuda,
                          max_num_seqs=args.max_seqs, max_num_batched_tokens=args.budget, gpu_memory_fraction=0.9,
                          kernels=KernelConfig.from_flags(args.kernel))
    r = StageRunner(spec, engine, groups)
    bs = engine.block_size
    blocks = Blocks(bs, r.num_blocks)
    res = {"gpu": torch.cuda.get_device_name(dev) if cuda else "cpu", "preset": args.preset, "max_seqs": args.max_seqs,
           "budget": args.budget, "kv_blocks": r.num_blocks, "kernels": r.kernels.describe(), "rows": []}
    layers = cfg.num_layers
    n_kv, d = r.n_kv_local, cfg.head_dim
    kv_elem = r.kv.element_size()  # 1 with an fp8 cache
    for ctx in args.ctx:
        b = args.max_seqs
        if b * ctx > r.num_blocks * bs:
            continue
        row = {"ctx": ctx, "batch": b}
        dec = _plan(0, [ctx] * b, [], blocks)
        row["graph_decode_ms"] = round(_median_ms(lambda: _graph_step(r, dec), args.reps), 3)
        row["eager_decode_ms"] = round(_median_ms(lambda: _eager_step(r, dec), args.reps), 3)
        live = b * ctx * n_kv * d * 2 * kv_elem
        row["kv_read_GB_per_step"] = round(live * layers / 1e9, 2)
        if cuda:
            tables = torch.tensor(dec.block_tables, device=dev)
            lens = torch.tensor(dec.ctx_lens, device=dev)
            q = torch.randn(b, cfg.num_heads, d, device=dev, dtype=r.dtype)
            k, v = r.kv[0, 0], r.kv[0, 1]
            sc = {} if r.kv_scales is None else {"k_scale": r.kv_scales[0, 0], "v_scale": r.kv_scales[0, 1]}
            att = _median_ms(lambda: paged_decode.paged_decode(q, k, v, tables, lens, d ** -0.5, bs, **sc), 20)
            row["decode_attention_ms_all_layers"] = round(att * layers, 3)
            row["decode_attention_TBps"] = round(live / (att * 1e-3) / 1e12, 3)
        chunk = args.budget - (b - 1)
        mixed = _plan(0, [ctx] * (b - 1), [(chunk, chunk)], blocks)
        if not args.decode_only:
            row["eager_mixed_ms"] = round(_median_ms(lambda: _eager_step(r, mixed), args.reps), 3)
            row["mixed_chunk_tokens"] = chunk
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.kernels and cuda and ctx == args.ctx[0]:
            _kernel_table("mixed", lambda: _eager_step(r, mixed))
            _kernel_table("decode (graph)", lambda: _graph_step(r, dec))
    n_pre = max(1, args.budget // 1024)
    pre = _plan(0, [], [(args.budget // n_pre, args.budget // n_pre)] * n_pre, blocks)
    if not args.decode_only:
        res["eager_prefill_ms"] = round(_median_ms(lambda: _eager_step(r, pre), args.reps), 3)
        res["prefill_tokens"] = pre.num_tokens
    res["sm_carveout"] = args.sm_carveout
    text = json.dumps(res)
    print("STEPS " + text, flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "profile_steps.json").write_text(text)
    groups.close()


if __name__ == "__main__":
    main()
