"""The benchmark modes: ``latency`` (batch 1) and ``throughput`` (many requests offered at once).

Each mode times the engine, then Hugging Face generate on the same requests in the same run, and (latency)
the memory roofline measured in the same run (a GPU's copy, or a 256 MiB copy on CPU), and returns one
JSON-able dict.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hexgen.bench import hf_baseline, hf_cb
from hexgen.bench.ceiling import ceiling, count_workload, matmul_rate, scaled_mm_rate
from hexgen.bench.engine_bench import at_once, run_engine
from hexgen.bench.memory import memory_lines, memory_summary
from hexgen.bench.roofline import copy_bandwidth, weight_bytes
from hexgen.bench.stats import RequestTiming, summarize
from hexgen.bench.workload import Shape, make_requests, mixed_shapes
from hexgen.config import EngineConfig, Layout, ModelConfig
from hexgen.engine.runner import ModelSpec
from hexgen.kernels import fp8_linear
from hexgen.quantization import weight_format


@dataclass(frozen=True)
class BenchSetup:
    model: ModelSpec
    layout: Layout
    engine: EngineConfig
    command: str
    skip_hf: bool = False
    devices: list[int] | None = None


def device_info(engine: EngineConfig) -> dict:
    info = {
        "device": engine.device,
        "torch": torch.__version__,
        "dtype": engine.dtype,
        "kv_cache_dtype": engine.kv_cache_dtype,
        "quantization": engine.quantization,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "load_avg_1_5_15m": [round(x, 2) for x in os.getloadavg()],  # other work on the host, at the end
        "kernels": engine.kernels.describe(),
    }
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


def served_config(setup: BenchSetup) -> ModelConfig:
    """The model as the engine serves it: its weight format after ``EngineConfig.quantization``."""
    cfg = setup.model.config()
    return dataclasses.replace(cfg, quantization=weight_format(cfg.quantization, setup.engine.quantization))


def _roofline(setup: BenchSetup) -> dict:
    cuda = setup.engine.device == "cuda"
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    bw = copy_bandwidth(dev) if cuda else copy_bandwidth(dev, CPU_COPY_BYTES)
    wb = weight_bytes(served_config(setup), getattr(torch, setup.engine.dtype))
    what = "one GPU's" if cuda else f"the CPU's ({torch.get_num_threads()} threads)"
    return {
        "copy_bandwidth_TBps": round(bw / 1e12, 3),
        "weight_GB": round(wb / 1e9, 3),
        "batch1_tokens_per_s": round(bw / wb, 1),
        "note": f"{what} copy bandwidth (read + write) / weight bytes read per token",
    }


def _ceiling(setup: BenchSetup, shapes: list[Shape]) -> dict:
    """The workload's physical limit (hexgen.bench.ceiling) from a matmul rate and a copy bandwidth measured
    here, now; on GPUs one card's rates times the layout's GPUs."""
    cuda = setup.engine.device == "cuda"
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = getattr(torch, setup.engine.dtype)
    gpus = setup.layout.world_size if cuda else 1
    cfg = served_config(setup)
    fp8_gemm = cfg.quantization == "fp8" and cuda and fp8_linear.tensor_cores(dev)
    flops = (scaled_mm_rate(dev) if fp8_gemm else matmul_rate(dev, dtype)) * gpus
    bw = (copy_bandwidth(dev) if cuda else copy_bandwidth(dev, CPU_COPY_BYTES)) * gpus
    kv_elem = 1 if getattr(setup.engine, "kv_cache_dtype", "auto") == "fp8" else None  # e4m3 (scales aside)
    counts = count_workload(cfg, shapes, torch.empty(0, dtype=dtype).element_size(), kv_elem)
    what = f"{gpus} GPU(s)" if cuda else f"the CPU ({torch.get_num_threads()} threads)"
    return {
        **ceiling(counts, flops, bw),
        "note": f"linear-layer FLOPs at a {'FP8' if fp8_gemm else setup.engine.dtype} matmul rate and K/V + "
        "weight bytes at the copy "
        f"bandwidth, both measured on {what} in this process (hexgen.bench.ceiling)",
    }


def _hf_model(setup: BenchSetup):
    cfg = setup.model.config()
    dev = torch.device(setup.engine.device, 0) if setup.engine.device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, setup.engine.dtype)
    model = hf_baseline.load_hf_model(
        setup.model.model_dir, cfg, dtype, dev, setup.engine.seed, random_weights=setup.model.random_weights
    )
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
    out = {
        "mode": "latency",
        "command": setup.command,
        **device_info(setup.engine),
        "layout": setup.layout.describe(),
        "shape": {"batch": 1, "prompt": prompt_len, "new_tokens": new_tokens, "reps": reps},
    }
    out["roofline"] = _roofline(setup)
    warm = make_requests([Shape(prompt_len, 16)], cfg.vocab_size, "warm", seed=99)
    measured = make_requests([Shape(prompt_len, new_tokens)] * reps, cfg.vocab_size, "req")
    run = run_engine(setup.layout, setup.model, setup.engine, at_once([warm] + [[r] for r in measured]), setup.devices)
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
        out["engine_vs_roofline"] = round(
            out["engine"]["decode_tokens_per_s"] / out["roofline"]["batch1_tokens_per_s"], 3
        )
    return out


def throughput(
    setup: BenchSetup,
    num_requests: int = 1000,
    prompt_range: tuple[int, int] = (64, 1024),
    output_range: tuple[int, int] = (32, 512),
    seed: int = 0,
    hf_batch_size: int = 64,
    hf_max_batches: int | None = None,
    hf_cb_requests: int = 300,
    checkpoint: Callable[[dict], None] | None = None,
) -> dict:
    """``num_requests`` of a fixed-seed mix, all offered at once (after a warm-up phase); HF runs the same
    requests in static batches of ``hf_batch_size`` (only the first ``hf_max_batches`` when given), then its
    continuous batching on the first ``hf_cb_requests`` of them, all offered at once (0: not run).
    ``checkpoint`` gets the result so far once the engine's figures and the ceiling are in (before the
    baselines run, so that a baseline that runs out of time loses only itself)."""
    cfg = setup.model.config()
    shapes = mixed_shapes(num_requests, prompt_range, output_range, seed)
    requests = make_requests(shapes, cfg.vocab_size, "req", seed)
    warm = make_requests([Shape(prompt_range[0], 8)] * 4, cfg.vocab_size, "warm", seed=99)
    out = {
        "mode": "throughput",
        "command": setup.command,
        **device_info(setup.engine),
        "layout": setup.layout.describe(),
        "workload": {
            "requests": num_requests,
            "prompt_range": list(prompt_range),
            "output_range": list(output_range),
            "seed": seed,
            "prompt_tokens": sum(s.prompt for s in shapes),
            "output_tokens": sum(s.output for s in shapes),
        },
        "engine_config": {
            "max_num_seqs": setup.engine.max_num_seqs,
            "max_num_batched_tokens": setup.engine.max_num_batched_tokens,
            "cuda_graphs": setup.engine.cuda_graphs,
            "async_steps": setup.engine.async_steps,
            "async_steps_tp": setup.engine.async_steps_tp,
        },
    }
    run = run_engine(setup.layout, setup.model, setup.engine, at_once([warm, requests]), setup.devices)
    out["engine"] = summarize([run.timings[r.request_id] for r in requests])
    out["engine"]["run_wall_s"] = round(run.wall_s, 2)
    out["memory"] = memory_summary(run.ranks)
    out["ceiling"] = _ceiling(setup, shapes)
    for key, name in (("tokens_per_s", "engine_vs_ceiling"), ("tokens_per_s_no_overlap", "engine_vs_no_overlap")):
        if out["ceiling"][key]:
            out[name] = round(out["engine"]["output_tokens_per_s"] / out["ceiling"][key], 3)
    if checkpoint is not None:
        checkpoint(out)
    if not setup.skip_hf:
        model, dev = _hf_model(setup)
        try:
            hf, info = hf_baseline.run_static_batches(model, requests, hf_batch_size, dev, hf_max_batches)
        except torch.OutOfMemoryError as e:  # report the engine's figures and the baseline's failure
            _release(model)
            out["hf"] = {"error": f"out of memory at static batch {hf_batch_size}: {str(e).splitlines()[0]}"}
            return out
        out["hf"] = {**summarize(hf), **info}
        if info["batches_run"] < info["batches_total"]:
            out["hf"]["note"] = (
                f"subsample: the first {info['batches_run']} of {info['batches_total']} "
                "static batches ran; tokens/s is over those batches (same mix, fixed seed); "
                "TTFT counts queueing behind the sampled batches only"
            )
        out["engine_vs_hf"] = round(out["engine"]["output_tokens_per_s"] / out["hf"]["output_tokens_per_s"], 3)
        if hf_cb_requests:
            out["hf_cb"] = _hf_continuous(model, dev, requests[:hf_cb_requests])
            if "output_tokens_per_s" in out["hf_cb"]:
                out["engine_vs_hf_cb"] = round(
                    out["engine"]["output_tokens_per_s"] / out["hf_cb"]["output_tokens_per_s"], 3
                )
        _release(model)
    return out


HF_CB_DEADLINE_S = 240.0  # continuous batching's results are collected this long at most


def _hf_continuous(model, dev: torch.device, requests: list) -> dict:
    """transformers' continuous batching on ``requests`` (hexgen.bench.hf_cb); an error is reported, not
    raised, so that the engine's figures survive a baseline that breaks."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        timings, info = hf_cb.run_continuous_batching(model, requests, dev, deadline_s=HF_CB_DEADLINE_S)
    except Exception as e:  # noqa: BLE001 - any failure of the baseline library is reported beside the figures
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    res = {**summarize(timings), **info} if timings else dict(info)
    if info["requests_run"]:
        res["note"] = f"the first {info['requests_run']} requests of the same mix, all offered at once" + (
            ""
            if info["requests_finished"] == info["requests_run"]
            else f"; only {info['requests_finished']} finished before the deadline"
        )
    return res


def format_table(res: dict) -> str:
    """A short human-readable table of one result."""
    kv = f" (KV cache {res['kv_cache_dtype']})" if res.get("kv_cache_dtype", "auto") != "auto" else ""
    rows = [f"hexgen bench {res['mode']} | {res['card']} | {res['dtype']}{kv} | {res['layout']} | {res['date']}"]
    cols = ("output_tokens_per_s", "decode_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")
    rows.append(f"{'':<10}" + "".join(f"{c:>22}" for c in cols))
    for name in ("engine", "hf", "hf_cb"):
        if name in res and "error" not in res[name]:
            rows.append(f"{name:<10}" + "".join(f"{str(res[name].get(c, '-')):>22}" for c in cols))
    if res.get("roofline"):
        r = res["roofline"]
        rows.append(
            f"roofline: {r['batch1_tokens_per_s']} tokens/s ({r['copy_bandwidth_TBps']} TB/s copy, "
            f"{r['weight_GB']} GB weights)"
        )
    if res.get("ceiling"):
        c = res["ceiling"]
        rows.append(
            f"ceiling: {c['tokens_per_s']} tokens/s ({c['bound']}-bound, {c['bound_s']} s), no overlap "
            f"{c['tokens_per_s_no_overlap']} tokens/s ({c['no_overlap_s']} s): {c['linear_PFLOP']} PFLOP "
            f"of linear layers at {c['matmul_TFLOPs']} TFLOP/s = {c['compute_s']} s; "
            f"{c['kv_read_TB'] + c['kv_write_TB'] + c['weight_read_TB']:.3f} TB of K/V + weights at "
            f"{c['copy_TBps']} TB/s = {c['memory_s']} s"
        )
    for k in ("engine_vs_ceiling", "engine_vs_no_overlap", "engine_vs_hf", "engine_vs_hf_cb", "engine_vs_roofline"):
        if k in res:
            rows.append(f"{k}: {res[k]}x")
    for name in ("hf", "hf_cb"):
        if name in res and (res[name].get("note") or res[name].get("error")):
            rows.append(f"{name}: {res[name].get('error') or res[name]['note']}")
    if res.get("memory"):
        rows += memory_lines(res["memory"])
    return "\n".join(rows)
