"""FP8 (e4m3) KV cache: storage, scales, and the reference quantize / dequantize.

With ``EngineConfig.kv_cache_dtype == "fp8"`` the cache of a rank is ``torch.float8_e4m3fn``
[layers, 2 (k, v), slots, n_kv_local, d], half the bytes of a bf16 cache, and beside it one float32 scale per
layer, K or V, and KV head: ``scales`` [layers, 2, n_kv_local]. A value x is stored as
``fp8(clamp(x / scale, -448, 448))`` (round to nearest even) and read back as ``float(stored) * scale``.

Scales are computed at write time: each (layer, K/V, KV head) scale starts unset (0) and is fixed by the first
write that carries a non-zero value for it, as ``amax * HEADROOM / 448`` over that write's tokens and the
head's channels (``update_scales``; K's amax over rotary pairs, so it does not depend on positions), then kept
for the cache's life (every later write and read of the cache uses it). The first write is the first prefill a
rank runs, so a cache calibrates on the first request it serves; later values up to HEADROOM times that
request's largest pass unclipped, and larger ones saturate at 448 * scale.
A CUDA-graph capture writes zeros only (its inputs are zero), so it never sets a scale. All of it runs on the
device with no host sync (``torch.where`` on the scales), so it also runs inside captured decode graphs.

The Triton kernels (``hexgen.kernels.paged_decode``, ``hexgen.kernels.fused``) read the same scales: K's scale
multiplies the q·k products, V's the accumulated output, so the kernels never materialize dequantized K/V.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
HEADROOM = 8.0  # the first write's amax maps to 448 / HEADROOM


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8


def allocate_scales(num_layers: int, n_kv_local: int, device: torch.device) -> torch.Tensor:
    # [layers, 2 (k, v), n_kv_local], 0 = not yet set
    return torch.zeros(num_layers, 2, n_kv_local, dtype=torch.float32, device=device)


def update_scales(k_scale: torch.Tensor, v_scale: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Fix still-unset entries of k_scale, v_scale [n_kv] from a write's k, v [tokens, n_kv, d] (in place, on
    the device). K's amax is taken over its rotary pairs' norms, sqrt(k[i]² + k[i + d/2]²), which rotary
    leaves unchanged: the scale is the same whether k is taken before rotary or after, and covers the key at
    any position."""
    if k.shape[0] == 0:
        return
    k1, k2 = k.detach().float().chunk(2, dim=-1)  # [tokens, n_kv, d/2] each
    k_amax = (k1 * k1 + k2 * k2).amax(dim=(0, 2)).sqrt()  # [n_kv]
    v_amax = v.detach().float().abs().amax(dim=(0, 2))
    for scale, amax in ((k_scale, k_amax), (v_scale, v_amax)):
        scale.copy_(torch.where(scale > 0, scale, amax * (HEADROOM / FP8_MAX)))


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """Unset scales (0: nothing non-zero written yet) act as 1, so zeros stay zeros."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [tokens, n_kv, d]; scale [n_kv] → fp8 [tokens, n_kv, d]."""
    s = _safe(scale)[None, :, None]
    return (x.float() / s).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize(x8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x8: fp8 [..., n_kv, d]; scale [n_kv] → ``dtype`` [..., n_kv, d]."""
    return (x8.float() * _safe(scale)[:, None]).to(dtype)


def write(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None) -> None:
    """cache[slots] = x (cache [slots, n_kv, d], x [tokens, n_kv, d]); an fp8 cache quantizes with ``scale``
    (set by ``update_scales`` before)."""
    if not is_fp8(cache):
        cache.index_copy_(0, slots, x)
        return
    if scale is None:
        raise ValueError("kv_quant.write: an fp8 cache needs its scales")
    # index_copy_ has no fp8 kernel on CPU: copy the bytes
    cache.view(torch.uint8).index_copy_(0, slots, quantize(x, scale).view(torch.uint8))


def round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What reading ``x`` back from an fp8 cache gives (``x``'s dtype): the reference attends to this."""
    return dequantize(quantize(x, scale), scale, x.dtype)
