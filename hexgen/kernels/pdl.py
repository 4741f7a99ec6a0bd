"""Programmatic dependent launch (PDL) for the decode path's Triton kernels, on Hopper and later GPUs.

A batch-1 decode step of Llama-2-7B is about 290 kernels back to back in one CUDA graph, and its time is the
weight reads. Between two kernels the GPU drains one grid and ramps up the next, with few reads in flight.
A kernel launched with PDL may start while the kernel before it still runs. It first loads what no kernel
writes (its weights), then waits in ``gdc_wait`` until the earlier grid has finished and its writes are
visible, and only then reads activations or writes anything. Each kernel also calls
``gdc_launch_dependents`` at its start, so that the next kernel can be scheduled once this one's last
programs are resident.

The rule every kernel launched with PDL keeps: before ``gdc_wait``, no load of memory that any kernel
writes and no store. A kernel finishes only after its own wait, so each wait also covers every earlier
kernel, and kernels launched without PDL (cuBLAS, PyTorch ops) wait for the whole grid before them as usual.

``launch(t)`` gives the keyword arguments for a kernel launch on tensors like ``t``: the kernel's ``PDL``
constexpr and Triton's ``launch_pdl`` option. It is on only inside ``for_graphs()`` (the warm-up and capture
of a CUDA graph), for CUDA tensors on compute capability 9.0 and later, when Triton has the grid-dependency
calls, and only when the stage's ``KernelConfig.pdl`` is on (``for_graphs(on)``; off for A/B runs). Eager
launches stay plain: eager steps are large and host-bound, and PDL launches cost them host time (a throughput
run's launch phase grows by about 14%). Triton's interpreter (CPU tests) runs the kernels with ``PDL=False``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from hexgen.kernels.support import triton_importable, triton_interpreting


@functools.cache
def _on(index: int) -> bool:
    """Checked once per device (the launch path is hot in eager steps)."""
    if triton_interpreting():
        return False
    if not triton_importable() or torch.cuda.get_device_capability(index)[0] < 9:
        return False
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return True


def supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` can be launched with PDL."""
    if device.type != "cuda":
        return False
    return _on(device.index if device.index is not None else torch.cuda.current_device())


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels on tensors like ``t`` are launched with PDL inside ``for_graphs()``."""
    return supported(t.device)


_OFF = {"PDL": False}
_ON = {"PDL": True, "launch_pdl": True}
_graph_depth = 0  # > 0 inside for_graphs(); graphs are captured on the engine thread only


@contextlib.contextmanager
def for_graphs(on: bool = True) -> Iterator[None]:
    """Kernels launched inside (a CUDA graph's warm-up and capture) use PDL where ``enabled``; ``on`` False
    (``KernelConfig.pdl`` off): plain launches."""
    global _graph_depth
    step = 1 if on else 0
    _graph_depth += step
    try:
        yield
    finally:
        _graph_depth -= step


def launch(t: torch.Tensor) -> dict:
    """Keyword arguments of a launch of a PDL-aware kernel (one with a ``PDL`` constexpr) on tensors like ``t``."""
    return _ON if _graph_depth and enabled(t) else _OFF
