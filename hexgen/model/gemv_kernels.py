"""Triton kernel of ``hexgen.model.gemv`` (imported lazily from there)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gemv(X, W, Y, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y[0, n] = sum_k X[0, k] * W[n, k] for BLOCK_N rows n per program."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = rows < N
    w_rows = W + rows.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        c_ok = cols < K
        x = tl.load(X + cols, mask=c_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
        w = tl.load(w_rows + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        acc += w.to(tl.float32) * x[None, :]
    tl.store(Y + rows, tl.sum(acc, 1).to(Y.dtype.element_ty), mask=r_ok)


@triton.jit
def gemv_silu(GU, W, Y, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y[0, n] = sum_k x[k] * W[n, k] with x = silu(GU[0, k]) * GU[0, K + k], each product rounded to the
    input dtype as ``fused.silu_mul`` rounds it, so the sum equals ``gemv`` of silu_mul's output."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = rows < N
    w_rows = W + rows.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        c_ok = cols < K
        g = tl.load(GU + cols, mask=c_ok, other=0.0)  # [BLOCK_K]
        u = tl.load(GU + K + cols, mask=c_ok, other=0.0)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
        x = (s * u.to(tl.float32)).to(g.dtype).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        acc += w.to(tl.float32) * x[None, :]
    tl.store(Y + rows, tl.sum(acc, 1).to(Y.dtype.element_ty), mask=r_ok)
