"""Rotary position embeddings, with Llama-3 frequency scaling."""

from __future__ import annotations

import math

import torch

from hexgen.config import ModelConfig
from hexgen.kernels import kv_quant


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, scaled as the config's rope_scaling asks."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling_dict
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return inv_freq
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryCache:
    """cos/sin tables for positions [0, max_len), float32 on the model's device."""

    def __init__(self, cfg: ModelConfig, max_len: int, device: torch.device) -> None:
        inv_freq = inv_frequencies(cfg).to(device)
        t = torch.arange(max_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_len, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, head_dim]
        self.cos = emb.cos()
        self.sin = emb.sin()

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # [tokens, 1, head_dim] each, broadcast over heads
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [tokens, n_q, head_dim], k: [tokens, n_kv, head_dim] (Hugging Face rotate-half layout)."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rotary_kv_write_ref(
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
    """The reference math of ``hexgen.kernels.fused.rotary_kv_write`` (same arguments and result): rotary on
    q and k of the fused QKV projection, k and v written to their cache slots, rotated q returned."""
    t, d = qkv.shape[0], k_cache.shape[-1]
    q, k, v = qkv.split([n_q * d, n_kv * d, n_kv * d], dim=-1)
    q, k = apply_rotary(q.view(t, n_q, d), k.view(t, n_kv, d), cos, sin)
    kv_quant.write(k_cache, slots, k, k_scale)
    kv_quant.write(v_cache, slots, v.view(t, n_kv, d), v_scale)
    return q
