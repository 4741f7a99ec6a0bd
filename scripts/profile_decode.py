"""Where a batch-1 decode step's time goes (GPU). One process per TP rank; prints JSON and writes it to $OUT.

    python3 scripts/profile_decode.py --tp 1 [--ctx 256] [--loop] [--quantization fp8]

(``--loop``: the engine's own step loop too; ``--quantization fp8``: FP8 weights, their GEMVs tuned as well.)

Per setting (fused kernels off / on, cuBLAS or Triton GEMV; KernelConfig.fused, .gemv): the captured
decode graph's replay time (CUDA events, back to back), the serial step (forward + logits + argmax +
.item(), host clock), the host time to enqueue one step, and the kernels of one eager step
(torch.profiler: count and µs per step, top kernels). TP 1 only: cuBLAS and Triton GEMV at batch 1 for
the layer shapes (weights rotated past L2), and with --loop the FirstLeader loop on one request with
per-phase host timers (scheduler, plan encode, forward, logits, sample, sink) against the step wall time
from the sink's clock.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hexgen.config import EngineConfig, Layout, preset  # noqa: E402
from hexgen.engine.cuda_graph import DecodeGraphs  # noqa: E402
from hexgen.engine.plan import StepPlan  # noqa: E402
from hexgen.engine.runner import ModelSpec, StageRunner  # noqa: E402
from hexgen.kernels import fp8_linear  # noqa: E402
from hexgen.kernels.choice import resolve  # noqa: E402
from hexgen.kernels.gemv import describe as gemv_describe  # noqa: E402
from hexgen.kernels.gemv import tune as tune_gemv  # noqa: E402
from hexgen.kernels.timing import graph_time, replay_time  # noqa: E402
from hexgen.parallel.groups import PipelineGroups  # noqa: E402


def _plan(step: int, ctx: int, bs: int) -> StepPlan:
    nb = -(-ctx // bs)
    return StepPlan(step, seq_ids=[0], input_ids=[5], positions=[ctx - 1], q_lens=[1], ctx_lens=[ctx],
                    block_tables=[list(range(nb))], sample=[True], out_lens=[0])


def _fresh_graphs(r: StageRunner) -> DecodeGraphs:
    return DecodeGraphs(r._decode_forward, r.groups.stage.is_first, r.cfg.hidden_size, r.dtype, r.device,
                        r.engine.block_size, r.engine.max_num_seqs, r.max_len, scratch_block=r.num_blocks,
                        kernels=r.kernels)


def _use_kernels(r: StageRunner, fused_on: bool, gemv: str) -> dict:
    """Switch the runner's stage to these kernel choices (re-tuning the GEMV, fresh graphs); the GEMV choice."""
    r.kernels = resolve(dataclasses.replace(r.engine.kernels, fused=fused_on, gemv=gemv), r.device)
    r.model.set_kernels(r.kernels)
    choice = tune_gemv(r.linears, r.kernels.gemv)
    fp8 = [m for m in r.model.modules() if fp8_linear.is_fp8(m)]
    choice.update(fp8_linear.tune(fp8, r.kernels.gemv, r.kernels.fp8_gemv))
    r.graphs = _fresh_graphs(r)
    return choice


def _kernels(r: StageRunner, ctx: int, steps: int = 4) -> dict:
    """Kernels of eager decode steps on the graphs' static buffers (same kernels as inside the graph)."""
    from torch.profiler import ProfilerActivity, profile

    g = r.graphs
    x, tables, lens = g._inputs(1, g.widths[-1])
    tables.fill_(g.scratch)
    tables[0, :-(-ctx // g.block_size)] = torch.arange(-(-ctx // g.block_size), device=r.device)
    lens.fill_(ctx)
    for _ in range(2):
        r._decode_forward(x, tables, lens)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            r._decode_forward(x, tables, lens)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if e.count and t and not e.key.startswith(("cudaLaunch", "cudaDevice", "Memcpy", "Memset")):
            rows.append((e.key[:70], e.count / steps, t / steps))
    rows.sort(key=lambda x: -x[2])
    return {"kernels_per_step": round(sum(c for _, c, _ in rows)),
            "kernel_us_per_step": round(sum(t for *_, t in rows)),
            "top": [(k, round(c, 1), round(t)) for k, c, t in rows[:14]]}


def _setting(r: StageRunner, ctx: int, fused_on: bool, gemv: str, n: int = 60) -> dict:
    choice = _use_kernels(r, fused_on, gemv)
    head = r.model.lm_head is not None
    ids = torch.tensor([5], device=r.device)

    def step(i: int):
        p = _plan(i, ctx, r.engine.block_size)
        h = r.forward(p, ids)
        return r.logits(p, h).argmax(-1) if head else h[:, 0]

    for i in range(5):
        step(i).item()
    serial, enqueue = [], []
    for i in range(n):
        t0 = time.perf_counter()
        out = step(i)
        t1 = time.perf_counter()
        out.item()
        serial.append(time.perf_counter() - t0)
        enqueue.append(t1 - t0)
    graph = next(iter(r.graphs.graphs.values()))[0]
    torch.cuda.synchronize()
    replay_s = graph_time(graph, n)
    calls = []
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        calls.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    res = {"fused": fused_on, "gemv": gemv, "gemv_choice": {gemv_describe(k): v for k, v in choice.items()},
           "graph_replay_ms": round(replay_s * 1e3, 3),
           "serial_step_ms": round(1e3 * statistics.median(serial), 3),
           "host_enqueue_ms": round(1e3 * statistics.median(enqueue), 3),
           "host_replay_call_ms": round(1e3 * statistics.median(calls), 3)}
    res.update(_kernels(r, ctx))
    return res


GEMV_CONFIGS = [(*t, ahead) for ahead in (0, 1)
                for t in [(4, 512, 4), (8, 512, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8), (32, 256, 8)]]


def _time_graph(fn, ws, x) -> float:
    """µs per call of fn(x, w), captured 4 times over the rotating weights (launched as in the engine's graphs)."""
    def rotate() -> None:
        for _ in range(4):
            for w in ws:
                fn(x, w)
    return replay_time(rotate, warmup=1, reps=10) * 1e6 / (4 * len(ws))


def _gemv(dev: torch.device, tp: int, triton_configs: bool) -> list[dict]:
    """cuBLAS (F.linear) and the Triton GEMV at batch 1, per layer shape; GB/s of weight reads."""
    from hexgen.kernels import gemv

    out = []
    h, inter, vocab = 4096, 11008, 32000
    for name, n, k in (("qkv", 3 * h // tp, h), ("o", h, h // tp), ("gate_up", 2 * inter // tp, h),
                       ("down", h, inter // tp), ("lm_head", vocab, h)):
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(8)]  # rotate past L2
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        row = {"gemv": name, "tp": tp, "shape": [n, k]}
        us = _time_graph(torch.nn.functional.linear, ws, x)
        row["cublas_us"], row["cublas_GBps"] = round(us, 1), round(n * k * 2 / us / 1e3)
        if triton_configs:
            err = (gemv.gemv(x, ws[0]).float() - torch.nn.functional.linear(x, ws[0]).float()).abs().max().item()
            row["triton_maxerr"] = round(err, 4)
            for cfg in GEMV_CONFIGS:
                us = _time_graph(lambda x_, w_: gemv.gemv(x_, w_, cfg), ws, x)
                row["triton_{}x{}w{}a{}_GBps".format(*cfg)] = round(n * k * 2 / us / 1e3)
        out.append(row)
        del ws
    return out


def _copy_bw(dev: torch.device) -> float:
    a = torch.empty(2 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (time.perf_counter() - t)


def _loop(r: StageRunner, model: ModelSpec, new_tokens: int) -> dict:
    """The FirstLeader loop on one request (prompt 128) with host timers on each phase."""
    from hexgen.engine import last_stage, leader, scheduler
    from hexgen.engine.offline import ListSource
    from hexgen.engine.output import OutputProcessor
    from hexgen.engine.types import Request, SamplingParams

    acc: dict[str, list[float]] = defaultdict(list)

    def timed(owner, name, key):
        fn = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[key].append(time.perf_counter() - t)
        setattr(owner, name, wrapper)

    class Sink:
        def __init__(self):
            self.stamps = []

        def emit(self, outputs):
            self.stamps.append(time.perf_counter())

        def close(self):
            pass

    timed(scheduler.Scheduler, "schedule", "schedule")
    timed(scheduler.Scheduler, "update", "scheduler.update")
    timed(StepPlan, "encode", "plan.encode")
    timed(StageRunner, "forward", "runner.forward (enqueue)")
    timed(StageRunner, "logits", "runner.logits")
    timed(last_stage, "sample", "sample (argmax, no sync)")
    timed(last_stage.LastStage, "finish_step", "finish_step (incl. .tolist sync; synchronous loop)")
    timed(last_stage.LastStage, "complete", "complete (waits for the step's ids)")
    timed(leader, "input_ids", "input_ids (asynchronous loop)")
    timed(OutputProcessor, "step", "output.step")
    timed(leader.PipelinedSteps, "launch", "launch (all of a step's work; synchronous loop)")
    timed(leader.AheadSteps, "launch", "launch (enqueue a step; asynchronous loop)")
    sink = Sink()
    last = last_stage.LastStage(r, model, sink, False)
    req = Request("0", [7] * 128, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    first = leader.FirstLeader(r.groups, r, r.engine, ListSource([req.to_dict()]), last)
    timed(sink, "emit", "sink.emit")
    first.run()
    skip = 32  # prefill and the first decode steps (graph capture)
    gaps = [b - a for a, b in zip(sink.stamps[skip:], sink.stamps[skip + 1:])]
    return {"step_wall_ms": round(1e3 * statistics.median(gaps), 3),
            "phases_ms": {k: round(1e3 * statistics.median(v[skip:] or v), 3) for k, v in acc.items()}}


def rank_main(rank: int, args: argparse.Namespace, port: int) -> None:
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    cfg = preset(args.preset)
    layout = Layout.build(cfg, [args.tp])
    groups = PipelineGroups(layout, rank, f"tcp://127.0.0.1:{port}", dev)
    model = ModelSpec(preset=args.preset, random_weights=True)
    engine = EngineConfig(dtype="bfloat16", device="cuda", cuda_graphs=True, max_num_seqs=args.max_seqs,
                          gpu_memory_fraction=0.5, quantization=args.quantization)
    runner = StageRunner(model, engine, groups)
    res = {"gpu": torch.cuda.get_device_name(dev), "tp": args.tp, "ctx": args.ctx,
           "fast_all_reduce": groups.tp.fast is not None}
    if rank == 0 and args.tp == 1:
        res["copy_TBps"] = round(_copy_bw(dev) / 1e12, 3)
    combos = ((False, "cublas"), (True, "cublas"), (True, "auto"), (True, "triton"))
    res["settings"] = [_setting(runner, args.ctx, f, g) for f, g in combos]
    if rank == 0 and args.tp == 1:
        if args.gemv_bench:
            res["gemv"] = _gemv(dev, 1, True) + _gemv(dev, 2, True)[:4]
        if args.loop:
            _use_kernels(runner, True, args.loop_gemv)
            res["loop"] = _loop(runner, model, args.new_tokens)
    if rank == 0:
        text = json.dumps(res)
        print("PROFILE " + text, flush=True)
        out = os.environ.get("OUT")
        if out:
            Path(out, f"profile_tp{args.tp}.json").write_text(text)
    groups.barrier()
    groups.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--preset", default="llama-2-7b")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--max-seqs", type=int, default=64)
    ap.add_argument("--quantization", default="auto", choices=["auto", "fp8"],
                    help="weights (EngineConfig.quantization)")
    ap.add_argument("--loop", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--loop-gemv", default="triton", choices=["cublas", "triton", "auto"])
    ap.add_argument("--gemv-bench", action="store_true", help="time cuBLAS and Triton GEMV configurations")
    args = ap.parse_args()
    from hexgen.procs import free_port

    port = free_port()
    if args.tp == 1:
        rank_main(0, args, port)
    else:
        mp.spawn(rank_main, args=(args, port), nprocs=args.tp)


if __name__ == "__main__":
    main()
