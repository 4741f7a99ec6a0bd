"""Storage order of the linear weights on CPU, chosen per shape by timing batch-1 decode's GEMV.

A linear's weight is ``[N, K]`` (out, in), loaded row-major. For one row of input, BLAS's GEMV speed on CPU
depends on the storage order and the shape: on a 2-core EPYC in fp32, one row of SmolLM2's ``[3072, 576]``
and ``[49152, 576]`` weights runs much faster column-major, while ``[576, 1536]`` runs slower; with several
rows the two orders are close, or column-major is slower (``scripts/profile_cpu.py`` times both).

:func:`tune` times ``F.linear`` on one row with each shape's weights as loaded and column-major: the same
``[N, K]`` tensor over a ``[K, N]`` contiguous storage (``w.t().contiguous().t()``), alternating, over the
layers of that shape. Shapes where column-major takes at most ``MARGIN`` of the row-major time are re-laid.
The values are copied, not changed, and every caller still sees ``[N, K]``: the choice changes only which BLAS
kernel runs, so outputs agree to fp32 rounding. CUDA weights are left alone (the Triton GEMV and cuBLAS read
row-major), and so are weights under ``MIN_BYTES``, which sit in cache. ``KernelConfig.cpu_layout`` off keeps
every weight row-major (the runner then does not call ``tune``).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

MIN_BYTES = 1 << 20  # smaller weights stay row-major: they sit in cache (and the tests' tiny models keep one layout)
MARGIN = 0.9  # column-major must take at most this fraction of the row-major time
TIMED_BYTES = 64 << 20  # time over at least this many bytes of a shape's weights (more than the caches), if it has them
PASSES = 5  # timed passes per layout, alternating; the medians are compared

# (weights, one input row) -> seconds per F.linear over those weights
Timer = Callable[[list[torch.Tensor], torch.Tensor], float]


def column_major(w: torch.Tensor) -> torch.Tensor:
    """The same ``[N, K]`` values over a ``[K, N]`` contiguous storage (strides ``(1, N)``)."""
    return w.detach().t().contiguous().t()


def is_column_major(w: torch.Tensor) -> bool:
    return w.dim() == 2 and w.stride() == (1, w.shape[0])


def time_linear(weights: list[torch.Tensor], x: torch.Tensor) -> float:
    """Seconds per ``F.linear(x, w)``, one pass over ``weights`` (after a warm-up pass)."""
    for w in weights:
        F.linear(x, w)
    t = time.perf_counter()
    for w in weights:
        F.linear(x, w)
    return (time.perf_counter() - t) / len(weights)


def tune(layers: list[nn.Module], timer: Timer = time_linear, min_bytes: int = MIN_BYTES) -> dict[tuple[int, int], str]:
    """Re-lay the ``weight`` of CPU ``layers`` column-major for the shapes where one-row ``F.linear`` is faster
    that way (see the module doc). Returns {(N, K): "column" or "row"} for the shapes timed."""
    by_shape: dict[tuple[int, int], list[nn.Module]] = defaultdict(list)
    for layer in layers:
        w = layer.weight
        if w.device.type == "cpu" and w.dim() == 2 and w.numel() * w.element_size() >= min_bytes:
            by_shape[tuple(w.shape)].append(layer)
    chosen: dict[tuple[int, int], str] = {}
    for (n, k), group in by_shape.items():
        w0 = group[0].weight
        count = max(1, min(len(group), -(-TIMED_BYTES // (w0.numel() * w0.element_size()))))
        rows = [m.weight.detach() for m in group[:count]]
        cols = [column_major(w) for w in rows]
        x = torch.randn(1, k, dtype=w0.dtype)
        row_t, col_t = [], []
        with torch.no_grad():
            for _ in range(PASSES):
                row_t.append(timer(rows, x))
                col_t.append(timer(cols, x))
        del cols
        row_s, col_s = statistics.median(row_t), statistics.median(col_t)
        layout = "column" if col_s <= MARGIN * row_s else "row"
        chosen[(n, k)] = layout
        log.info(
            "cpu layout [%d, %d] x%d: %s-major (one row: row-major %.1f µs, column-major %.1f µs)",
            n,
            k,
            len(group),
            layout,
            row_s * 1e6,
            col_s * 1e6,
        )
        if layout == "column":
            for m in group:
                m.weight = nn.Parameter(column_major(m.weight), requires_grad=False)
    return chosen
