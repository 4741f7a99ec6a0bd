"""Triton kernel of ``hexgen.kernels.fp8_linear.quantize_tokens`` (imported lazily from there): one program
per row reads the row twice, once for its absolute maximum and once to write it as e4m3 over that scale."""

from __future__ import annotations

import triton
import triton.language as tl


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
