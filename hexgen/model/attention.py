"""Attention over a paged KV cache: the pure-PyTorch reference path (CPU and GPU).

The cache of one layer is two tensors [num_slots, n_kv, head_dim]; slot = block * block_size + offset.
A step's tokens are flattened across sequences ("ragged"); ``AttnMeta`` says where each sequence's
queries sit and which cache slots hold its context.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttnMeta:
    """Per-step attention layout, built once per step and shared by every layer."""

    slot_mapping: torch.Tensor  # [tokens] long: where each new token's K/V is written
    q_starts: list[int]  # per sequence: offset of its first query token in the step
    q_lens: list[int]
    ctx_lens: list[int]  # per sequence: cached tokens after this step (including this step's)
    ctx_slots: list[torch.Tensor]  # per sequence: [ctx_len] slots of its whole context
    decode_slots: torch.Tensor | None = None  # [batch, max_ctx] slots, padded (all q_lens == 1)
    decode_mask: torch.Tensor | None = None  # [batch, 1, 1, max_ctx] bool: key is valid


def build_meta(positions: list[int], q_lens: list[int], ctx_lens: list[int], block_tables: list[list[int]],
               block_size: int, device: torch.device) -> AttnMeta:
    """Derive slot indices from block tables. ``positions`` are the step's flattened token positions."""
    q_starts, start = [], 0
    for n in q_lens:
        q_starts.append(start)
        start += n
    offsets = torch.arange(block_size)
    ctx_cpu = []
    for table, n in zip(block_tables, ctx_lens):
        blocks = torch.tensor(table, dtype=torch.long)
        ctx_cpu.append((blocks[:, None] * block_size + offsets[None, :]).reshape(-1)[:n])  # [ctx_len]
    slot_cpu = torch.empty(len(positions), dtype=torch.long)
    for b, (qs, ql, cl) in enumerate(zip(q_starts, q_lens, ctx_lens)):
        slot_cpu[qs:qs + ql] = ctx_cpu[b][cl - ql:cl]
    meta = AttnMeta(slot_cpu.to(device), q_starts, list(q_lens), list(ctx_lens), [])
    if q_lens and all(n == 1 for n in q_lens):
        max_ctx = max(ctx_lens)
        padded = torch.zeros(len(q_lens), max_ctx, dtype=torch.long)  # [batch, max_ctx]
        mask = torch.zeros(len(q_lens), max_ctx, dtype=torch.bool)
        for b, s in enumerate(ctx_cpu):
            padded[b, :s.numel()] = s
            mask[b, :s.numel()] = True
        meta.decode_slots = padded.to(device)
        meta.decode_mask = mask[:, None, None, :].to(device)
    else:
        meta.ctx_slots = [s.to(device) for s in ctx_cpu]
    return meta


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttnMeta, scale: float) -> torch.Tensor:
    """q: [tokens, n_q, d]; k, v: [tokens, n_kv, d]; caches [slots, n_kv, d]. Returns [tokens, n_q, d]."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    if meta.decode_slots is not None:
        return _decode(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    for qs, ql, cl, slots in zip(meta.q_starts, meta.q_lens, meta.ctx_lens, meta.ctx_slots):
        qb = q[qs:qs + ql].transpose(0, 1)[None]  # [1, n_q, q_len, d]
        kb = k_cache[slots].transpose(0, 1)[None]  # [1, n_kv, ctx_len, d]
        vb = v_cache[slots].transpose(0, 1)[None]
        if ql == cl:
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
        else:
            qpos = torch.arange(cl - ql, cl, device=q.device)[:, None]  # [q_len, 1]
            mask = torch.arange(cl, device=q.device)[None, :] <= qpos  # [q_len, ctx_len]
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=True)
        out[qs:qs + ql] = o[0].transpose(0, 1)
    return out


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMeta,
            scale: float) -> torch.Tensor:
    """Batched single-token decode over padded contexts."""
    kb = k_cache[meta.decode_slots].transpose(1, 2)  # [batch, n_kv, max_ctx, d]
    vb = v_cache[meta.decode_slots].transpose(1, 2)
    qb = q[:, :, None, :]  # [batch, n_q, 1, d]
    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True)
    return o[:, :, 0, :]  # [batch, n_q, d]


def decode_meta(block_tables: torch.Tensor, ctx_lens: torch.Tensor, block_size: int) -> AttnMeta:
    """Decode layout (every sequence one new token) computed on the device from tensors, with no host work
    and fixed shapes: safe to capture in a CUDA graph. Produces the same fields ``_decode`` reads.

    block_tables: [batch, n_blocks] long, each row a sequence's blocks padded with any valid block;
    ctx_lens: [batch] long ≥ 1, cached tokens after this step. The context width is n_blocks * block_size.
    """
    width = block_tables.shape[1] * block_size
    j = torch.arange(width, device=block_tables.device)  # [width]
    slots = block_tables[:, j // block_size] * block_size + j % block_size  # [batch, width]
    mask = j[None, :] < ctx_lens[:, None]  # [batch, width]
    slot_mapping = slots.gather(1, (ctx_lens - 1)[:, None])[:, 0]  # [batch]
    return AttnMeta(slot_mapping, [], [], [], [], decode_slots=slots, decode_mask=mask[:, None, None, :])
