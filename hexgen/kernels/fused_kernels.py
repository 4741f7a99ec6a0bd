"""Triton kernels of the fused elementwise ops (``hexgen.kernels.fused``), imported lazily from there.

Each kernel rounds where the PyTorch reference rounds (to the activation dtype after every op the reference
runs in that dtype), so the fused and reference paths agree to the reduction order. With ``PDL``
(``hexgen.kernels.pdl``) each waits for the kernel before it before it reads an activation or writes.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def add_rms_norm(
    X,
    Res,
    W,
    Out,
    ResOut,
    eps,
    n_cols,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program per row: h = x + res (rounded), out = w * (h * rsqrt(mean(h²) + eps)) (rounded twice,
    as ``RMSNorm`` does); h goes to ResOut when HAS_RES."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)  # the norm's weight: no kernel writes it
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RES:
        x = x.to(tl.float32) + tl.load(Res + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        x = x.to(Out.dtype.element_ty)
        tl.store(ResOut + row * stride_ro + cols, x, mask=ok)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / n_cols + eps)
    n = (h * rstd).to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (w * n).to(Out.dtype.element_ty), mask=ok)


@triton.jit
def rotary_kv_write(
    QKV,
    Cos,
    Sin,
    Slots,
    QOut,
    KCache,
    VCache,
    KScale,
    VScale,
    stride_t,
    stride_c,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    N_Q: tl.constexpr,
    N_KV: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    FP8: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program per (token, head of q or k): rotate-half rotary on the head; q heads go to QOut, k heads
    (and the v head of the same index) to the cache slot of the token. FP8: k and v are stored as
    e4m3(clamp(x / scale, ±448)), the scale of their KV head (``hexgen.kernels.kv_quant.quantize``)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK_H)
    ok = offs < HALF
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    base = QKV + t * stride_t + h * (2 * HALF)  # q heads, then k heads, in one row
    x1 = tl.load(base + offs, mask=ok, other=0.0)
    x2 = tl.load(base + HALF + offs, mask=ok, other=0.0)
    dt = x1.dtype
    c1 = tl.load(Cos + t * stride_c + offs, mask=ok, other=0.0)
    c2 = tl.load(Cos + t * stride_c + HALF + offs, mask=ok, other=0.0)
    s1 = tl.load(Sin + t * stride_c + offs, mask=ok, other=0.0)
    s2 = tl.load(Sin + t * stride_c + HALF + offs, mask=ok, other=0.0)
    # reference: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), each product rounded
    a1 = (x1.to(tl.float32) * c1.to(tl.float32)).to(dt).to(tl.float32)
    b1 = (-x2.to(tl.float32) * s1.to(tl.float32)).to(dt).to(tl.float32)
    a2 = (x2.to(tl.float32) * c2.to(tl.float32)).to(dt).to(tl.float32)
    b2 = (x1.to(tl.float32) * s2.to(tl.float32)).to(dt).to(tl.float32)
    o1 = (a1 + b1).to(dt)
    o2 = (a2 + b2).to(dt)
    if h < N_Q:
        q = QOut + t * stride_qt + h * stride_qh
        tl.store(q + offs, o1, mask=ok)
        tl.store(q + HALF + offs, o2, mask=ok)
    else:
        kvh = h - N_Q
        slot = tl.load(Slots + t).to(tl.int64)
        k = KCache + slot * stride_ks + kvh * stride_kh
        vsrc = QKV + t * stride_t + (N_Q + N_KV + kvh) * (2 * HALF)
        v = VCache + slot * stride_vs + kvh * stride_vh
        v1 = tl.load(vsrc + offs, mask=ok, other=0.0)
        v2 = tl.load(vsrc + HALF + offs, mask=ok, other=0.0)
        if FP8:  # a runtime branch may not change a variable's type: new names
            ks = tl.load(KScale + kvh)
            vs = tl.load(VScale + kvh)
            ks = tl.where(ks > 0, ks, 1.0)  # unset: nothing non-zero written yet
            vs = tl.where(vs > 0, vs, 1.0)
            tl.store(k + offs, _fp8(o1, ks, KCache.dtype.element_ty), mask=ok)
            tl.store(k + HALF + offs, _fp8(o2, ks, KCache.dtype.element_ty), mask=ok)
            tl.store(v + offs, _fp8(v1, vs, VCache.dtype.element_ty), mask=ok)
            tl.store(v + HALF + offs, _fp8(v2, vs, VCache.dtype.element_ty), mask=ok)
        else:
            tl.store(k + offs, o1, mask=ok)
            tl.store(k + HALF + offs, o2, mask=ok)
            tl.store(v + offs, v1, mask=ok)
            tl.store(v + HALF + offs, v2, mask=ok)


@triton.jit
def _fp8(x, scale, dtype: tl.constexpr):
    """e4m3(clamp(x / scale, ±448)), as ``kv_quant.quantize`` (float32 division, round to nearest even)."""
    y = x.to(tl.float32) / scale
    return tl.minimum(tl.maximum(y, -448.0), 448.0).to(dtype)


@triton.jit
def silu_mul(X, Out, n_cols, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Out[:, j] = silu(X[:, j]) * X[:, n_cols + j], silu rounded first as ``F.silu(g) * u`` does."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    g = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    u = tl.load(X + row * stride_x + n_cols + cols, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (s * u.to(tl.float32)).to(g.dtype), mask=ok)
