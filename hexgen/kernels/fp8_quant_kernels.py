"""Triton kernels of ``hexgen.kernels.fp8_linear.quantize_tokens`` (imported lazily from there), one program
per row: rows of up to ``ONCE_MAX`` values are read once and held (``quantize_rows_once``, which can also apply
the MLP's SiLU * up on the way in); longer rows are read twice, once for the absolute maximum and once to
write them as e4m3 over that scale (``quantize_rows``)."""

from __future__ import annotations

import triton
import triton.language as tl

ONCE_MAX = 16384  # the longest row ``quantize_rows_once`` holds (16 warps: 32 fp32 values a thread)


@triton.jit
def quantize_rows(X, Q, S, K, stride_x, stride_q, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """S[row] = max(max_k |X[row, k]| / FP8_MAX, MIN_SCALE); Q[row, k] = clamp(X[row, k] / S[row]) as e4m3."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    amax = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)  # [BLOCK]
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.maximum(tl.max(amax, 0) / FP8_MAX, MIN_SCALE)
    tl.store(S + row, s)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / s, -FP8_MAX), FP8_MAX)
        tl.store(Q + row * stride_q + cols, q.to(Q.dtype.element_ty), mask=cols < K)


@triton.jit
def quantize_rows_once(
    X,
    Q,
    S,
    K,
    stride_x,
    stride_q,
    FP8_MAX: tl.constexpr,
    MIN_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
    SILU: tl.constexpr,
):
    """``quantize_rows`` for rows that fit one BLOCK (K ≤ BLOCK): the row is read once and held. With SILU, X
    is the MLP's gate | up [M, 2K] and the row quantized is silu(gate) * up, rounded as ``fused.silu_mul``
    rounds it (the SiLU and the product each to X's dtype), so it equals quantizing that kernel's output."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < K
    x_row = X + row * stride_x
    g = tl.load(x_row + cols, mask=ok, other=0.0)  # [BLOCK]
    if SILU:
        u = tl.load(x_row + K + cols, mask=ok, other=0.0)
        gf = g.to(tl.float32)
        s_g = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
        x = (s_g * u.to(tl.float32)).to(g.dtype).to(tl.float32)
    else:
        x = g.to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), 0) / FP8_MAX, MIN_SCALE)
    tl.store(S + row, s)
    q = tl.minimum(tl.maximum(x / s, -FP8_MAX), FP8_MAX)
    tl.store(Q + row * stride_q + cols, q.to(Q.dtype.element_ty), mask=ok)
