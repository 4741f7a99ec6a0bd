"""A decode step as two nano-batches on two CUDA streams, so one half's attention runs beside the other
half's projections (``KernelConfig.overlap``).

Decode attention reads the K/V of every row's context and is bound by memory bandwidth; the projections and
the MLP are GEMMs bound by the tensor cores. Run one after another, each leaves the other's resource idle.
``forward`` splits the step's rows in two halves, A on the current stream and B on a side stream, and orders
their attentions in turn, A's attention of layer i, then B's, then A's of layer i + 1::

    A: pre_i  [attn_i]  post_i pre_i+1  ...  [attn_i+1]
    B:  pre_i  ......  [attn_i]  post_i pre_i+1 .......

so while one half reads its K/V the other runs its output projection, MLP and next QKV projection. Nothing
else is shared between the halves: each has its own rows, metadata and residual stream; the K/V cache is
written at disjoint slots (padding rows of both write the scratch block, whose contents nobody reads).
Inside a CUDA graph capture the two streams become two branches of the graph with edges at the attentions.

Off CUDA (the tests on CPU) the same split and phase order run on the one stream, sequentially.
Only stages of TP 1 take it: the row-parallel layers' all-reduces would otherwise be issued from two
streams, in an order other ranks need not share.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import cast

import torch

from hexgen.model.attention import AttnMeta
from hexgen.model.llama import DecoderLayer, LlamaStage

MIN_ROWS = 128  # decode steps of fewer rows run as one batch: halves this small leave the GEMMs underfilled


@dataclass
class NanoBatch:
    """One half of a decode step: x [rows] token ids (first stage) or [rows, hidden]; cos, sin [rows, d];
    its own attention metadata."""

    x: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    meta: AttnMeta


def split_rows(n: int) -> int:
    """Rows of the first half of an n-row step (n ≥ 16): half, rounded to a multiple of 8 (whole GEMM row
    tiles)."""
    return max(8, (n // 2 + 4) // 8 * 8)


class _Lanes:
    """The two halves' streams and the events that order their attentions; plain sequencing off CUDA."""

    def __init__(self, device: torch.device, side: torch.cuda.Stream | None) -> None:
        self.streams: list[torch.cuda.Stream] = []
        self.cuda = device.type == "cuda" and side is not None
        if device.type == "cuda" and side is not None:
            self.streams = [torch.cuda.current_stream(device), side]
            self.done = [torch.cuda.Event(), torch.cuda.Event()]  # each half's latest attention

    def on(self, h: int) -> AbstractContextManager[object]:
        return torch.cuda.stream(self.streams[h]) if self.cuda else nullcontext()

    def fork(self) -> None:
        if self.cuda:
            self.streams[1].wait_stream(self.streams[0])

    def join(self) -> None:
        if self.cuda:
            self.streams[0].wait_stream(self.streams[1])

    def after_other(self, h: int) -> None:
        """Half h's next kernel waits for the other half's latest attention (call on h's stream)."""
        if self.cuda:
            self.streams[h].wait_event(self.done[1 - h])

    def attended(self, h: int) -> None:
        if self.cuda:
            self.done[h].record(self.streams[h])


def forward(
    stage: LlamaStage,
    halves: tuple[NanoBatch, NanoBatch],
    kv_cache: torch.Tensor,
    kv_scales: torch.Tensor | None,
    side: torch.cuda.Stream | None,
) -> torch.Tensor:
    """The stage's hidden states [rows A + rows B, hidden] for the two halves, in their order: what
    ``stage.forward`` returns for the whole step. kv_cache, kv_scales as ``LlamaStage.forward`` takes them;
    side: the second stream (None off CUDA)."""
    lanes = _Lanes(kv_cache.device, side)
    lanes.fork()
    xs: list[torch.Tensor] = []
    res: list[torch.Tensor | None] = [None, None]
    for h, nb in enumerate(halves):
        with lanes.on(h):
            xs.append(nb.x if stage.embed is None else stage.embed(nb.x))  # [rows, hidden]
    for i, module in enumerate(stage.layers):
        layer = cast(DecoderLayer, module)
        scales = None if kv_scales is None else kv_scales[i]
        kc, vc = kv_cache[i, 0], kv_cache[i, 1]
        for h, nb in enumerate(halves):
            with lanes.on(h):
                qkv, r = layer.pre(xs[h], res[h], nb.cos, nb.sin, kc, vc, nb.meta, scales)
                if h == 1 or i > 0:  # A's attention of layer i after B's of layer i - 1; B's after A's of i
                    lanes.after_other(h)
                o = layer.attn.attend(qkv, kc, vc, nb.meta, scales)  # [rows, n_q, d]
                lanes.attended(h)
                xs[h], res[h] = layer.post(o, r)
    outs = []
    for h in range(2):
        with lanes.on(h):
            last = res[h]
            outs.append(xs[h] if last is None else xs[h] + last)  # [rows, hidden]
    lanes.join()
    return torch.cat(outs)  # [rows, hidden]


def halves_of(
    x: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    meta_of: Callable[[torch.Tensor, torch.Tensor], AttnMeta],
    rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[NanoBatch, NanoBatch]:
    """A decode step's inputs (x [batch] or [batch, hidden], block_tables [batch, n_blocks], ctx_lens
    [batch]) as two nano-batches; meta_of(tables, ctx) and rotary(positions) build each half's metadata and
    cos/sin."""
    a = split_rows(x.shape[0])

    def half(rows: slice) -> NanoBatch:
        tables, ctx = block_tables[rows], ctx_lens[rows]
        cos, sin = rotary(ctx - 1)
        return NanoBatch(x[rows], cos, sin, meta_of(tables, ctx))

    return half(slice(0, a)), half(slice(a, x.shape[0]))
