"""CUDA graphs of decode steps: one graph per (batch bucket, context-width bucket), captured at start-up
(``capture_all``, paged-kernel path) or on first use (gather fallback).

A decode step (every sequence of the plan adds one token) runs on static buffers: input ids or hidden
states, block tables padded to the width bucket, and context lengths. Everything else (write slots,
positions, and for the gather fallback the padded slots and mask) is derived on the device inside the graph
(``attention.decode_meta``), so a replay needs one small host-to-device copy and no host-side tensor
building; with the Triton paged kernel the tables go to attention as they are. Padding rows point at a
scratch KV block that no sequence owns. Without CUDA (tests on CPU) the same static, padded path runs
eagerly, uncaptured.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import numpy as np
import torch

from hexgen.config import KernelConfig
from hexgen.engine.plan import StepPlan
from hexgen.kernels import pdl
from hexgen.kernels.choice import resolve

log = logging.getLogger(__name__)

# forward(x [batch] ids or [batch, hidden], block_tables [batch, n_blocks], ctx_lens [batch])
#   -> (hidden [batch, hidden], optional further per-row outputs such as logits [batch, vocab])
DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a captured decode graph: a step of n rows replays the smallest bucket ≥ n, padding rows
    computing for nothing. Above 128 rows the buckets are 32 apart up to 256, 64 up to 512, then 128, so padding
    stays under a quarter of a step's rows (at 129 rows); scripts/sim_decode_buckets.py counts the padding rows
    on a workload. Each graph keeps its outputs (``graph_output_bytes``)."""
    out = [b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128) if b < max_batch]
    b = 160
    while b < max_batch:
        out.append(b)
        b += 32 if b < 256 else 64 if b < 512 else 128
    return out + [max_batch]


def graph_output_bytes(max_batch: int, hidden_size: int, elem: int, vocab: int, with_logits: bool) -> int:
    """Bytes the captured graphs keep for their outputs, all buckets together: hidden [b, hidden] and, with the
    LM head, float32 logits [b, vocab] per bucket b (each graph holds its own; the KV budget reserves them)."""
    per_row = hidden_size * elem + (vocab * 4 if with_logits else 0)
    return sum(batch_buckets(max_batch)) * per_row


def width_buckets(max_blocks: int, smallest: int = 16) -> list[int]:
    """Context widths in blocks: powers of two from ``smallest``, ending at ``max_blocks``."""
    out, w = [], smallest
    while w < max_blocks:
        out.append(w)
        w *= 2
    return out + [max_blocks]


def bucket_of(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket ≥ n (None: n is past the last)."""
    for b in buckets:
        if n <= b:
            return b
    return None


class DecodeGraphs:
    """Captured decode steps for one stage; ``run`` returns None for plans it does not cover."""

    def __init__(
        self,
        fn: DecodeFn,
        first_stage: bool,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int,
        max_batch: int,
        max_len: int,
        scratch_block: int,
        kernels: KernelConfig | None = None,
    ) -> None:
        self.fn = fn
        self.kernels = resolve(kernels or KernelConfig(), device)  # the stage's: which decode path ``fn`` takes
        self.first_stage = first_stage
        self.device = device
        self.block_size = block_size
        self.scratch = scratch_block
        self.capture = device.type == "cuda"
        max_blocks = -(-max_len // block_size)
        self.batches = batch_buckets(max_batch)
        # The paged kernel reads only each sequence's live context, so one width (all blocks) serves every
        # step; the gather fallback reads the whole width, so it gets width buckets.
        self.widths = (
            [max_blocks]
            if self.kernels.decode_kernel
            else width_buckets(max_blocks, smallest=max(1, min(max_blocks, 256 // block_size)))
        )
        mb = self.batches[-1]
        self.ids = torch.zeros(mb, dtype=torch.long, device=device)  # [batch]
        self.hidden = None if first_stage else torch.zeros(mb, hidden_size, dtype=dtype, device=device)
        self.tables = torch.full((mb, self.widths[-1]), scratch_block, dtype=torch.long, device=device)
        self.ctx = torch.ones(mb, dtype=torch.long, device=device)  # [batch]
        # host staging: [ctx (mb) | tables (mb * max_width)], pinned so the copy is asynchronous
        self._stage = torch.empty(mb * (1 + self.widths[-1]), dtype=torch.long, pin_memory=self.capture)
        self._copied = torch.cuda.Event() if self.capture else None
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}

    def covers(self, plan: StepPlan) -> bool:
        return (
            bool(plan.q_lens)
            and all(n == 1 for n in plan.q_lens)
            and len(plan.q_lens) <= self.batches[-1]
            and max(len(t) for t in plan.block_tables) <= self.widths[-1]
        )

    def _inputs(self, b: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.ids[:b] if self.first_stage else self.hidden[:b]
        return x, self.tables[:b, :w], self.ctx[:b]

    def _capture(self, b: int, w: int) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]:
        with pdl.for_graphs(self.kernels.pdl):  # warm-up too, so that it compiles the kernels the capture launches
            return self._capture_pdl(b, w)

    def _capture_pdl(self, b: int, w: int) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]:
        x, tables, ctx = self._inputs(b, w)
        tables.fill_(self.scratch)  # warm-up and capture touch only the scratch block
        ctx.fill_(1)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.fn(x, tables, ctx)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (NCCL's watchdog, gloo) must not invalidate the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self.fn(x, tables, ctx)
        log.info("captured decode graph: batch %d, context %d tokens", b, w * self.block_size)
        return graph, out

    def capture_all(self) -> None:
        """Capture every batch bucket now (start-up) when one width serves every step (the paged kernel), so
        no serving step pays for a capture (seconds at 70B sizes). Largest first: the smaller graphs then
        reuse the shared pool. With width buckets (the gather fallback) graphs stay captured on first use."""
        if not self.capture or len(self.widths) != 1:
            return
        w = self.widths[0]
        for b in reversed(self.batches):
            if (b, w) not in self.graphs:
                self.graphs[(b, w)] = self._capture(b, w)

    def run(self, plan: StepPlan, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The step function's outputs for the plan's rows (hidden [batch, hidden] first; the others valid
        until the next ``run``), or None when no bucket covers the plan."""
        if not self.covers(plan):
            return None
        n = len(plan.q_lens)
        b = bucket_of(n, self.batches)
        lens = np.fromiter(map(len, plan.block_tables), dtype=np.int64, count=n)
        live = int(lens.max())  # blocks the longest row holds
        w = bucket_of(live, self.widths)
        key = (b, w)
        if self.capture and key not in self.graphs:
            self.graphs[key] = self._capture(b, w)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left the staging buffer
        # Only the live columns [:live] are staged and copied: a row reads no block past its context, so the
        # columns beyond keep whatever valid block ids earlier steps left there (with the paged kernel the
        # graph's width is the whole max_len, thousands of blocks, and staging all of it cost milliseconds a
        # step). Padding rows need only their first block to be the scratch block (their one write goes there).
        stage = self._stage.numpy()
        ctx = stage[:b]
        ctx[:] = 1
        ctx[:n] = plan.ctx_lens
        tables = stage[b : b + b * live].reshape(b, live)
        tables[:] = self.scratch
        tables[:n][np.arange(live)[None, :] < lens[:, None]] = np.fromiter(
            itertools.chain.from_iterable(plan.block_tables), dtype=np.int64, count=int(lens.sum())
        )
        xs, tables_d, ctx_d = self._inputs(b, w)
        flat = (
            torch.from_numpy(np.ascontiguousarray(stage[: b + b * live]))
            if not self.capture
            else self._stage[: b + b * live]
        )
        ctx_d.copy_(flat[:b], non_blocking=True)
        tables_d[:, :live].copy_(flat[b:].view(b, live), non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        xs[:n].copy_(x)
        if not self.capture:
            return tuple(o[:n] for o in self.fn(xs, tables_d, ctx_d))
        graph, outs = self.graphs[key]
        graph.replay()
        # The pool is shared: the next replay may overwrite ``outs``. The hidden states may still be in
        # flight to the next stage then, so they are copied; the other outputs (logits) are read before
        # this stage replays again and are returned as views.
        return (outs[0][:n].clone(),) + tuple(o[:n] for o in outs[1:])
