"""The device's kernel timeline over a whole run (torch.profiler, CUDA activity only), reduced to a summary:
the time some kernel ran against the wall span, the idle gaps between kernels by length, kernel time by kind
and by name, and the host's garbage-collector pauses. ``EngineConfig.device_trace`` names the JSON file; the
stage-0 leader records around its loop. Recording costs host time per kernel, so a traced run is for finding
where time goes, not for figures.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# gap lengths, in microseconds, the summary sorts idle time into: [0, 10), [10, 100), ..., [10 ms, ∞)
GAP_EDGES_US = (10, 100, 1_000, 10_000)
KINDS = (  # first match of a lowercased kernel name wins
    ("attention", ("decode_stage", "prefill_fwd")),
    ("gemv", ("gemv",)),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_")),
    ("nccl", ("nccl",)),
    ("copy", ("memcpy", "memset")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, marks in KINDS:
        if any(m in low for m in marks):
            return kind
    return "other"


class GcPauses:
    """The garbage collector's passes while installed (``gc.callbacks``): count, total and longest, by
    generation."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.by_gen: dict[int, list[float]] = {}

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.t0 = time.perf_counter()
        else:
            self.by_gen.setdefault(info["generation"], []).append(time.perf_counter() - self.t0)

    def summary(self) -> dict:
        return {
            f"gen{g}": {"count": len(v), "total_s": round(sum(v), 4), "max_ms": round(max(v) * 1e3, 2)}
            for g, v in sorted(self.by_gen.items())
        }


def summarize(kernels: list[tuple[str, int, int]], wall_s: float) -> dict:
    """kernels: (name, start ns, end ns) of every device activity."""
    by_kind: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for name, t0, t1 in kernels:
        us = (t1 - t0) / 1e3
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + us
        entry = by_name.setdefault(name[:120], [0.0, 0])
        entry[0] += us
        entry[1] += 1
    busy_ns, gaps_ns, end, longest = 0, [], None, []
    first = min((k[1] for k in kernels), default=0)
    for _, t0, t1 in sorted(kernels, key=lambda k: k[1]):
        if end is None or t0 > end:
            if end is not None:
                gaps_ns.append(t0 - end)
                longest.append((t0 - end, end - first))
            busy_ns += t1 - t0
            end = t1
        elif t1 > end:
            busy_ns += t1 - end
            end = t1
    span_ns = (end - first) if end is not None else 0
    edges = (0, *GAP_EDGES_US, float("inf"))
    gaps = []
    for lo, hi in zip(edges, edges[1:]):
        sel = [g / 1e3 for g in gaps_ns if lo <= g / 1e3 < hi]
        gaps.append(
            {
                "from_us": lo,
                "to_us": None if hi == float("inf") else hi,
                "count": len(sel),
                "total_s": round(sum(sel) / 1e6, 6),
            }
        )
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:30]
    return {
        "wall_s": round(wall_s, 4),
        "kernels": len(kernels),
        "first_to_last_kernel_s": round(span_ns / 1e9, 6),
        "busy_s": round(busy_ns / 1e9, 6),
        "idle_s": round((span_ns - busy_ns) / 1e9, 6),
        "idle_gaps": gaps,
        "longest_gaps": [
            {"at_s": round(at / 1e9, 4), "ms": round(g / 1e6, 3)} for g, at in sorted(longest)[-10:][::-1]
        ],
        "kernel_s_by_kind": {k: round(v / 1e6, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n, "s": round(v[0] / 1e6, 4), "calls": int(v[1])} for n, v in top],
    }


@contextmanager
def device_timeline(path: str, device: torch.device) -> Iterator[None]:
    """Record every kernel the device runs inside the block, and the host's garbage-collector passes; write
    ``summarize``'s JSON, with the passes under ``gc_pauses``, to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    pauses = GcPauses()
    gc.callbacks.append(pauses)
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            yield
            torch.cuda.synchronize(device)
            wall = time.perf_counter() - start
    finally:
        gc.callbacks.remove(pauses)
    kernels = [
        (e.name(), e.start_ns(), e.start_ns() + e.duration_ns())
        for e in prof.profiler.kineto_results.events()
        if e.device_type() == torch.autograd.DeviceType.CUDA
    ]
    with open(path, "w") as f:
        json.dump({**summarize(kernels, wall), "gc_pauses": pauses.summary()}, f, indent=1)
