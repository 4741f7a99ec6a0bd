"""Tests for hexgen.model.attention: slot mapping from block tables, and paged attention (the per-sequence
prefill/chunk path and the batched decode path) against plain causal attention over whole sequences."""
from __future__ import annotations

import math

import numpy as np
import torch

from hexgen.model.attention import GROUP_MAX, GROUP_MIN_ROWS, build_meta, decode_groups, decode_meta, paged_attention

N_Q, N_KV, D = 4, 2, 8
BLOCK = 4
NUM_BLOCKS = 32
SCALE = D ** -0.5


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: list[int]) -> torch.Tensor:
    """Plain causal GQA attention in float64. q [n, N_Q, D] at positions ``q_pos``; k, v [ctx, N_KV, D]
    for positions 0..ctx-1. Query head h reads KV head h // (N_Q // N_KV). Returns [n, N_Q, D]."""
    rep = N_Q // N_KV
    kk = k.double().repeat_interleave(rep, dim=1)  # [ctx, N_Q, D]
    vv = v.double().repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), kk) * SCALE  # [N_Q, n, ctx]
    allowed = torch.arange(k.shape[0])[None, :] <= torch.tensor(q_pos)[:, None]  # [n, ctx]
    scores = scores.masked_fill(~allowed[None], -math.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv).float()  # [n, N_Q, D]


class Paged:
    """A KV cache of one layer plus per-sequence block tables, filled through paged_attention itself."""

    def __init__(self, seed: int = 0, num_blocks: int = NUM_BLOCKS) -> None:
        self.k_cache = torch.zeros(num_blocks * BLOCK, N_KV, D)
        self.v_cache = torch.zeros(num_blocks * BLOCK, N_KV, D)
        self.g = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=self.g).tolist()  # scattered, non-contiguous
        self.tables: dict[str, list[int]] = {}
        self.k: dict[str, torch.Tensor] = {}  # every K of the sequence so far [ctx, N_KV, D]
        self.v: dict[str, torch.Tensor] = {}

    def step(self, chunks: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor, object]:
        """Run one step where sequence ``name`` adds ``n`` tokens; returns (ours, reference, meta)."""
        positions, q_lens, ctx_lens, tables, qs, ks, vs, ref = [], [], [], [], [], [], [], []
        for name, n in chunks.items():
            start = self.k[name].shape[0] if name in self.k else 0
            table = self.tables.setdefault(name, [])
            while len(table) * BLOCK < start + n:
                table.append(self.free.pop())
            q = torch.randn(n, N_Q, D, generator=self.g)
            k = torch.randn(n, N_KV, D, generator=self.g)
            v = torch.randn(n, N_KV, D, generator=self.g)
            self.k[name] = torch.cat([self.k.get(name, k[:0]), k])
            self.v[name] = torch.cat([self.v.get(name, v[:0]), v])
            pos = list(range(start, start + n))
            ref.append(reference(q, self.k[name], self.v[name], pos))
            positions += pos
            q_lens.append(n)
            ctx_lens.append(start + n)
            tables.append(list(table))
            qs.append(q)
            ks.append(k)
            vs.append(v)
        meta = build_meta(positions, q_lens, ctx_lens, tables, BLOCK, torch.device("cpu"), kernel=False)
        out = paged_attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), self.k_cache, self.v_cache, meta,
                              SCALE)
        return out, torch.cat(ref), meta

    def check_cache(self) -> None:
        """Every token's K/V sits at slot table[pos // BLOCK] * BLOCK + pos % BLOCK."""
        for name, table in self.tables.items():
            for pos in range(self.k[name].shape[0]):
                slot = table[pos // BLOCK] * BLOCK + pos % BLOCK
                torch.testing.assert_close(self.k_cache[slot], self.k[name][pos], rtol=0, atol=0)
                torch.testing.assert_close(self.v_cache[slot], self.v[name][pos], rtol=0, atol=0)


def test_build_meta_slots_follow_block_tables():
    meta = build_meta([6, 7, 0, 1, 2], [2, 3], [8, 3], [[5, 2], [9]], BLOCK, torch.device("cpu"), kernel=False)
    # seq 0: positions 6, 7 in its second block (2) -> slots 2*4+2, 2*4+3; seq 1: block 9 -> 36, 37, 38
    assert meta.slot_mapping.tolist() == [10, 11, 36, 37, 38]
    assert not meta.has_decode
    (a, b) = meta.prefills
    assert (a.q_start, a.q_len, a.ctx_len) == (0, 2, 8)
    assert a.ctx_slots.tolist() == [20, 21, 22, 23, 8, 9, 10, 11]  # cached prefix + this chunk
    assert (b.q_start, b.q_len, b.ctx_len) == (2, 3, 3)


def test_build_meta_decode_batch_pads_and_masks():
    meta = build_meta([5, 0], [1, 1], [6, 1], [[3, 7], [1]], BLOCK, torch.device("cpu"), kernel=False)
    assert meta.slot_mapping.tolist() == [29, 4]
    assert meta.decode_rows is None and not meta.prefills  # every token is a decode row
    assert meta.decode_slots.tolist() == [[12, 13, 14, 15, 28, 29], [4, 0, 0, 0, 0, 0]]
    assert meta.decode_mask.shape == (2, 1, 1, 6)
    assert meta.decode_mask[:, 0, 0].tolist() == [[True] * 6, [True] + [False] * 5]


def test_build_meta_kernel_layout_uses_block_tables():
    meta = build_meta([5, 0, 1, 2], [1, 3], [6, 3], [[3, 7], [1]], BLOCK, torch.device("cpu"), kernel=True)
    assert meta.decode_rows.tolist() == [0]
    assert meta.decode_tables.tolist() == [[3, 7]]
    assert meta.decode_ctx.tolist() == [6]
    assert meta.slot_mapping.tolist() == [29, 4, 5, 6]


def test_prefill_of_several_sequences_matches_causal_attention():
    p = Paged()
    out, ref, meta = p.step({"a": 7, "b": 2, "c": 13})
    assert not meta.has_decode and len(meta.prefills) == 3
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    p.check_cache()


def test_chunked_prefill_and_mixed_steps_match_causal_attention():
    """Chunks that continue a cached prefix (q_len < ctx_len: explicit mask), next to decode rows."""
    p = Paged(seed=1)
    p.step({"a": 5, "b": 9})
    out, ref, meta = p.step({"a": 6, "b": 1, "c": 3})  # a: chunk 2 of its prompt; b: a decode; c: new
    assert meta.has_decode and meta.decode_rows is not None and len(meta.prefills) == 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out, ref, _ = p.step({"c": 1, "a": 11, "b": 1})  # a chunk crossing several blocks, decodes around it
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    p.check_cache()


def test_single_token_prompt_is_attended_like_a_decode():
    p = Paged(seed=5)
    out, ref, _ = p.step({"a": 1, "b": 4})
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_batched_decode_matches_causal_attention():
    p = Paged(seed=2)
    p.step({"a": 3, "b": 9, "c": 16})
    for _ in range(6):  # contexts of different lengths, crossing block boundaries
        out, ref, meta = p.step({"a": 1, "b": 1, "c": 1})
        assert meta.has_decode and meta.decode_rows is None and not meta.prefills  # one batched call
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    p.check_cache()


def test_decode_groups_cover_every_row_once_shortest_first():
    assert decode_groups(np.arange(2 * GROUP_MIN_ROWS - 1)) is None  # too few rows for two groups
    ctx = np.random.default_rng(0).integers(1, 400, size=100)
    groups = decode_groups(ctx)
    assert len(groups) == GROUP_MAX and min(map(len, groups)) >= GROUP_MIN_ROWS
    assert sorted(np.concatenate(groups).tolist()) == list(range(100))
    assert all(ctx[a].max() <= ctx[b].min() for a, b in zip(groups, groups[1:]))


def test_grouped_batched_decode_matches_causal_attention():
    """A batch large enough to be grouped by context (reference path): each group attends over its own
    longest context; alone, and beside prefill chunks (decode rows scattered in the step)."""
    p = Paged(seed=6, num_blocks=256)
    lens = {f"s{i}": 1 + (7 * i) % 23 for i in range(24)}  # contexts 1-23, in no order
    p.step(lens)
    for _ in range(3):
        out, ref, meta = p.step({n: 1 for n in lens})
        assert meta.decode_rows is None and len(meta.decode_groups) == 24 // GROUP_MIN_ROWS
        rows = torch.cat([r for r, _ in meta.decode_groups])
        assert sorted(rows.tolist()) == list(range(24))
        ctx = [p.k[n].shape[0] for n in lens]
        assert [w for _, w in meta.decode_groups] == [max(ctx[i] for i in r.tolist()) for r, _ in meta.decode_groups]
        assert meta.decode_groups[0][1] < meta.decode_slots.shape[1]  # the short group reads a narrower width
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out, ref, meta = p.step({"new": 9, **{n: 1 for n in lens}, "s3": 5})
    assert meta.decode_rows is not None and meta.decode_groups is not None and len(meta.prefills) == 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    p.check_cache()


def test_decode_path_ignores_padding_slots():
    """Padded positions point at slot 0, which holds another sequence's keys: the mask must hide them."""
    p = Paged(seed=3)
    p.free.remove(0)
    p.free.append(0)  # sequence "long" gets block 0 first
    p.step({"long": 20, "short": 2})
    assert p.tables["long"][0] == 0
    p.k_cache[:BLOCK] *= 50  # large keys at the padding target would dominate if not masked
    p.k["long"][:BLOCK] *= 50
    out, ref, meta = p.step({"long": 1, "short": 1})
    assert meta.has_decode
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_decode_meta_built_on_device_matches_build_meta():
    """The fixed-shape decode layout (CUDA-graph path) attends exactly like build_meta's."""
    p = Paged(seed=4)
    p.step({"a": 10, "b": 6, "c": 1})
    names = ["a", "b", "c"]
    ctx = [p.k[n].shape[0] + 1 for n in names]
    width = max(len(p.tables[n]) for n in names) + 1
    for n, c in zip(names, ctx):
        while len(p.tables[n]) * BLOCK < c:
            p.tables[n].append(p.free.pop())
    padded = torch.tensor([p.tables[n] + [p.tables[n][0]] * (width - len(p.tables[n])) for n in names])
    q = torch.randn(3, N_Q, D, generator=p.g)
    k = torch.randn(3, N_KV, D, generator=p.g)
    v = torch.randn(3, N_KV, D, generator=p.g)
    caches = (p.k_cache.clone(), p.v_cache.clone())
    meta = decode_meta(padded, torch.tensor(ctx), BLOCK, kernel=False)
    got = paged_attention(q, k, v, *caches, meta, SCALE)
    ref_meta = build_meta([c - 1 for c in ctx], [1, 1, 1], ctx, [p.tables[n] for n in names], BLOCK,
                          torch.device("cpu"), kernel=False)
    torch.testing.assert_close(meta.slot_mapping, ref_meta.slot_mapping)
    want = paged_attention(q, k, v, p.k_cache, p.v_cache, ref_meta, SCALE)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(caches[0], p.k_cache)
    for i, n in enumerate(names):
        full_k = torch.cat([p.k[n], k[i:i + 1]])
        full_v = torch.cat([p.v[n], v[i:i + 1]])
        torch.testing.assert_close(want[i:i + 1], reference(q[i:i + 1], full_k, full_v, [ctx[i] - 1]),
                                   rtol=1e-5, atol=1e-5)
