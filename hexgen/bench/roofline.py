"""The batch-1 decode roofline: measured device-to-device copy bandwidth over the bytes of the weights."""

from __future__ import annotations

import time

import torch

from hexgen.config import ModelConfig


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of every parameter read in one decode step (embedding rows aside, the LM head counts once
    more unless tied). FP8 weights (``cfg.quantization``): the decoder linears at one byte a weight plus a
    4-byte scale per output row."""
    elem = torch.empty(0, dtype=dtype).element_size()
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d + cfg.num_heads * d * h
    mlp = 3 * h * cfg.intermediate_size
    head = cfg.vocab_size * h
    if cfg.quantization == "fp8":
        rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * d + h + 2 * cfg.intermediate_size + h
        linears = attn + mlp + 4 * rows
    else:
        linears = elem * (attn + mlp)
    return cfg.num_layers * (linears + elem * 2 * h) + elem * (h + head)


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    a = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t) / reps
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / dt
