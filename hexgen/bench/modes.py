"""The benchmark modes: ``latency`` (batch 1) and ``throughput`` (many requests offered at once).

Each mode times the engine, then Hugging Face generate on the same requests in the same run, and (latency)
the memory roofline measured in the same run (a GPU's copy, or a 256 MiB copy on CPU), and returns one
JSON-able dict.
"""
from __future__ import annotations

import datetime
import gc
import os
import platform
from dataclasses import dataclass

import torch

from hexgen.bench import hf_baseline
from hexgen.bench.engine_bench import at_once, run_engine
from hexgen.bench.memory import memory_lines, memory_summary
from hexgen.bench.roofline import copy_bandwidth, weight_bytes
from hexgen.bench.stats import RequestTiming, summarize
from hexgen.bench.workload import Shape, make_requests, mixed_shapes
from hexgen.config import EngineConfig, Layout
from hexgen.engine.runner import ModelSpec


@dataclass(frozen=True)
class BenchSetup:
    model: ModelSpec
    layout: Layout
    engine: EngineConfig
    command: str
    skip_hf: bool = False
    devices: list[int] | None = None


def device_info(engine: EngineConfig) -> dict:
    info = {"device": engine.device, "torch": torch.__version__, "dtype": engine.dtype,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "host_cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
            "load_avg_1_5_15m": [round(x, 2) for x in os.getloadavg()],  # other work on the host, at the end
            "kernels": engine.kernels.describe()}
    if engine.device == "cuda":
        info["card"] = torch.cuda.get_device_name(0)
        info["cards"] = torch.cuda.device_count()
    else:
        info["card"] = f"CPU ({torch.get_num_threads()} threads)"
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


CPU_COPY_BYTES = 256 << 20  # the CPU roofline's copy: larger than the caches, small enough for a test machine


def _roofline(setup: BenchSetup) -> dict:
    cuda = setup.engine.device == "cuda"
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    bw = copy_bandwidth(dev) if cuda else copy_bandwidth(dev, CPU_COPY_BYTES)
    wb = weight_bytes(setup.model.config(), getattr(torch, setup.engine.dtype))
    what = "one GPU's" if cuda else f"the CPU's ({torch.get_num_threads()} threads)"
    return {"copy_bandwidth_TBps": round(bw / 1e12, 3), "weight_GB": round(wb / 1e9, 3),
            "batch1_tokens_per_s": round(bw / wb, 1),
            "note": f"{what} copy bandwidth (read + write) / weight bytes read per token"}


def _hf_model(setup: BenchSetup):
    cfg = setup.model.config()
    dev = torch.device(setup.engine.device, 0) if setup.engine.device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, setup.engine.dtype)
    model = hf_baseline.load_hf_model(setup.model.model_dir, cfg, dtype, dev, setup.engine.seed)
    hf_baseline.warm_up(model, dev, cfg.vocab_size)
    return model, dev


def _release(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _latency_summary(timings: list[RequestTiming]) -> dict:
    s = summarize(timings)
    s["decode_tokens_per_s"] = round(1e3 / s["tpot_p50_ms"], 2) if s["tpot_p50_ms"] else None
    return s


def latency(setup: BenchSetup, prompt_len: int = 128, new_tokens: int = 256, reps: int = 3) -> dict:
    """Batch 1: ``reps`` requests one after another (after a warm-up request), engine then HF."""
    cfg = setup.model.config()
    out = {"mode": "latency", "command": setup.command, **device_info(setup.engine),
           "layout": setup.layout.describe(), "shape": {"batch": 1, "prompt": prompt_len, "new_tokens": new_tokens,
                                                        "reps": reps}}
    out["roofline"] = _roofline(setup)
    warm = make_requests([Shape(prompt_len, 16)], cfg.vocab_size, "warm", seed=99)
    measured = make_requests([Shape(prompt_len, new_tokens)] * reps, cfg.vocab_size, "req")
    run = run_engine(setup.layout, setup.model, setup.engine, at_once([warm] + [[r] for r in measured]),
                     setup.devices)
    out["engine"] = _latency_summary([run.timings[r.request_id] for r in measured])
    out["engine"]["run_wall_s"] = round(run.wall_s, 2)
    out["memory"] = memory_summary(run.ranks)
    if not setup.skip_hf:
        model, dev = _hf_model(setup)
        hf = []
        for r in measured:
            t, _ = hf_baseline.run_static_batches(model, [r], 1, dev)
            hf += t
        out["hf"] = _latency_summary(hf)
        _release(model)
        out["engine_vs_hf"] = round(out["engine"]["decode_tokens_per_s"] / out["hf"]["decode_tokens_per_s"], 3)
    if out["roofline"]:
        out["engine_vs_roofline"] = round(out["engine"]["decode_tokens_per_s"]
                                          / out["roofline"]["batch1_tokens_per_s"], 3)
    return out


def throughput(setup: BenchSetup, num_requests: int = 1000, prompt_range: tuple[int, int] = (64, 1024),
               output_range: tuple[int, int] = (32, 512), seed: int = 0, hf_batch_size: int = 64,
               hf_max_batches: int | None = None) -> dict:
    """``num_requests`` of a fixed-seed mix, all offered at once (after a warm-up phase); HF runs the same
    requests in static batches of ``hf_batch_size`` (only the first ``hf_max_batches`` when given)."""
    cfg = setup.model.config()
    shapes = mixed_shapes(num_requests, prompt_range, output_range, seed)
    requests = make_requests(shapes, cfg.vocab_size, "req", seed)
    warm = make_requests([Shape(prompt_range[0], 8)] * 4, cfg.vocab_size, "warm", seed=99)
    out = {"mode": "throughput", "command": setup.command, **device_info(setup.engine),
           "layout": setup.layout.describe(),
           "workload": {"requests": num_requests, "prompt_range": list(prompt_range),
                        "output_range": list(output_range), "seed": seed,
                        "prompt_tokens": sum(s.prompt for s in shapes),
                        "output_tokens": sum(s.output for s in shapes)},
           "engine_config": {"max_num_seqs": setup.engine.max_num_seqs,
                             "max_num_batched_tokens": setup.engine.max_num_batched_tokens,
                             "cuda_graphs": setup.engine.cuda_graphs, "async_steps": setup.engine.async_steps,
                             "async_steps_tp": setup.engine.async_steps_tp}}
    run = run_engine(setup.layout, setup.model, setup.engine, at_once([warm, requests]), setup.devices)
    out["engine"] = summarize([run.timings[r.request_id] for r in requests])
    out["engine"]["run_wall_s"] = round(run.wall_s, 2)
    out["memory"] = memory_summary(run.ranks)
    if not setup.skip_hf:
        model, dev = _hf_model(setup)
        try:
            hf, info = hf_baseline.run_static_batches(model, requests, hf_batch_size, dev, hf_max_batches)
        except torch.OutOfMemoryError as e:  # report the engine's figures and the baseline's failure
            _release(model)
            out["hf"] = {"error": f"out of memory at static batch {hf_batch_size}: {str(e).splitlines()[0]}"}
            return out
        _release(model)
        out["hf"] = {**summarize(hf), **info}
        if info["batches_run"] < info["batches_total"]:
            out["hf"]["note"] = (f"subsample: the first {info['batches_run']} of {info['batches_total']} "
                                 "static batches ran; tokens/s is over those batches (same mix, fixed seed); "
                                 "TTFT counts queueing behind the sampled batches only")
        out["engine_vs_hf"] = round(out["engine"]["output_tokens_per_s"] / out["hf"]["output_tokens_per_s"], 3)
    return out


def format_table(res: dict) -> str:
    """A short human-readable table of one result."""
    rows = [f"hexgen bench {res['mode']} | {res['card']} | {res['dtype']} | {res['layout']} | {res['date']}"]
    cols = ("output_tokens_per_s", "decode_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
            "tpot_p99_ms")
    rows.append(f"{'':<10}" + "".join(f"{c:>22}" for c in cols))
    for name in ("engine", "hf"):
        if name in res:
            rows.append(f"{name:<10}" + "".join(f"{str(res[name].get(c, '-')):>22}" for c in cols))
    if res.get("roofline"):
        r = res["roofline"]
        rows.append(f"roofline: {r['batch1_tokens_per_s']} tokens/s ({r['copy_bandwidth_TBps']} TB/s copy, "
                    f"{r['weight_GB']} GB weights)")
    for k in ("engine_vs_hf", "engine_vs_roofline"):
        if k in res:
            rows.append(f"{k}: {res[k]}x")
    if "hf" in res and res["hf"].get("note"):
        rows.append(f"hf: {res['hf']['note']}")
    if res.get("memory"):
        rows += memory_lines(res["memory"])
    return "\n".join(rows)
