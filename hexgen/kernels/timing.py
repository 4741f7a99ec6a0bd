"""Timing GPU work the way the engine runs it: captured in a CUDA graph and replayed.

Eager launches of small kernels are host-bound (a Triton launch from Python takes tens of microseconds), so
a kernel that reads a 32 MB matrix in 9 µs would time at the launch cost; the engine replays its decode
steps from graphs, where launches cost about a microsecond.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hexgen.kernels import pdl


def replay_time(fn: Callable[[], object], warmup: int = 2, reps: int = 50) -> float:
    """Seconds per call of ``fn`` captured once in a CUDA graph and replayed ``reps`` times back to back on the
    current stream, timed with events (for profiles and benchmarks; eager launches of small work are
    host-bound, while the engine replays its decode graphs). Kernels launch as in the engine's graphs (PDL)."""
    with pdl.for_graphs():
        graph = _capture(fn, warmup)
    graph.replay()
    return graph_time(graph, reps)


def graph_time(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    """Seconds per replay of a captured ``graph``, ``reps`` replays back to back, timed with events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def _capture(fn: Callable[[], object], warmup: int) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: CUDA calls of other threads (NCCL's watchdog, gloo) must not invalidate the capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    return graph
