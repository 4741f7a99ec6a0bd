"""Attention over a paged KV cache.

The cache of one layer is two tensors [num_slots, n_kv, head_dim]; slot = block * block_size + offset.
A step's tokens are flattened across sequences ("ragged"); ``AttnMeta`` says where each sequence's
queries sit and which cache slots hold its context.

A step is split in two: every sequence with one query token (a decode row) is attended in one batched call
— the Triton paged kernel (``hexgen.kernels.paged_decode``) on CUDA, else the PyTorch reference that gathers
the padded context (with 16 rows or more, one call per group of rows of similar context, ``decode_groups``,
so short contexts do not gather the longest one's padding). The prefill sequences (several query tokens)
take one call of the Triton prefill kernel on CUDA, else a loop of SDPA calls, one per sequence.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from hexgen.kernels import kv_quant, paged_decode
from hexgen.kernels.staging import upload


@dataclass
class PrefillSeq:
    """One sequence of a step with several query tokens."""

    q_start: int  # offset of its first query token in the step
    q_len: int
    ctx_len: int  # cached tokens after this step (including this step's)
    ctx_slots: torch.Tensor | None  # [ctx_len] slots of its context; None when ctx_len == q_len


@dataclass
class PrefillBatch:
    """Every prefill sequence of a step, for one call of the Triton prefill kernel."""

    tables: torch.Tensor  # [n_pre, max_blocks] long, rows padded with block 0
    q_starts: torch.Tensor  # [n_pre] long: first query token in the step
    q_lens: torch.Tensor  # [n_pre] long
    ctx_lens: torch.Tensor  # [n_pre] long: cached tokens after this step
    tile_seq: torch.Tensor  # [n_tiles] long: prefill sequence of each PREFILL_BLOCK_M-token query tile
    tile_m: torch.Tensor  # [n_tiles] long: the tile's index within its sequence


@dataclass
class AttnMeta:
    """Per-step attention layout, built once per step and shared by every layer.

    Decode rows are described either by block tables + lengths (kernel path) or by padded slots + a mask
    (reference path); exactly one of the two pairs is set when the step has decode rows. Prefill sequences
    are either one ``prefill_batch`` (kernel path) or a list looped over (reference path).
    """

    slot_mapping: torch.Tensor  # [tokens] long: where each new token's K/V is written
    positions: torch.Tensor | None = None  # [tokens] long (build_meta only)
    decode_rows: torch.Tensor | None = None  # [n_dec] token index of each decode row; None: every token is one
    decode_tables: torch.Tensor | None = None  # [n_dec, max_blocks] long, rows padded with block 0
    decode_ctx: torch.Tensor | None = None  # [n_dec] long: context length of each decode row
    decode_slots: torch.Tensor | None = None  # [n_dec, max_ctx] long slots, padded with slot 0
    decode_mask: torch.Tensor | None = None  # [n_dec, 1, 1, max_ctx] bool: key is valid
    # reference path, larger batches: decode rows in groups of similar context, each (rows [n_g] long, the
    # group's longest context): attended over that width, not max_ctx (see decode_groups)
    decode_groups: list[tuple[torch.Tensor, int]] | None = None
    block_size: int = 0
    prefills: list[PrefillSeq] = field(default_factory=list)
    prefill_batch: PrefillBatch | None = None
    # fp8 caches: this step's writes fix the still-unset scales (``kv_quant.update_scales``). The runner sets
    # it on eager steps until its cache has seen a write; graph-captured steps leave it off.
    calibrate_kv: bool = False

    @property
    def has_decode(self) -> bool:
        return self.decode_tables is not None or self.decode_slots is not None


def use_decode_kernel(device: torch.device) -> bool:
    """Whether the Triton paged kernels can run on ``device`` (the default of ``build_meta`` and
    ``decode_meta`` when the caller's ``KernelConfig`` does not say)."""
    return device.type == "cuda" and paged_decode.available()


GROUP_MIN_ROWS = 8  # the reference decode path groups its rows when each group gets at least this many
GROUP_MAX = 8  # ... into at most this many groups


def decode_groups(ctx: np.ndarray) -> list[np.ndarray] | None:
    """Decode rows (indices into ``ctx``, each row's context length) in groups of similar context, shortest
    first, for the reference path: each group gathers and attends its own longest context instead of the
    batch's, so a mixed batch moves less padding (a 64-row decode step of SmolLM2's shape, contexts 64-400, on
    this project's 2-core CPU machine: 446.5 -> 337.6 ms; scripts/profile_cpu.py).
    None when there are too few rows to group (``build_meta``'s ``group_rows``, ``KernelConfig.decode_groups``,
    turns grouping off)."""
    n = len(ctx)
    groups = min(GROUP_MAX, n // GROUP_MIN_ROWS)
    if groups < 2:
        return None
    order = np.argsort(ctx, kind="stable")
    return [order[i * n // groups : (i + 1) * n // groups] for i in range(groups)]


def _starts(lens: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lens), dtype=np.int64)
    np.cumsum(lens[:-1], out=out[1:])
    return out


@dataclass(frozen=True)
class _Tables:
    """A step's block tables, flattened: slots of (sequence, position) pairs and padded per-sequence tables."""

    flat: np.ndarray  # every table's blocks, one after another
    starts: np.ndarray  # [batch] index of each table's first block in ``flat``
    n_blocks: np.ndarray  # [batch]
    block_size: int

    @classmethod
    def of(cls, block_tables: list[list[int]], block_size: int) -> _Tables:
        n_blocks = np.fromiter(map(len, block_tables), dtype=np.int64, count=len(block_tables))
        flat = np.fromiter(itertools.chain.from_iterable(block_tables), dtype=np.int64, count=int(n_blocks.sum()))
        return cls(flat, _starts(n_blocks), n_blocks, block_size)

    def slots(self, seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
        bs = self.block_size
        return self.flat[self.starts[seq] + pos // bs] * bs + pos % bs

    def padded(self, seqs: np.ndarray, ctx_lens: np.ndarray) -> np.ndarray:
        """[len(seqs) * width] the tables of ``seqs``, padded with block 0 to the longest context's blocks."""
        j = np.arange(int(-(-ctx_lens[seqs].max() // self.block_size)))
        ok = j[None, :] < self.n_blocks[seqs][:, None]
        idx = np.minimum(self.starts[seqs][:, None] + j[None, :], len(self.flat) - 1)
        return np.where(ok, self.flat[idx], 0).reshape(-1)


def _upload_parts(parts: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Every index array on ``device`` in one copy, addressed by the same names.

    Each part starts on a 16-byte boundary (an even number of int64 before it): the Triton kernels then
    always see aligned pointers, and compile one variant instead of one per alignment pattern."""
    sizes = [len(p) for p in parts.values()]
    padded = [n + (n & 1) for n in sizes]
    flat = np.zeros(sum(padded), dtype=np.int64)
    start = 0
    for p, m in zip(parts.values(), padded):
        flat[start : start + len(p)] = p
        start += m
    buf = upload(flat, torch.long, device)
    return {name: v[:n] for name, v, n in zip(parts, buf.split(padded), sizes)}


def _decode_parts(
    parts: dict[str, np.ndarray],
    tables: _Tables,
    dec: np.ndarray,
    all_decode: bool,
    q_starts: np.ndarray,
    cl: np.ndarray,
    kernel: bool,
    group_rows: bool,
) -> list[np.ndarray] | None:
    """The decode rows' index arrays (into ``parts``); returns their context groups (reference path)."""
    if not all_decode:
        parts["decode_rows"] = q_starts[dec]
    dec_ctx = cl[dec]
    if kernel:
        parts["decode_index"] = tables.padded(dec, cl)  # [n_dec * max_blocks] block tables
        parts["decode_ctx"] = dec_ctx
        return None
    j = np.arange(int(dec_ctx.max()))  # [max_ctx] positions
    ok = j[None, :] < dec_ctx[:, None]
    seq = np.broadcast_to(dec[:, None], ok.shape)
    parts["decode_index"] = np.where(ok, tables.slots(seq, np.where(ok, j[None, :], 0)), 0).reshape(-1)  # slots
    parts["decode_ctx"] = dec_ctx
    groups = decode_groups(dec_ctx) if group_rows else None
    if groups is not None:
        parts["decode_groups"] = np.concatenate(groups)
    return groups


def _prefill_parts(
    parts: dict[str, np.ndarray],
    tables: _Tables,
    pre: np.ndarray,
    chunked: np.ndarray,
    q_starts: np.ndarray,
    ql: np.ndarray,
    cl: np.ndarray,
    prefill_kernel: bool,
) -> None:
    """The prefill sequences' index arrays (into ``parts``)."""
    if len(pre) and prefill_kernel:
        n_tiles = -(-ql[pre] // paged_decode.PREFILL_BLOCK_M)
        tile_seq = np.repeat(np.arange(len(pre)), n_tiles)
        parts.update(
            prefill_tables=tables.padded(pre, cl),
            prefill_q_starts=q_starts[pre],
            prefill_q_lens=ql[pre],
            prefill_ctx=cl[pre],
            prefill_tile_seq=tile_seq,
            prefill_tile_m=np.arange(len(tile_seq)) - np.repeat(_starts(n_tiles), n_tiles),
        )
    if len(chunked):
        lens = cl[chunked]
        seq = np.repeat(chunked, lens)
        parts["chunked_slots"] = tables.slots(seq, np.arange(int(lens.sum())) - np.repeat(_starts(lens), lens))


def _set_decode(
    meta: AttnMeta,
    t: dict[str, torch.Tensor],
    n_dec: int,
    dec_ctx: np.ndarray,
    groups: list[np.ndarray] | None,
    kernel: bool,
    device: torch.device,
) -> None:
    meta.decode_rows = t.get("decode_rows")
    table_or_slots, ctx = t["decode_index"].view(n_dec, -1), t["decode_ctx"]
    if kernel:
        meta.decode_tables, meta.decode_ctx = table_or_slots, ctx
        return
    width = table_or_slots.shape[1]
    meta.decode_slots = table_or_slots
    meta.decode_mask = (torch.arange(width, device=device)[None, :] < ctx[:, None])[:, None, None, :]
    if groups is not None:
        rows = t["decode_groups"].split([len(g) for g in groups])
        meta.decode_groups = [(r, int(dec_ctx[g].max())) for r, g in zip(rows, groups)]


def build_meta(
    positions: list[int],
    q_lens: list[int],
    ctx_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
    kernel: bool | None = None,
    prefill_kernel: bool | None = None,
    group_rows: bool = True,
) -> AttnMeta:
    """Derive slot indices from block tables. ``positions`` are the step's flattened token positions.

    Host work is vectorized (numpy) and every index tensor reaches the device in one copy. ``kernel`` and
    ``prefill_kernel`` pick the layouts of decode rows and of prefill sequences (default:
    ``use_decode_kernel(device)``); ``group_rows`` lets the reference decode path group its rows
    (``decode_groups``).
    """
    if kernel is None:
        kernel = use_decode_kernel(device)
    if prefill_kernel is None:
        prefill_kernel = use_decode_kernel(device)
    ql = np.asarray(q_lens, dtype=np.int64)  # [batch]
    cl = np.asarray(ctx_lens, dtype=np.int64)
    n_seq, n_tok = len(ql), len(positions)
    q_starts = _starts(ql)
    tables = _Tables.of(block_tables, block_size)

    tok_seq = np.repeat(np.arange(n_seq), ql)  # [tokens]
    tok_pos = np.arange(n_tok) - q_starts[tok_seq] + (cl - ql)[tok_seq]
    parts = {"slots": tables.slots(tok_seq, tok_pos), "positions": np.asarray(positions, dtype=np.int64)}
    dec = np.flatnonzero(ql == 1)
    all_decode = len(dec) == n_seq
    groups = _decode_parts(parts, tables, dec, all_decode, q_starts, cl, kernel, group_rows) if len(dec) else None
    pre = np.flatnonzero(ql != 1)
    chunked = pre[ql[pre] < cl[pre]] if not prefill_kernel else pre[:0]  # continuing a cached context
    _prefill_parts(parts, tables, pre, chunked, q_starts, ql, cl, prefill_kernel)

    t = _upload_parts(parts, device)
    meta = AttnMeta(t["slots"], t["positions"], block_size=block_size)
    if len(dec):
        _set_decode(meta, t, len(dec), cl[dec], groups, kernel, device)
    if len(pre) and prefill_kernel:
        meta.prefill_batch = PrefillBatch(
            t["prefill_tables"].view(len(pre), -1),
            t["prefill_q_starts"],
            t["prefill_q_lens"],
            t["prefill_ctx"],
            t["prefill_tile_seq"],
            t["prefill_tile_m"],
        )
        return meta
    ctx_slots = iter(t["chunked_slots"].split(cl[chunked].tolist())) if len(chunked) else iter(())
    for s in pre.tolist():
        slots = next(ctx_slots) if ql[s] < cl[s] else None
        meta.prefills.append(PrefillSeq(int(q_starts[s]), int(ql[s]), int(cl[s]), slots))
    return meta


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttnMeta,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [tokens, n_q, d]; k, v: [tokens, n_kv, d]; caches [slots, n_kv, d]. Returns [tokens, n_q, d].

    k and v None: the caller wrote them to the cache already (``fused.rotary_kv_write``); then every
    prefill must take the Triton prefill kernel, which reads its context from the cache. An fp8 cache
    (``hexgen.kernels.kv_quant``) comes with its scales, k_scale and v_scale [n_kv]: writes quantize, and every
    read, the new tokens' own K/V included, sees the values as the cache holds them."""
    fp8 = kv_quant.is_fp8(k_cache)
    if k is not None:
        kv_quant.write(k_cache, meta.slot_mapping, k, k_scale)
        kv_quant.write(v_cache, meta.slot_mapping, v, v_scale)
    if meta.has_decode and meta.decode_rows is None:
        return _decode_batch(q, k_cache, v_cache, meta, scale, k_scale, v_scale)
    out = torch.empty_like(q)
    if meta.has_decode:
        rows = meta.decode_rows
        out.index_copy_(
            0, rows, _decode_batch(q.index_select(0, rows), k_cache, v_cache, meta, scale, k_scale, v_scale)
        )
    if meta.prefill_batch is not None:
        b = meta.prefill_batch
        paged_decode.paged_prefill(
            q,
            k_cache,
            v_cache,
            out,
            b.tables,
            b.q_starts,
            b.q_lens,
            b.ctx_lens,
            b.tile_seq,
            b.tile_m,
            scale,
            meta.block_size,
            k_scale,
            v_scale,
        )
    if meta.prefills and fp8:  # what the cache holds, as the kernels read it
        k, v = kv_quant.round_trip(k, k_scale), kv_quant.round_trip(v, v_scale)
    for p in meta.prefills:
        qs, ql, cl = p.q_start, p.q_len, p.ctx_len
        qb = q[qs : qs + ql].transpose(0, 1)[None]  # [1, n_q, q_len, d]
        if p.ctx_slots is None:  # the whole context is this step's: read it from k, v, not the cache
            kb = k[qs : qs + ql].transpose(0, 1)[None]  # [1, n_kv, ctx_len, d]
            vb = v[qs : qs + ql].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
        else:
            kb = _read(k_cache, p.ctx_slots, k_scale, q.dtype).transpose(0, 1)[None]  # [1, n_kv, ctx_len, d]
            vb = _read(v_cache, p.ctx_slots, v_scale, q.dtype).transpose(0, 1)[None]
            qpos = torch.arange(cl - ql, cl, device=q.device)[:, None]  # [q_len, 1]
            mask = torch.arange(cl, device=q.device)[None, :] <= qpos  # [q_len, ctx_len]
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=True)
        out[qs : qs + ql] = o[0].transpose(0, 1)
    return out


def _read(cache: torch.Tensor, slots: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """cache[slots] in ``dtype`` (slots of any shape; result [*slots.shape, n_kv, d]), dequantized when fp8."""
    x = cache[slots]
    return kv_quant.dequantize(x, scale, dtype) if kv_quant.is_fp8(cache) else x


def _decode_batch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttnMeta,
    scale: float,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> torch.Tensor:
    """q: [n_dec, n_q, d], one query token per decode row. Returns [n_dec, n_q, d]."""
    if meta.decode_tables is not None:
        return paged_decode.paged_decode(
            q,
            k_cache,
            v_cache,
            meta.decode_tables,
            meta.decode_ctx,
            scale,
            meta.block_size,
            k_scale=k_scale,
            v_scale=v_scale,
        )
    return _decode(q, k_cache, v_cache, meta, scale, k_scale, v_scale)


def _decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttnMeta,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: batched single-token decode over padded contexts gathered from the cache; with
    ``decode_groups``, one call per group of rows over the group's own width."""
    scales = (k_scale, v_scale)
    if not meta.decode_groups:
        return _decode_padded(q, k_cache, v_cache, meta.decode_slots, meta.decode_mask, scale, *scales)
    out = torch.empty_like(q)
    for rows, width in meta.decode_groups:
        slots = meta.decode_slots[:, :width].index_select(0, rows)  # [n_g, width]
        mask = meta.decode_mask[..., :width].index_select(0, rows)  # [n_g, 1, 1, width]
        out.index_copy_(0, rows, _decode_padded(q.index_select(0, rows), k_cache, v_cache, slots, mask, scale, *scales))
    return out


def _decode_padded(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [batch, n_q, d]; slots [batch, width] (padded), mask [batch, 1, 1, width]. Returns [batch, n_q, d]."""
    kb = _read(k_cache, slots, k_scale, q.dtype).transpose(1, 2)  # [batch, n_kv, width, d]
    vb = _read(v_cache, slots, v_scale, q.dtype).transpose(1, 2)
    qb = q[:, :, None, :]  # [batch, n_q, 1, d]
    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[:, :, 0, :]  # [batch, n_q, d]


def decode_meta(
    block_tables: torch.Tensor, ctx_lens: torch.Tensor, block_size: int, kernel: bool | None = None
) -> AttnMeta:
    """Decode layout (every sequence one new token) computed on the device from tensors, with no host work
    and fixed shapes: safe to capture in a CUDA graph.

    block_tables: [batch, n_blocks] long, each row a sequence's blocks padded with any valid block;
    ctx_lens: [batch] long ≥ 1, cached tokens after this step. With the kernel (``kernel``, default
    ``use_decode_kernel``) the tables go to it as they are; otherwise the padded slots and mask of the
    reference path are derived, with context width n_blocks * block_size.
    """
    if kernel is None:
        kernel = use_decode_kernel(block_tables.device)
    last = ctx_lens - 1
    slot_mapping = block_tables.gather(1, (last // block_size)[:, None])[:, 0] * block_size + last % block_size
    if kernel:
        return AttnMeta(slot_mapping, decode_tables=block_tables, decode_ctx=ctx_lens, block_size=block_size)
    width = block_tables.shape[1] * block_size
    j = torch.arange(width, device=block_tables.device)  # [width]
    slots = block_tables[:, j // block_size] * block_size + j % block_size  # [batch, width]
    mask = j[None, :] < ctx_lens[:, None]  # [batch, width]
    return AttnMeta(slot_mapping, decode_slots=slots, decode_mask=mask[:, None, None, :], block_size=block_size)
