"""Triton kernel of ``hexgen.kernels.gemv`` (imported lazily from there).

With ``SILU`` the input is the gate | up row of the MLP and the kernel multiplies by silu(gate) * up, computed
per K slice (the down projection without a separate ``silu_mul``). With ``PDL`` (``hexgen.kernels.pdl``) a
program loads its first weight tile, which no kernel writes, before it waits for the kernel before it; the
loop's first iteration is peeled for that. With ``AHEAD`` the loop loads the next tile before it multiplies
the current one (two tiles in flight per thread instead of one). The sums run in the same order in every
variant, so all give the same bits.

With ``FP8_BITS`` the weight is an e4m3 matrix viewed as uint8 and decoded with integer operations instead of
float conversions: byte b becomes the fp32 bit pattern sign << 31 | (b & 0x7F) << 20, whose value is exactly
the e4m3 value times 2^-120 (the 4 exponent bits land in the low bits of fp32's exponent field, the 3 mantissa
bits in the top of its mantissa; e4m3 subnormals become fp32 subnormals, which the fp32 multiply keeps). The
x slice is multiplied by 2^64 and the row sum by 2^56 before the row scale, so every product and partial sum
is the convert variant's times 2^-56 exactly, and the output has the same bits, as long as |x| < 2^64 and the
products and partial sums stay above 2^-70 in magnitude or at zero (activations and e4m3 weights do). The
e4m3fn NaN encodings (0x7F, 0xFF) decode to 480 * 2^-120 (no checkpoint holds them).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _x_slice(X, K, cols, c_ok, SILU: tl.constexpr):
    """x[cols] in fp32: X[0, cols], or with SILU silu(X[0, cols]) * X[0, K + cols], each product rounded to
    the input dtype as ``fused.silu_mul`` rounds it."""
    if SILU:
        g = tl.load(X + cols, mask=c_ok, other=0.0)  # [BLOCK_K]
        u = tl.load(X + K + cols, mask=c_ok, other=0.0)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
        return (s * u.to(tl.float32)).to(g.dtype).to(tl.float32)
    return tl.load(X + cols, mask=c_ok, other=0.0).to(tl.float32)  # [BLOCK_K]


@triton.jit
def _x_for(X, K, cols, c_ok, SILU: tl.constexpr, FP8_BITS: tl.constexpr):
    """``_x_slice``, times 2^64 with ``FP8_BITS`` (exact: a power of two)."""
    x = _x_slice(X, K, cols, c_ok, SILU)  # [BLOCK_K] fp32
    if FP8_BITS:
        x = x * 18446744073709551616.0  # 2^64
    return x


@triton.jit
def _w_f32(w, FP8_BITS: tl.constexpr):
    """A weight tile in fp32: converted, or with ``FP8_BITS`` its e4m3 bytes decoded as value * 2^-120."""
    if FP8_BITS:
        b = w.to(tl.int32)  # [BLOCK_N, BLOCK_K] the int8 bytes sign-extended
        bits = (b << 20) & -0x78100000  # 0x87F00000 as int32: bit 31 the sign, bits 20..26 the rest
        return bits.to(tl.float32, bitcast=True)
    return w.to(tl.float32)


@triton.jit
def gemv(
    X,
    W,
    Y,
    S,
    N,
    K,
    stride_wn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SILU: tl.constexpr,
    AHEAD: tl.constexpr,
    PDL: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    FP8_BITS: tl.constexpr = False,
):
    """Y[0, n] = sum_k x[k] * W[n, k] for BLOCK_N rows n per program, x from ``_x_slice``; with ``HAS_SCALE``
    times S[n] (an fp8 weight's fp32 row scale), applied to the fp32 sum before the one rounding to Y's dtype.
    With ``FP8_BITS`` W is the e4m3 weight viewed as uint8 (see the module docstring)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = rows < N
    w_rows = W + rows.to(tl.int64)[:, None] * stride_wn
    cols = tl.arange(0, BLOCK_K)
    c_ok = cols < K
    w = tl.load(w_rows + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()  # X and Y belong to other kernels: touch them only now
    x = _x_for(X, K, cols, c_ok, SILU, FP8_BITS)  # [BLOCK_K]
    if AHEAD:
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            c_ok = cols < K
            w_next = tl.load(w_rows + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
            x_next = _x_for(X, K, cols, c_ok, SILU, FP8_BITS)
            acc += _w_f32(w, FP8_BITS) * x[None, :]
            w = w_next
            x = x_next
        acc += _w_f32(w, FP8_BITS) * x[None, :]
    else:
        acc = _w_f32(w, FP8_BITS) * x[None, :]  # [BLOCK_N, BLOCK_K] fp32 partial products
        for k0 in range(BLOCK_K, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            c_ok = cols < K
            x = _x_for(X, K, cols, c_ok, SILU, FP8_BITS)  # [BLOCK_K]
            w = tl.load(w_rows + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
            acc += _w_f32(w, FP8_BITS) * x[None, :]
    out = tl.sum(acc, 1)  # [BLOCK_N] fp32
    if FP8_BITS:
        out = out * 72057594037927936.0  # 2^56: back to the convert variant's sum, exactly
    if HAS_SCALE:
        out = out * tl.load(S + rows, mask=r_ok, other=0.0)
    tl.store(Y + rows, out.to(Y.dtype.element_ty), mask=r_ok)
