"""Fused elementwise ops of a decoder layer, each one Triton kernel on CUDA, the PyTorch reference elsewhere.

A batch-1 decode step is four weight reads per layer and, unfused, some thirty small kernels (RMSNorm in
five ops, rotary by rotate-half with ``cat``, two ``index_copy_`` into the cache, SiLU and the product):
inside a CUDA graph each still costs a few microseconds, about a third of the step. Fused:

- ``add_rms_norm``: residual add + RMSNorm (``hexgen.model.llama.RMSNorm``'s math and rounding);
- ``rotary_kv_write``: rotary on q and k straight out of the fused QKV projection, k and v written to their
  cache slots, rotated q returned;
- ``silu_mul``: SiLU(gate) * up from the fused gate/up projection.

A stage takes the kernels when its resolved ``KernelConfig.fused`` is on (CUDA, triton importable, not turned
off; ``hexgen.kernels.choice``). The ``*_ref`` functions are the reference math (rotary's lives with the model
math: ``hexgen.model.rope.rotary_kv_write_ref``); tests run the kernels under Triton's interpreter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hexgen.kernels import pdl


def _pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, res: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    h = x if res is None else x + res
    return rms_norm_ref(h, weight, eps), h


def add_rms_norm(
    x: torch.Tensor, res: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, res: [tokens, hidden] (res None: no add). Returns (normed [tokens, hidden], x + res)."""
    from hexgen.kernels import fused_kernels as kern

    x = x.contiguous()
    out = torch.empty_like(x)
    h = torch.empty_like(x) if res is not None else x
    r = res.contiguous() if res is not None else x
    n = x.shape[-1]
    kern.add_rms_norm[(x.shape[0],)](
        x,
        r,
        weight,
        out,
        h,
        eps,
        n,
        x.stride(0),
        r.stride(0),
        out.stride(0),
        h.stride(0),
        HAS_RES=res is not None,
        BLOCK=_pow2(n),
        num_warps=8,
        **pdl.launch(x),
    )
    return out, h


def rotary_kv_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_q: int,
    n_kv: int,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """qkv: [tokens, (n_q + 2 n_kv) * d] (q heads, k heads, v heads); cos, sin: [tokens, 1, d] in qkv's
    dtype; slots: [tokens] cache slot of each token; caches [slots, n_kv, d]. Writes rotated k and v to the
    caches (fp8 caches: quantized with k_scale, v_scale [n_kv], as ``kv_quant.write``); returns rotated q
    [tokens, n_q, d]."""
    from hexgen.kernels import fused_kernels as kern
    from hexgen.kernels.kv_quant import FP8

    t, d = qkv.shape[0], k_cache.shape[-1]
    if qkv.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("rotary_kv_write: last dimensions must be contiguous")
    fp8 = k_cache.dtype == FP8
    if fp8 and (k_scale is None or v_scale is None):
        raise ValueError("rotary_kv_write: an fp8 cache needs k_scale and v_scale")
    q = torch.empty(t, n_q, d, dtype=qkv.dtype, device=qkv.device)
    if t == 0:
        return q
    cos2, sin2 = cos.reshape(t, d), sin.reshape(t, d)  # [tokens, d]
    ks, vs = (k_scale, v_scale) if fp8 else (slots, slots)  # unread without FP8
    kern.rotary_kv_write[(t, n_q + n_kv)](
        qkv,
        cos2,
        sin2,
        slots,
        q,
        k_cache,
        v_cache,
        ks,
        vs,
        qkv.stride(0),
        cos2.stride(0),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        N_Q=n_q,
        N_KV=n_kv,
        HALF=d // 2,
        BLOCK_H=_pow2(d // 2),
        FP8=fp8,
        num_warps=1,
        **pdl.launch(qkv),
    )
    return q


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [tokens, 2 * inter] (gate | up) → [tokens, inter]."""
    from hexgen.kernels import fused_kernels as kern

    t, n = x.shape[0], x.shape[1] // 2
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    block = 1024
    kern.silu_mul[(t, -(-n // block))](x, out, n, x.stride(0), out.stride(0), BLOCK=block, num_warps=4, **pdl.launch(x))
    return out
