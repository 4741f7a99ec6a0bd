"""The Triton paged decode kernel (hexgen/kernels/paged_decode.py) and the decode/prefill split of a step
(hexgen/model/attention.py) against plain attention over each sequence's gathered context.

Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets
before anything imports triton); with CUDA the same tests run the compiled kernels, and the ``gpu`` tests
add Llama shapes, CUDA-graph capture and the engine with the kernels on and off. Kernel tests skip when
triton is missing; ``test_kernels_compile_for_hopper`` runs Triton's real compiler for sm_90 on any machine.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest.py set it already, before triton was imported

from hexgen.kernels import paged_decode  # noqa: E402
from hexgen.model import attention  # noqa: E402


def _kernel_skip_reason() -> str | None:
    if not paged_decode.triton_importable():
        return "triton is not installed (pip install 'hexgen[gpu]' or triton)"
    if HAS_CUDA:
        return None
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.zeros, InterpretedFunction):
        return "no CUDA, and triton was imported before TRITON_INTERPRET=1 was set (run with TRITON_INTERPRET=1)"
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9):
        # older interpreters turn a loop bound into an int with int(1-element array), which numpy 2.4 refuses
        return f"no CUDA, and triton {triton.__version__}'s interpreter fails on dynamic loop bounds; need >= 3.9"
    return None


_SKIP = _kernel_skip_reason()
requires_triton = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
KERNEL_DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
ATOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _cache(n_blocks: int, bs: int, n_kv: int, d: int, dtype: torch.dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n_blocks * bs, n_kv, d, generator=g).to(dtype).to(device)  # [slots, n_kv, d]
    v = torch.randn(n_blocks * bs, n_kv, d, generator=g).to(dtype).to(device)
    return k, v


def _tables(ctx_lens: list[int], bs: int, n_blocks: int, rng: random.Random, extra: int = 1) -> list[list[int]]:
    """Non-contiguous, shuffled block tables; each row has up to ``extra`` spare blocks at the end."""
    free = list(range(n_blocks))
    rng.shuffle(free)
    return [[free.pop() for _ in range(-(-c // bs) + rng.randint(0, extra))] for c in ctx_lens]


def _padded(tables: list[list[int]], width: int | None = None, pad: int = 0) -> torch.Tensor:
    width = width or max(map(len, tables))
    return torch.tensor([t + [pad] * (width - len(t)) for t in tables], dtype=torch.long)  # [batch, width]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_offset: int) -> torch.Tensor:
    """Plain causal attention in float32. q: [q_len, n_q, d]; k, v: [ctx, n_kv, d] → [q_len, n_q, d]."""
    g = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(g, 1).transpose(0, 1)  # [n_q, ctx, d]
    v = v.float().repeat_interleave(g, 1).transpose(0, 1)
    s = q.float().transpose(0, 1) @ k.transpose(1, 2) * scale  # [n_q, q_len, ctx]
    qpos = torch.arange(q.shape[0], device=q.device)[:, None] + q_offset
    s = s.masked_fill(torch.arange(k.shape[1], device=q.device)[None, :] > qpos, float("-inf"))
    return (s.softmax(-1) @ v).transpose(0, 1)  # [q_len, n_q, d]


def _context(cache: torch.Tensor, table: list[int], n: int, bs: int) -> torch.Tensor:
    pos = torch.arange(n)
    slots = torch.tensor(table)[pos // bs] * bs + pos % bs
    return cache[slots.to(cache.device)]  # [n, n_kv, d]


# ------------------------------------------------------------------------------------------------ kernel


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_matches_reference(dtype, group, head_dim):
    bs, n_kv, n_blocks = 4, 2, 40
    rng = random.Random(group * head_dim)
    ctx = [1, bs, bs + 1, 2 * bs, 37]  # one token, block boundaries, a ragged tail
    tables = _tables(ctx, bs, n_blocks, rng)
    kc, vc = _cache(n_blocks, bs, n_kv, head_dim, dtype, KERNEL_DEVICE, seed=group)
    q = torch.randn(len(ctx), n_kv * group, head_dim).to(dtype).to(KERNEL_DEVICE)  # [batch, n_q, d]
    scale = head_dim ** -0.5
    want = torch.stack([_attend(q[b:b + 1], _context(kc, t, c, bs), _context(vc, t, c, bs), scale, c - 1)[0]
                        for b, (t, c) in enumerate(zip(tables, ctx))])
    tab = _padded(tables, pad=n_blocks - 1).to(KERNEL_DEVICE)
    lens = torch.tensor(ctx, dtype=torch.int32, device=KERNEL_DEVICE)
    for splits, head_major in ((1, False), (3, False), (1, True), (3, True)):
        got = paged_decode.paged_decode(q, kc, vc, tab, lens, scale, bs, splits=splits, block_n=16,
                                        head_major=head_major)
        assert got.dtype == dtype and got.shape == q.shape
        err = (got.float() - want).abs().max().item()
        assert err < ATOL[dtype], f"splits={splits}, head_major={head_major}: max error {err}"


@requires_triton
def test_kernel_int32_tables_and_default_tiles():
    """int32 tables and lengths, the default tile size, a table wider than any context."""
    bs, n_kv, group, d, n_blocks = 16, 1, 4, 64, 12
    rng = random.Random(1)
    ctx = [16, 17, 70]
    tables = _tables(ctx, bs, n_blocks, rng, extra=0)
    kc, vc = _cache(n_blocks, bs, n_kv, d, torch.float32, KERNEL_DEVICE)
    q = torch.randn(len(ctx), n_kv * group, d, device=KERNEL_DEVICE)
    tab = _padded(tables, width=8).to(torch.int32).to(KERNEL_DEVICE)
    got = paged_decode.paged_decode(q, kc, vc, tab, torch.tensor(ctx, dtype=torch.int32, device=KERNEL_DEVICE),
                                    0.125, bs)
    for b, (t, c) in enumerate(zip(tables, ctx)):
        want = _attend(q[b:b + 1], _context(kc, t, c, bs), _context(vc, t, c, bs), 0.125, c - 1)[0]
        torch.testing.assert_close(got[b], want, atol=1e-4, rtol=1e-4)


@requires_triton
@pytest.mark.parametrize("head_dim", [8, 80])
def test_kernels_pad_odd_head_dims(head_dim):
    """Head dims that are not a power of two ≥ 16 (the tiny test preset has 8) are padded and masked."""
    bs, n_kv, group, n_blocks = 4, 2, 2, 16
    ctx = [5, 13]
    tables = _tables(ctx, bs, n_blocks, random.Random(head_dim))
    kc, vc = _cache(n_blocks, bs, n_kv, head_dim, torch.float32, KERNEL_DEVICE)
    q = torch.randn(len(ctx), n_kv * group, head_dim, device=KERNEL_DEVICE)
    got = paged_decode.paged_decode(q, kc, vc, _padded(tables).to(KERNEL_DEVICE),
                                    torch.tensor(ctx, device=KERNEL_DEVICE), 0.3, bs)
    for b, (t, c) in enumerate(zip(tables, ctx)):
        want = _attend(q[b:b + 1], _context(kc, t, c, bs), _context(vc, t, c, bs), 0.3, c - 1)[0]
        torch.testing.assert_close(got[b], want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not paged_decode.triton_importable(), reason="triton is not installed")
def test_kernels_compile_for_hopper():
    """Triton's real compiler (LLVM + ptxas, no GPU needed) accepts the kernels for sm_90: the interpreter
    runs Python and would not catch what only the compiler rejects."""
    root = Path(__file__).resolve().parent.parent
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": path}
    run = subprocess.run([sys.executable, str(root / "scripts" / "compile_kernels.py")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]


def test_kernel_rejects_bad_head_ratio():
    q = torch.zeros(1, 3, 64)
    k = torch.zeros(4, 2, 64)
    with pytest.raises(ValueError, match="multiple of n_kv"):
        paged_decode.paged_decode(q, k, k, torch.zeros(1, 1, dtype=torch.long), torch.ones(1), 1.0, 4)


def test_split_count_is_static():
    assert paged_decode.num_splits(1, 32, 4096, torch.device("cpu")) == 1
    if HAS_CUDA:
        dev = torch.device("cuda")
        assert paged_decode.num_splits(1, 32, 4096, dev) > 1  # batch 1: split the context
        assert paged_decode.num_splits(64, 32, 4096, dev) == 1  # enough programs already
        assert paged_decode.num_splits(1, 32, 256, dev) == 1  # short: nothing to split


def test_kernel_config_turns_the_kernels_off():
    from hexgen.config import KernelConfig
    from hexgen.kernels.choice import resolve

    off = resolve(KernelConfig(decode_kernel=False, prefill_kernel=False), KERNEL_DEVICE)
    assert not off.decode_kernel and not off.prefill_kernel
    on = resolve(KernelConfig(), KERNEL_DEVICE)
    assert on.decode_kernel == on.prefill_kernel == (KERNEL_DEVICE.type == "cuda" and paged_decode.available())
    assert not resolve(KernelConfig(), torch.device("cpu")).decode_kernel  # CPU: the PyTorch path


# ------------------------------------------------------------------------------ the step's two halves


def _step(rng: random.Random, q_lens_ctx: list[tuple[int, int]], bs: int, n_blocks: int):
    q_lens = [ql for ql, _ in q_lens_ctx]
    ctx = [c for _, c in q_lens_ctx]
    tables = _tables(ctx, bs, n_blocks, rng)
    positions = [p for ql, c in q_lens_ctx for p in range(c - ql, c)]
    return positions, q_lens, ctx, tables


def _check_step(q_lens_ctx, kernel: bool, device, dtype=torch.float32, atol=1e-5, seed=0, prefill_kernel=None):
    """Run paged_attention over a step and compare each sequence with plain attention over its context.
    ``prefill_kernel`` defaults to ``kernel``."""
    bs, n_kv, n_q, d, n_blocks = 4, 2, 6, 64, 256
    rng = random.Random(seed)
    positions, q_lens, ctx, tables = _step(rng, q_lens_ctx, bs, n_blocks)
    kc, vc = _cache(n_blocks, bs, n_kv, d, dtype, device, seed)
    t = len(positions)
    q = torch.randn(t, n_q, d).to(dtype).to(device)
    k = torch.randn(t, n_kv, d).to(dtype).to(device)
    v = torch.randn(t, n_kv, d).to(dtype).to(device)
    prefill_kernel = kernel if prefill_kernel is None else prefill_kernel
    meta = attention.build_meta(positions, q_lens, ctx, tables, bs, device, kernel=kernel,
                                prefill_kernel=prefill_kernel)
    assert meta.positions.tolist() == positions
    out = attention.paged_attention(q, k, v, kc, vc, meta, 0.125)
    start = 0
    for ql, c, table in zip(q_lens, ctx, tables):
        kb, vb = _context(kc, table, c, bs), _context(vc, table, c, bs)
        torch.testing.assert_close(kb[c - ql:], k[start:start + ql])  # this step's K was written
        want = _attend(q[start:start + ql], kb, vb, 0.125, c - ql)
        err = (out[start:start + ql].float() - want).abs().max().item()
        assert err < atol, f"q_len {ql}, ctx {c}: max error {err}"
        start += ql
    return meta


MIXED = [(1, 9), (7, 7), (1, 1), (3, 12), (1, 4), (5, 5), (1, 33), (1, 8)]  # decodes, fresh, chunked
LONG_PREFILLS = [(150, 150), (70, 200), (64, 64), (65, 65), (2, 131)]  # several query tiles, tile edges


def test_build_meta_splits_mixed_step():
    meta = _check_step(MIXED, kernel=False, device=torch.device("cpu"))
    assert meta.prefill_batch is None
    assert meta.decode_rows.tolist() == [0, 8, 12, 18, 19]  # token index of each q_len-1 sequence
    assert meta.decode_slots.shape == (5, 33) and meta.decode_mask.shape == (5, 1, 1, 33)
    assert [(p.q_start, p.q_len, p.ctx_len) for p in meta.prefills] == [(1, 7, 7), (9, 3, 12), (13, 5, 5)]
    assert meta.prefills[0].ctx_slots is None and meta.prefills[1].ctx_slots.shape == (12,)


def test_build_meta_all_decode_and_all_prefill():
    meta = _check_step([(1, c) for c in (1, 4, 5, 17)], kernel=False, device=torch.device("cpu"))
    assert meta.decode_rows is None and not meta.prefills
    meta = _check_step([(6, 6), (2, 9)], kernel=False, device=torch.device("cpu"))
    assert not meta.has_decode and len(meta.prefills) == 2


@requires_triton
@pytest.mark.parametrize("steps", [MIXED, [(1, c) for c in (1, 4, 5, 17, 40)]], ids=["mixed", "decode"])
def test_build_meta_kernel_layout(steps):
    meta = _check_step(steps, kernel=True, device=KERNEL_DEVICE, atol=1e-4)
    assert meta.decode_tables is not None and meta.decode_slots is None


@requires_triton
def test_prefill_kernel_mixed_step():
    meta = _check_step(MIXED, kernel=False, prefill_kernel=True, device=KERNEL_DEVICE, atol=1e-4)
    b = meta.prefill_batch
    assert not meta.prefills and meta.decode_slots is not None
    assert b.q_starts.tolist() == [1, 9, 13] and b.q_lens.tolist() == [7, 3, 5] and b.ctx_lens.tolist() == [7, 12, 5]
    assert b.tile_seq.tolist() == [0, 1, 2] and b.tile_m.tolist() == [0, 0, 0]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefill_kernel_long_chunks(dtype):
    meta = _check_step(LONG_PREFILLS + [(1, 40)], kernel=True, device=KERNEL_DEVICE, dtype=dtype,
                       atol=1e-4 if dtype == torch.float32 else ATOL[dtype])
    assert meta.prefill_batch.tile_seq.tolist() == [0, 0, 0, 1, 1, 2, 3, 3, 4]
    assert meta.prefill_batch.tile_m.tolist() == [0, 1, 2, 0, 1, 0, 0, 1, 0]


def test_reference_long_chunks():
    _check_step(LONG_PREFILLS + [(1, 40)], kernel=False, device=torch.device("cpu"), atol=1e-4)


@requires_triton
def test_decode_meta_kernel_layout_matches_gather_layout():
    """The graph path's layout: block tables padded with a scratch block, contexts of 1 for padding rows."""
    bs, n_kv, n_q, d, n_blocks = 4, 2, 4, 64, 30
    ctx = [9, 1, 16, 3]
    tables = _padded(_tables(ctx, bs, n_blocks - 1, random.Random(3)), width=6, pad=n_blocks - 1)
    tables, lens = tables.to(KERNEL_DEVICE), torch.tensor(ctx, device=KERNEL_DEVICE)
    outs = []
    for kernel in (False, True):
        kc, vc = _cache(n_blocks, bs, n_kv, d, torch.float32, KERNEL_DEVICE)
        g = torch.Generator().manual_seed(5)
        q, k, v = (torch.randn(len(ctx), h, d, generator=g).to(KERNEL_DEVICE) for h in (n_q, n_kv, n_kv))
        meta = attention.decode_meta(tables, lens, bs, kernel=kernel)
        assert (meta.decode_tables is not None) == kernel
        outs.append((attention.paged_attention(q, k, v, kc, vc, meta, 0.125), kc))
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=0, rtol=0)  # same cache writes
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@requires_cuda
@requires_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch,n_q,n_kv,max_ctx", [(1, 32, 32, 4096), (64, 32, 32, 1024), (8, 32, 8, 2048),
                                                    (3, 28, 4, 700)])
def test_gpu_kernel_llama_shapes(dtype, batch, n_q, n_kv, max_ctx):
    bs, d = 16, 128
    rng = random.Random(batch)
    ctx = [max_ctx] + [rng.randint(1, max_ctx) for _ in range(batch - 1)]
    n_blocks = sum(-(-c // bs) + 1 for c in ctx) + 1
    tables = _tables(ctx, bs, n_blocks, rng)
    kc, vc = _cache(n_blocks, bs, n_kv, d, dtype, "cuda")
    q = torch.randn(batch, n_q, d, device="cuda").to(dtype)
    tab = _padded(tables, pad=0).cuda()
    lens = torch.tensor(ctx, device="cuda")
    got = paged_decode.paged_decode(q, kc, vc, tab, lens, d ** -0.5, bs)
    for b, (t, c) in enumerate(zip(tables, ctx)):
        want = _attend(q[b:b + 1], _context(kc, t, c, bs), _context(vc, t, c, bs), d ** -0.5, c - 1)[0]
        err = (got[b].float() - want).abs().max().item()
        assert err < ATOL[dtype], f"row {b} (ctx {c}): max error {err}"


@pytest.mark.gpu
@requires_cuda
@requires_triton
def test_gpu_kernel_in_cuda_graph():
    """Captured once, replayed with other lengths and tables: the grid and splits must not depend on them."""
    bs, d, n_q, n_kv, batch, width = 16, 128, 32, 8, 4, 64
    n_blocks = batch * width + 1
    kc, vc = _cache(n_blocks, bs, n_kv, d, torch.bfloat16, "cuda")
    q = torch.randn(batch, n_q, d, device="cuda", dtype=torch.bfloat16)
    tab = torch.full((batch, width), n_blocks - 1, dtype=torch.long, device="cuda")
    lens = torch.ones(batch, dtype=torch.long, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        paged_decode.paged_decode(q, kc, vc, tab, lens, d ** -0.5, bs)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode.paged_decode(q, kc, vc, tab, lens, d ** -0.5, bs)
    rng = random.Random(0)
    for _ in range(3):
        ctx = [rng.randint(1, width * bs) for _ in range(batch)]
        tables = _tables(ctx, bs, n_blocks - 1, rng, extra=0)
        tab.copy_(_padded(tables, width=width, pad=n_blocks - 1))
        lens.copy_(torch.tensor(ctx))
        q.normal_()
        graph.replay()
        want = paged_decode.paged_decode(q, kc, vc, tab, lens, d ** -0.5, bs)
        torch.testing.assert_close(out, want, atol=0, rtol=0)
        for b, (t, c) in enumerate(zip(tables, ctx)):
            ref = _attend(q[b:b + 1], _context(kc, t, c, bs), _context(vc, t, c, bs), d ** -0.5, c - 1)[0]
            assert (out[b].float() - ref).abs().max().item() < ATOL[torch.bfloat16]


@pytest.mark.gpu
@requires_cuda
@requires_triton
@pytest.mark.parametrize("steps", [MIXED, [(1, c) for c in (1, 4, 5, 17, 40)], LONG_PREFILLS + [(1, 300)]],
                         ids=["mixed", "decode", "long"])
def test_gpu_step_kernel_vs_gather(steps):
    for dtype in (torch.bfloat16, torch.float16):
        _check_step(steps, kernel=True, device=torch.device("cuda"), dtype=dtype, atol=ATOL[dtype])
        _check_step(steps, kernel=False, device=torch.device("cuda"), dtype=dtype, atol=ATOL[dtype])


@pytest.mark.gpu
@requires_cuda
@requires_triton
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_engine_kernel_matches_gather_path(graphs, dtype):
    """The whole engine (mixed steps while requests arrive, decode graphs) with the kernels off and on:
    float32 tokens and logits, bfloat16 first-token logits (see compare_for_dtype)."""
    from hexgen.config import EngineConfig, KernelConfig
    from tests.test_gpu_fastpaths import _run, compare_for_dtype

    base = dict(dtype=dtype, device="cuda", block_size=16, collect_logits=True, max_num_seqs=8,
                gpu_memory_fraction=0.3, cuda_graphs=graphs)
    ref = _run(EngineConfig(**base, kernels=KernelConfig(decode_kernel=False, prefill_kernel=False)), n=10,
               new_tokens=20)
    fast = _run(EngineConfig(**base), n=10, new_tokens=20)
    compare_for_dtype(ref, fast, dtype)
