"""The FP8 (e4m3) KV cache (hexgen/kernels/kv_quant.py): quantization, the reference attention path against
float64 attention, the Triton decode / prefill / rotary-write kernels against the reference (under Triton's
interpreter without CUDA; compiled on a GPU), capacity accounting and preemption with an FP8 cache.

Tolerances. Reading an fp8 cache gives x̂ = e4m3(x / s) * s: for values in e4m3's normal range the error is at
most half a unit in the last of its 3 mantissa bits, |x̂ - x| ≤ 2^-4 |x|. Attention over the cache is then
checked two ways: against float64 attention over x̂ (what the cache holds) to float32 rounding (1e-5), and
against float64 attention over the original x within the bound the quantization errors allow,
max|v̂ - v| + max|v| (exp(2 max|Δs|) - 1), Δs = scale · q·(k̂ - k) the logit errors (computed in float64).
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from hexgen.kernels import fused, kv_quant, paged_decode
from hexgen.model import attention, rope
from tests.test_paged_decode import (
    ATOL,
    HAS_CUDA,
    KERNEL_DEVICE,
    LONG_PREFILLS,
    MIXED,
    _padded,
    _step,
    _tables,
    requires_cuda,
    requires_triton,
)

FP8 = kv_quant.FP8


def _scales(n_kv: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(2, n_kv, generator=g)).div(32).to(device)  # [2, n_kv]: |x| up to 7 or more fit


def _fp8_cache(n_slots: int, n_kv: int, d: int, scales: torch.Tensor, device, seed: int = 0):
    """fp8 caches of random N(0, 1) values (quantized with ``scales``), and what they hold as float64."""
    g = torch.Generator().manual_seed(seed)
    caches, held = [], []
    for i in range(2):
        x = torch.randn(n_slots, n_kv, d, generator=g).to(device)
        c = kv_quant.quantize(x, scales[i])
        caches.append(c)
        held.append(kv_quant.dequantize(c, scales[i], torch.float64))
    return caches, held


def _attend64(q, k, v, scale: float, q_offset: int) -> torch.Tensor:
    """Causal attention in float64. q: [q_len, n_q, d]; k, v: [ctx, n_kv, d] → [q_len, n_q, d]."""
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, 1).transpose(0, 1)  # [n_q, ctx, d]
    v = v.double().repeat_interleave(g, 1).transpose(0, 1)
    s = q.double().transpose(0, 1) @ k.transpose(1, 2) * scale  # [n_q, q_len, ctx]
    qpos = torch.arange(q.shape[0], device=q.device)[:, None] + q_offset
    s = s.masked_fill(torch.arange(k.shape[1], device=q.device)[None, :] > qpos, float("-inf"))
    return (s.softmax(-1) @ v).transpose(0, 1)


def _slots(table: list[int], n: int, bs: int, device) -> torch.Tensor:
    pos = torch.arange(n)
    return (torch.tensor(table)[pos // bs] * bs + pos % bs).to(device)


# --------------------------------------------------------------------------------------- quantization


def test_round_trip_error_is_half_an_ulp_and_saturates():
    scale = torch.tensor([0.01, 1.0])
    x = torch.randn(1000, 2, 16) * scale[None, :, None] * 50
    back = kv_quant.round_trip(x, scale)
    normal = x.abs() >= scale[None, :, None] * 2.0 ** -6  # e4m3's smallest normal, times the scale
    assert ((back - x).abs() <= x.abs() * 2.0 ** -4 + 1e-12)[normal].all()
    big = torch.tensor([[[1e4, -1e4]]])
    assert kv_quant.round_trip(big, torch.tensor([1.0])).tolist() == [[[448.0, -448.0]]]


def test_scales_are_set_once_from_the_first_nonzero_write_and_ignore_rotary():
    from hexgen.model.rope import apply_rotary

    k_scale, v_scale = torch.zeros(2), torch.zeros(2)
    kv_quant.update_scales(k_scale, v_scale, torch.zeros(3, 2, 8), torch.zeros(3, 2, 8))
    assert k_scale.tolist() == [0.0, 0.0]  # a graph capture's zeros leave them unset
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    kv_quant.update_scales(k_scale, v_scale, k, v)
    want_v = v.abs().amax(dim=(0, 2)) * kv_quant.HEADROOM / kv_quant.FP8_MAX
    torch.testing.assert_close(v_scale, want_v)
    angle = torch.rand(5, 1, 4) * 6.3
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    _, k_rot = apply_rotary(torch.zeros(5, 2, 8), k, cos, sin)
    k2, v2 = torch.zeros(2), torch.zeros(2)
    kv_quant.update_scales(k2, v2, k_rot, v)
    torch.testing.assert_close(k2, k_scale)  # the same scale before and after rotary
    assert (k_rot.abs().amax(dim=(0, 2)) <= k_scale * kv_quant.FP8_MAX / kv_quant.HEADROOM * (1 + 1e-6)).all()
    before = k_scale.clone()
    kv_quant.update_scales(k_scale, v_scale, 100 * k, 100 * v)
    assert torch.equal(k_scale, before)  # fixed for the cache's life


def test_write_quantizes_into_the_slots():
    scale = torch.tensor([0.02, 0.05])
    cache = torch.zeros(10, 2, 4, dtype=FP8)
    x = torch.randn(3, 2, 4)
    kv_quant.write(cache, torch.tensor([7, 2, 4]), x, scale)
    torch.testing.assert_close(kv_quant.dequantize(cache[[7, 2, 4]], scale, torch.float32),
                               kv_quant.round_trip(x, scale))
    assert cache[[0, 1, 3]].float().abs().sum() == 0


# ---------------------------------------------------------------------------- reference vs float64


def _run_step(q_lens_ctx, kernel: bool, prefill_kernel: bool, device, dtype=torch.float32, seed=0):
    """One step over fp8 caches: returns (out, q, k, v, held caches as float64, tables, q_lens, ctx, scales)."""
    bs, n_kv, n_q, d, n_blocks = 4, 2, 6, 64, 256
    rng = random.Random(seed)
    positions, q_lens, ctx, tables = _step(rng, q_lens_ctx, bs, n_blocks)
    scales = _scales(n_kv, device, seed)
    (kc, vc), _ = _fp8_cache(n_blocks * bs, n_kv, d, scales, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    t = len(positions)
    q, k, v = (torch.randn(t, h, d, generator=g).to(dtype).to(device) for h in (n_q, n_kv, n_kv))
    meta = attention.build_meta(positions, q_lens, ctx, tables, bs, device, kernel=kernel,
                                prefill_kernel=prefill_kernel)
    out = attention.paged_attention(q, k, v, kc, vc, meta, 0.125, scales[0], scales[1])
    held = [kv_quant.dequantize(c, s, torch.float64) for c, s in zip((kc, vc), scales)]
    return out, q, k, v, held, tables, q_lens, ctx, scales, bs


@pytest.mark.parametrize("steps", [MIXED, LONG_PREFILLS + [(1, 40)], [(1, c) for c in (1, 4, 5, 17, 40)]],
                         ids=["mixed", "long", "decode"])
def test_reference_fp8_matches_float64_attention(steps):
    cpu = torch.device("cpu")
    out, q, k, v, held, tables, q_lens, ctx, scales, bs = _run_step(steps, False, False, cpu)
    start = 0
    for ql, c, table in zip(q_lens, ctx, tables):
        slots = _slots(table, c, bs, cpu)
        kh, vh = held[0][slots], held[1][slots]  # [c, n_kv, d] what the cache holds
        torch.testing.assert_close(kh[c - ql:], kv_quant.round_trip(k[start:start + ql], scales[0]).double())
        rows = out[start:start + ql].double()
        assert (rows - _attend64(q[start:start + ql], kh, vh, 0.125, c - ql)).abs().max() < 1e-5
        # against the unquantized values: within what the quantization errors allow (module docstring)
        k_true, v_true = kh.clone(), vh.clone()
        k_true[c - ql:], v_true[c - ql:] = k[start:start + ql].double(), v[start:start + ql].double()
        g = q.shape[1] // k.shape[1]
        ds = 0.125 * torch.einsum("qhd,chd->hqc", q[start:start + ql].double(),
                                  (kh - k_true).repeat_interleave(g, 1))
        bound = (vh - v_true).abs().max() + v_true.abs().max() * math.expm1(2 * ds.abs().max().item())
        exact = _attend64(q[start:start + ql], k_true, v_true, 0.125, c - ql)
        err = (rows - exact).abs().max()
        assert err <= bound, f"q_len {ql}, ctx {c}: error {err} above the bound {bound}"
        assert err > 0  # the cache really quantized
        start += ql


def test_unset_scales_act_as_one():
    x = torch.randn(4, 2, 8)
    torch.testing.assert_close(kv_quant.round_trip(x, torch.zeros(2)), x.to(FP8).float())


# ------------------------------------------------------------------------------- kernels vs reference


def _error_vs_float64(run) -> float:
    """Max error of a step's output against float64 attention over what the fp8 cache holds."""
    out, q, k, v, held, tables, q_lens, ctx, scales, bs = run
    err, start = 0.0, 0
    for ql, c, table in zip(q_lens, ctx, tables):
        s = _slots(table, c, bs, out.device)
        want = _attend64(q[start:start + ql], held[0][s], held[1][s], 0.125, c - ql)
        err = max(err, (out[start:start + ql].double() - want).abs().max().item())
        start += ql
    return err


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("steps", [MIXED, LONG_PREFILLS + [(1, 40)], [(1, c) for c in (1, 4, 5, 17, 40)]],
                         ids=["mixed", "long", "decode"])
def test_kernels_match_the_reference_on_an_fp8_cache(dtype, steps):
    """The decode and prefill kernels, alone and together, against the reference path and against float64
    attention over the cache's values. bf16: the reference rounds dequantized K/V to bf16, the kernels
    apply the scales in float32 after the dot, so both are held to bf16's tolerance against float64."""
    ref = _run_step(steps, False, False, KERNEL_DEVICE, dtype)
    tol = 1e-4 if dtype == torch.float32 else ATOL[dtype]
    assert _error_vs_float64(ref) < tol
    for kernel, prefill_kernel in ((True, False), (False, True), (True, True)):
        run = _run_step(steps, kernel, prefill_kernel, KERNEL_DEVICE, dtype)
        assert _error_vs_float64(run) < tol, (kernel, prefill_kernel)
        err = (run[0].float() - ref[0].float()).abs().max().item()
        assert err < 2 * tol, (kernel, prefill_kernel, err)


@requires_triton
def test_decode_kernel_splits_on_an_fp8_cache():
    bs, n_kv, group, d, n_blocks = 4, 2, 4, 64, 40
    ctx = [1, 9, 37]
    tables = _tables(ctx, bs, n_blocks, random.Random(2))
    scales = _scales(n_kv, KERNEL_DEVICE, 2)
    (kc, vc), held = _fp8_cache(n_blocks * bs, n_kv, d, scales, KERNEL_DEVICE, 2)
    q = torch.randn(len(ctx), n_kv * group, d, device=KERNEL_DEVICE)
    tab, lens = _padded(tables).to(KERNEL_DEVICE), torch.tensor(ctx, device=KERNEL_DEVICE)
    for splits in (1, 3):
        got = paged_decode.paged_decode(q, kc, vc, tab, lens, 0.125, bs, splits=splits, block_n=16,
                                        k_scale=scales[0], v_scale=scales[1])
        for b, (t, c) in enumerate(zip(tables, ctx)):
            s = _slots(t, c, bs, KERNEL_DEVICE)
            want = _attend64(q[b:b + 1], held[0][s], held[1][s], 0.125, c - 1)[0]
            assert (got[b].double() - want).abs().max() < 1e-5, splits


def test_kernels_refuse_an_fp8_cache_without_scales():
    q = torch.zeros(1, 4, 64)
    k = torch.zeros(8, 2, 64, dtype=FP8)
    with pytest.raises(ValueError, match="fp8 cache needs float32 k_scale and v_scale"):
        paged_decode.paged_decode(q, k, k, torch.zeros(1, 2, dtype=torch.long), torch.ones(1), 1.0, 4)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary_kv_write_fp8_matches_the_reference(dtype):
    t, n_q, n_kv, d = 5, 4, 2, 64
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(t, (n_q + 2 * n_kv) * d, generator=g).to(dtype).to(KERNEL_DEVICE)
    angle = torch.rand(t, 1, d // 2, generator=g) * 6.3
    cos = torch.cat([angle.cos()] * 2, -1).to(dtype).to(KERNEL_DEVICE)
    sin = torch.cat([angle.sin()] * 2, -1).to(dtype).to(KERNEL_DEVICE)
    slots = torch.tensor([9, 3, 4, 11, 0], device=KERNEL_DEVICE)
    scales = _scales(n_kv, KERNEL_DEVICE)
    caches = [torch.zeros(16, n_kv, d, dtype=FP8, device=KERNEL_DEVICE) for _ in range(4)]
    got = fused.rotary_kv_write(qkv, cos, sin, slots, caches[0], caches[1], n_q, n_kv, scales[0], scales[1])
    want = rope.rotary_kv_write_ref(qkv, cos, sin, slots, caches[2], caches[3], n_q, n_kv, scales[0], scales[1])
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)  # the interpreter's bf16 rounding is not RNE (test_fused.py)
    for a, b, scale in ((0, 2, scales[0]), (1, 3, scales[1])):
        # Within one e4m3 step of torch's quantization (the kernel's float32 division may round apart). Under
        # Triton's interpreter also: its float32 -> e4m3 conversion rounds ties up, and a value that rounds up
        # to a power of two loses the carry into the exponent (31.99 becomes 16, not 32).
        # bf16: plus the rotated k's own tolerance (interpreter rounding, cancellation in x*cos - y*sin).
        got8 = kv_quant.dequantize(caches[a], scale, torch.float64)
        want8 = kv_quant.dequantize(caches[b], scale, torch.float64)
        ok = (got8 - want8).abs() <= 2.0 ** -3 * want8.abs() + tol["atol"]
        if not HAS_CUDA:
            raw_got, raw_want = caches[a].double(), caches[b].double()
            ok |= (raw_want.abs().log2().frac() == 0) & (raw_got == raw_want / 2)
        assert ok.all()
        assert (got8 == want8).double().mean() > (0.99 if HAS_CUDA else 0.8)


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@requires_cuda
@requires_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch,n_q,n_kv,max_ctx", [(1, 32, 32, 4096), (64, 32, 8, 1024), (3, 28, 4, 700)])
def test_gpu_fp8_decode_kernel_llama_shapes(dtype, batch, n_q, n_kv, max_ctx):
    bs, d = 16, 128
    rng = random.Random(batch)
    ctx = [max_ctx] + [rng.randint(1, max_ctx) for _ in range(batch - 1)]
    n_blocks = sum(-(-c // bs) + 1 for c in ctx) + 1
    tables = _tables(ctx, bs, n_blocks, rng)
    scales = _scales(n_kv, "cuda")
    (kc, vc), held = _fp8_cache(n_blocks * bs, n_kv, d, scales, "cuda")
    q = torch.randn(batch, n_q, d, device="cuda").to(dtype)
    got = paged_decode.paged_decode(q, kc, vc, _padded(tables).cuda(), torch.tensor(ctx, device="cuda"),
                                    d ** -0.5, bs, k_scale=scales[0], v_scale=scales[1])
    for b, (t, c) in enumerate(zip(tables, ctx)):
        s = _slots(t, c, bs, "cuda")
        want = _attend64(q[b:b + 1], held[0][s], held[1][s], d ** -0.5, c - 1)[0]
        err = (got[b].double() - want).abs().max().item()
        assert err < ATOL[dtype], f"row {b} (ctx {c}): max error {err}"


@pytest.mark.gpu
@requires_cuda
@requires_triton
@pytest.mark.parametrize("steps", [MIXED, LONG_PREFILLS + [(1, 300)]], ids=["mixed", "long"])
def test_gpu_fp8_step_kernels_vs_reference(steps):
    for dtype in (torch.bfloat16, torch.float16):
        want = _run_step(steps, False, False, torch.device("cuda"), dtype)[0]
        got = _run_step(steps, True, True, torch.device("cuda"), dtype)[0]
        assert (got.float() - want.float()).abs().max().item() < ATOL[dtype]
