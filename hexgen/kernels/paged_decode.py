"""Paged attention kernels (Triton), reading K/V through the block table with no gather: decode (one new
query token per sequence) and, for the eager path, causal prefill of a ragged batch of chunks.

``paged_decode`` is CUDA-graph capturable: no host syncs, and its grid and split count come from static
shapes only (batch, heads, the width of the block table), never from the context lengths, which the kernel
reads on the device. Triton is imported lazily, on the first call; ``available()`` says whether the kernel
can run here. On CPU the kernel runs only under Triton's interpreter (``TRITON_INTERPRET=1``, tests); the
engine uses the PyTorch reference in ``hexgen.model.attention`` there.

``KernelConfig.decode_kernel`` and ``prefill_kernel`` turn a kernel off, for A/B runs against the PyTorch path.
"""

from __future__ import annotations

import functools

import torch

from hexgen.kernels.support import triton_importable, triton_interpreting

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8 = torch.float8_e4m3fn  # an fp8 cache (hexgen.kernels.kv_quant) comes with per-KV-head scales
_LOG2E = 1.4426950408889634  # the kernels take the softmax scale times log2(e) and work in base 2


def available() -> bool:
    """True when the kernels can run on this machine's GPU: CUDA is present and triton imports."""
    return torch.cuda.is_available() and triton_importable()


MAX_SPLITS = 64  # the most splits the heuristic picks; stage 2 merges this many at once (one compiled variant)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(batch: int, n_kv: int, max_ctx: int, device: torch.device) -> int:
    """Context partitions per (sequence, KV head): enough programs to fill the GPU about twice when the
    batch is small, with at least 256 tokens per split. Depends on static shapes only."""
    if device.type != "cuda":
        return 1
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    want = -(-2 * sms // max(1, batch * n_kv))
    return max(1, min(want, -(-max_ctx // 256), MAX_SPLITS))


def _dot_mode(dtype: torch.dtype) -> tuple[bool, bool]:
    """(DOT_F32, IEEE): fp32 inputs get exact products (no TF32); under Triton's interpreter bf16 dots run
    in fp32, since it multiplies bf16 as raw integers."""
    dot_f32 = dtype == torch.bfloat16 and triton_interpreting()
    return dot_f32, dtype == torch.float32 or dot_f32


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    what: str,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    n_q, n_kv = q.shape[1], k_cache.shape[1]
    if n_q % n_kv:
        raise ValueError(f"{what}: n_q ({n_q}) must be a multiple of n_kv ({n_kv})")
    fp8 = k_cache.dtype == FP8
    if q.dtype not in _DTYPES or v_cache.dtype != k_cache.dtype or (k_cache.dtype != q.dtype and not fp8):
        raise ValueError(
            f"{what}: q/k/v dtypes {q.dtype}/{k_cache.dtype}/{v_cache.dtype}; "
            f"expected one of {_DTYPES}, all equal, or caches of {FP8}"
        )
    if fp8 and (
        k_scale is None
        or v_scale is None
        or k_scale.shape != (n_kv,)
        or v_scale.shape != (n_kv,)
        or k_scale.dtype != torch.float32
        or v_scale.dtype != torch.float32
    ):
        raise ValueError(f"{what}: an fp8 cache needs float32 k_scale and v_scale of shape [{n_kv}]")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"{what}: the caches' last dimension must be contiguous")
    return q if q.stride(-1) == 1 else q.contiguous()


def _next_pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    scale: float,
    block_size: int,
    splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 2,
    num_stages: int = 2,
    head_major: bool = True,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    fp8_f16: bool | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context.

    q: [batch, n_q, d]; k_cache, v_cache: [slots, n_kv, d] (slot = block * block_size + offset);
    block_tables: [batch, max_blocks] int32/int64, rows padded with any valid block; ctx_lens: [batch]
    int32/int64, tokens of context (the query's own K/V already written). Keys at positions ≥ ctx_len are
    ignored. Returns [batch, n_q, d] in q's dtype. fp8 caches (``hexgen.kernels.kv_quant``): k_scale, v_scale
    [n_kv] float32, the dequantization scale of each KV head. ``splits`` (split-K partitions) and ``block_n`` (tokens
    per tile) default to heuristics. ``num_warps``, ``num_stages`` and ``head_major`` (grid order: the KV
    heads of one sequence launched together, rather than one head of many sequences) are launch settings;
    the defaults (64-token tiles, 2 warps, 2 stages, head-major) are the fastest or within 2% of it at every
    shape of ``scripts/bench_paged_decode.py --sweep`` on an H200, at batch 1 and at throughput shapes.
    ``fp8_f16``: an fp8 cache's tiles are converted to fp16 and the dots run in fp16 (default: with bf16
    activations, where it is 1.14-1.19x faster than converting to bf16, ``scripts/bench_decode_fp8.py``).
    """
    q = _check(q, k_cache, v_cache, "paged_decode", k_scale, v_scale)
    fp8 = k_cache.dtype == FP8
    ks, vs = (k_scale, v_scale) if fp8 else (ctx_lens, ctx_lens)  # unread without FP8
    batch, n_q, d = q.shape
    n_kv = k_cache.shape[1]
    group = n_q // n_kv
    block_g = max(16, _next_pow2(group))
    block_d = max(16, _next_pow2(d))
    if block_n is None:
        block_n = 64
    max_ctx = block_tables.shape[1] * block_size
    if splits is None:
        splits = num_splits(batch, n_kv, max_ctx, q.device)
    f16 = fp8 and (q.dtype == torch.bfloat16 if fp8_f16 is None else fp8_f16)
    dot_f32, ieee = (False, False) if f16 else _dot_mode(q.dtype)  # fp16 dots are exact under the interpreter too
    qk_scale = scale * _LOG2E

    out = torch.empty(batch, n_q, d, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    from hexgen.kernels import paged_decode_kernels as kern
    from hexgen.kernels import pdl

    common = dict(
        GROUP=group,
        BLOCK_G=block_g,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        BS=block_size,
        BLOCK_N=block_n,
        SPLIT=splits > 1,
        IEEE=ieee,
        DOT_F32=dot_f32,
        HEAD_MAJOR=head_major,
        FP8=fp8,
        FP8_F16=f16,
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl.launch(q),
    )
    grid = (n_kv, batch, splits) if head_major else (batch, n_kv, splits)
    if splits == 1:
        kern.decode_stage1[grid](
            q,
            k_cache,
            v_cache,
            ks,
            vs,
            block_tables,
            ctx_lens,
            out,
            out,
            qk_scale,
            1,
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            v_cache.stride(0),
            v_cache.stride(1),
            block_tables.stride(0),
            out.stride(0),
            out.stride(1),
            0,
            0,
            0,
            **common,
        )
        return out
    mid = torch.empty(batch, n_q, splits, d, dtype=torch.float32, device=q.device)  # partial outputs
    lse = torch.empty(batch, n_q, splits, dtype=torch.float32, device=q.device)
    kern.decode_stage1[grid](
        q,
        k_cache,
        v_cache,
        ks,
        vs,
        block_tables,
        ctx_lens,
        mid,
        lse,
        qk_scale,
        splits,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        block_tables.stride(0),
        mid.stride(0),
        mid.stride(1),
        mid.stride(2),
        lse.stride(0),
        lse.stride(1),
        **common,
    )
    kern.decode_stage2[(batch, n_q)](
        mid,
        lse,
        out,
        splits,
        mid.stride(0),
        mid.stride(1),
        mid.stride(2),
        lse.stride(0),
        lse.stride(1),
        out.stride(0),
        out.stride(1),
        HEAD_DIM=d,
        BLOCK_D=block_d,
        BLOCK_S=max(MAX_SPLITS, _next_pow2(splits)),
        num_warps=4,
        **pdl.launch(q),
    )
    return out


PREFILL_BLOCK_M = 64  # query tokens per program of the prefill kernel (``build_meta`` tiles with it)


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    tables: torch.Tensor,
    q_starts: torch.Tensor,
    q_lens: torch.Tensor,
    ctx_lens: torch.Tensor,
    tile_seq: torch.Tensor,
    tile_m: torch.Tensor,
    scale: float,
    block_size: int,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Causal attention of prefill chunks over their paged contexts, written into ``out``'s rows.

    q, out: [tokens, n_q, d], the step's ragged queries; caches [slots, n_kv, d] already hold this step's
    K/V. Per prefill sequence: tables [n_pre, max_blocks], q_starts [n_pre] (its first token in q), q_lens
    [n_pre], ctx_lens [n_pre] (context after this step). Per query tile of PREFILL_BLOCK_M tokens:
    tile_seq [n_tiles] (its sequence) and tile_m [n_tiles] (its index within the sequence). Rows of ``out``
    that belong to no prefill sequence are left as they are. fp8 caches: k_scale, v_scale as in
    ``paged_decode``.
    """
    q = _check(q, k_cache, v_cache, "paged_prefill", k_scale, v_scale)
    fp8 = k_cache.dtype == FP8
    ks, vs = (k_scale, v_scale) if fp8 else (ctx_lens, ctx_lens)
    n_tiles = tile_seq.shape[0]
    if n_tiles == 0:
        return
    from hexgen.kernels import paged_decode_kernels as kern

    n_q, d = q.shape[1], q.shape[2]
    block_d = max(16, _next_pow2(d))
    dot_f32, ieee = _dot_mode(q.dtype)
    kern.prefill_fwd[(n_tiles, n_q)](
        q,
        k_cache,
        v_cache,
        ks,
        vs,
        out,
        tables,
        q_starts,
        q_lens,
        ctx_lens,
        tile_seq,
        tile_m,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=n_q // k_cache.shape[1],
        HEAD_DIM=d,
        BLOCK_D=block_d,
        BS=block_size,
        BLOCK_M=PREFILL_BLOCK_M,
        BLOCK_N=64,
        IEEE=ieee,
        DOT_F32=dot_f32,
        FP8=fp8,
        num_warps=4,
        num_stages=2,
    )
