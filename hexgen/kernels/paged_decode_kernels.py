"""Triton kernels of the paged decode attention. Imported only through ``hexgen.kernels.paged_decode``, which
imports this module lazily: importing it imports triton.

Stage 1: one program per (sequence, KV head, split). It loads the query heads that share the KV head
(padded to BLOCK_G rows so ``tl.dot`` can use tensor cores), then walks its share of the context BLOCK_N
tokens at a time: each token's block number comes from the block table, K and V rows are loaded straight
from the paged cache (slot = block * BS + offset), and an online softmax accumulates in fp32. With one
split (SPLIT false) it writes the output; with several it writes a partial output and its log-sum-exp
(base 2), and stage 2 merges the splits. The split count is a runtime argument, so one compiled variant
serves every count; only SPLIT and stage 2's BLOCK_S (a power of two ≥ the count) are compile-time. With FP8,
K and V are e4m3 (``hexgen.kernels.kv_quant``): each tile is converted to q's dtype (exactly; with bf16
activations to fp16, q and the probabilities too, FP8_F16), K's per-head scale joins the softmax scale and
V's multiplies the output.
"""

from __future__ import annotations

import triton
import triton.language as tl


# The block table's width (stride_tb) and the split count vary from step to step in eager steps: Triton does
# not specialize on them (divisibility by 16, == 1), so that no serving step waits for it to compile another
# variant (a compile takes about half a second, far longer than a step).
# Both attention kernels branch on compile-time flags (dtype paths, FP8, splits): one body per variant rather
# than copies, hence their complexity (noqa: C901).
@triton.jit(do_not_specialize=["stride_tb", "num_splits"])
def decode_stage1(  # noqa: C901
    Q,
    K,
    V,
    KScale,
    VScale,
    Tables,
    Ctx,
    Out,
    Lse,
    qk_scale,
    num_splits,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_tb,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
    DOT_F32: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
    FP8: tl.constexpr,
    FP8_F16: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # launched early (hexgen.kernels.pdl): everything it reads, another kernel writes
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    if HEAD_MAJOR:  # grid (n_kv, batch, splits): programs launched together read one token's heads, side by side
        kvh = tl.program_id(0)
        b = tl.program_id(1)
    else:  # grid (batch, n_kv, splits)
        b = tl.program_id(0)
        kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(Ctx + b).to(tl.int32)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g  # [BLOCK_G] query heads of this KV head
    q = tl.load(
        Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]
    if DOT_F32:
        q = q.to(tl.float32)
    if FP8:  # fp8 K/V: K's scale joins the softmax scale, V's multiplies the output
        qk_scale = qk_scale * tl.load(KScale + kvh)
        v_scale = tl.load(VScale + kvh)
        if FP8_F16:  # e4m3 -> fp16 is one instruction per two values, -> bf16 several: the dots run in fp16
            q = q.to(tl.float16)

    # this split's token range, rounded to whole tiles
    per_split = ((ctx + num_splits - 1) // num_splits + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = Tables + b.to(tl.int64) * stride_tb
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    for s in range(start, end, BLOCK_N):
        pos = s + offs_n  # [BLOCK_N] token positions
        ok = pos < end
        blk = tl.load(table + pos // BS, mask=ok, other=0).to(tl.int64)
        slot = blk * BS + pos % BS  # [BLOCK_N]
        kv_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + slot[:, None] * stride_ks + offs_d[None, :], mask=kv_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
        if DOT_F32:  # Triton's interpreter multiplies bf16 as raw integers: upcast there
            k = k.to(tl.float32)
        elif FP8:  # e4m3 values are exact in q's dtype (fp16 with FP8_F16)
            k = k.to(q.dtype)
        if IEEE:  # fp32 inputs: full-precision products, not TF32
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * qk_scale  # [BLOCK_G, BLOCK_N], log2 units
        qk = tl.where(ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slot[:, None] * stride_vs + offs_d[None, :], mask=kv_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
        if DOT_F32:
            v = v.to(tl.float32)
        elif FP8:
            v = v.to(q.dtype)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new

    l_safe = tl.where(l_sum > 0, l_sum, 1.0)
    o = acc / l_safe[:, None]
    if FP8:
        o = o * v_scale
    out_ptr = Out + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(out_ptr, o.to(Out.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    if SPLIT:
        lse = tl.where(l_sum > 0, m + tl.log2(l_safe), float("-inf"))
        tl.store(Lse + b * stride_lb + heads * stride_lh + split, lse, mask=g_ok)


@triton.jit(do_not_specialize=["num_splits"])
def decode_stage2(
    Mid,
    Lse,
    Out,
    num_splits,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + offs_s, mask=s_ok, other=float("-inf"))  # [BLOCK_S]
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # empty splits weigh 0
    mid = tl.load(
        Mid + b.to(tl.int64) * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :],
        mask=s_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    total = tl.sum(w, 0)
    o = tl.sum(mid * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, o.to(Out.dtype.element_ty), mask=d_ok)


@triton.jit(do_not_specialize=["stride_tb"])
def prefill_fwd(  # noqa: C901
    Q,
    K,
    V,
    KScale,
    VScale,
    Out,
    Tables,
    SeqQStart,
    SeqQLen,
    SeqCtx,
    TileSeq,
    TileM,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_tb,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    DOT_F32: tl.constexpr,
    FP8: tl.constexpr,
):
    """Causal attention of a ragged batch of prefill chunks over their paged contexts (this step's K/V
    already written). One program per (query tile of BLOCK_M tokens of one sequence, query head)."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.load(TileSeq + tile).to(tl.int32)  # prefill sequence of this tile
    mt = tl.load(TileM + tile).to(tl.int32)  # tile index within it
    q_start = tl.load(SeqQStart + s).to(tl.int64)
    q_len = tl.load(SeqQLen + s).to(tl.int32)
    ctx = tl.load(SeqCtx + s).to(tl.int32)

    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query index within the chunk
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    q_pos = ctx - q_len + offs_m  # [BLOCK_M] absolute positions
    rows = q_start + offs_m.to(tl.int64)
    q = tl.load(
        Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0
    )  # [BLOCK_M, BLOCK_D]
    if DOT_F32:
        q = q.to(tl.float32)

    kvh = h // GROUP
    if FP8:  # as in decode_stage1
        qk_scale = qk_scale * tl.load(KScale + kvh)
        v_scale = tl.load(VScale + kvh)
    end = tl.minimum(ctx, ctx - q_len + (mt + 1) * BLOCK_M)  # keys this tile can see
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = Tables + s.to(tl.int64) * stride_tb
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    for n0 in range(0, end, BLOCK_N):
        pos = n0 + offs_n  # [BLOCK_N] key positions
        ok = pos < end
        blk = tl.load(table + pos // BS, mask=ok, other=0).to(tl.int64)
        slot = blk * BS + pos % BS
        kv_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + slot[:, None] * stride_ks + offs_d[None, :], mask=kv_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
        if DOT_F32:
            k = k.to(tl.float32)
        elif FP8:
            k = k.to(q.dtype)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        qk = tl.where(ok[None, :] & (pos[None, :] <= q_pos[:, None]), qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))  # finite: key 0 is visible to every row
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slot[:, None] * stride_vs + offs_d[None, :], mask=kv_ok, other=0.0)
        if DOT_F32:
            v = v.to(tl.float32)
        elif FP8:
            v = v.to(q.dtype)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new

    o = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    if FP8:
        o = o * v_scale
    tl.store(
        Out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        o.to(Out.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
