"""The physical limit of a throughput workload on the device it runs on.

Two counts of the workload alone (not of how an engine schedules it), each over a rate measured in the bench's
own process:

- **Arithmetic**: the FLOPs of the linear layers. Every token a request feeds through the model (its prompt and
  every generated token but the last, ``prompt + output - 1``) passes the q/k/v, o, gate/up and down
  projections of every layer (2 FLOPs per weight); every generated token passes the LM head once. Attention's
  own FLOPs are reported beside it, not added (they are a few percent at these context lengths). Over the
  rate of a large square matrix product in the run's dtype on random data (``matmul_rate``).
- **Memory**: the bytes that must cross device memory. K/V: every fed token's K and V written once, and every
  decode step reads its sequence's whole context once (the token fed at output position j, j = 1 .. output-1,
  attends over prompt + j cached tokens); a prefill is assumed to attend its own chunk on chip. Weights: each
  step reads them once, and a request needs ``output`` steps one after another (one prefill, then one decode
  per further token), so at least ``max(output)`` weight reads. Over the copy bandwidth (bytes read plus
  bytes written, ``roofline.copy_bandwidth``).

``bound_s`` is the larger of the two times (perfect overlap of arithmetic and memory traffic), ``no_overlap_s``
their sum; the ceilings in tokens/s are the workload's output tokens over each. With several GPUs the rates
measured on one are multiplied by the layout's number of GPUs (an ideal split of the work).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from hexgen.bench.roofline import weight_bytes
from hexgen.bench.workload import Shape
from hexgen.config import ModelConfig


def linear_params_per_layer(cfg: ModelConfig) -> int:
    h, d = cfg.hidden_size, cfg.head_dim
    return h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d + cfg.num_heads * d * h + 3 * h * cfg.intermediate_size


def kv_bytes_per_token(cfg: ModelConfig, kv_elem_bytes: float) -> float:
    """K and V of one token across every layer."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_elem_bytes


@dataclass(frozen=True)
class WorkloadCounts:
    """What a workload must compute and move, counted from its shapes (module notes)."""

    fed_tokens: int  # sum of prompt + output - 1
    sampled_tokens: int  # sum of output
    linear_flops: float
    attention_flops: float  # QK^T and PV of every fed token over its causal context (not in the bound)
    kv_write_bytes: float
    kv_read_bytes: float
    weight_read_bytes: float  # weight bytes x max(output)
    min_steps: int

    @property
    def memory_bytes(self) -> float:
        return self.kv_write_bytes + self.kv_read_bytes + self.weight_read_bytes


def count_workload(
    cfg: ModelConfig, shapes: list[Shape], elem_bytes: int, kv_elem_bytes: float | None = None
) -> WorkloadCounts:
    """Counts for ``shapes`` on model ``cfg`` with weights of ``elem_bytes`` bytes and a K/V cache of
    ``kv_elem_bytes`` (default: the weights')."""
    kv_elem = elem_bytes if kv_elem_bytes is None else kv_elem_bytes
    fed = sum(s.prompt + s.output - 1 for s in shapes)
    sampled = sum(s.output for s in shapes)
    per_layer = linear_params_per_layer(cfg)
    linear = 2.0 * (per_layer * cfg.num_layers * fed + cfg.vocab_size * cfg.hidden_size * sampled)
    # token at position i (0-based) attends over i + 1 keys: sum over i < n of (i + 1) = n (n + 1) / 2
    ctx_sum = sum((s.prompt + s.output - 1) * (s.prompt + s.output) // 2 for s in shapes)
    attention = 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * ctx_sum
    # decode reads: sum over j = 1 .. o-1 of (p + j) = (o - 1) p + (o - 1) o / 2
    reads = sum((s.output - 1) * s.prompt + (s.output - 1) * s.output // 2 for s in shapes)
    per_token = kv_bytes_per_token(cfg, kv_elem)
    steps = max((s.output for s in shapes), default=0)
    dtype = {1: torch.int8, 2: torch.bfloat16, 4: torch.float32}[elem_bytes]
    return WorkloadCounts(
        fed,
        sampled,
        linear,
        attention,
        fed * per_token,
        reads * per_token,
        float(weight_bytes(cfg, dtype)) * steps,
        steps,
    )


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product in ``dtype`` on random data (8192 on CUDA, 1024 on CPU), the mean
    of ``reps`` products after three warm-ups."""
    n = n or (8192 if device.type == "cuda" else 1024)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        c = a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        c = a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t) / reps
    del a, b, c
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2.0 * n**3 / dt


def scaled_mm_rate(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """FLOP/s of an n x n x n FP8 product (``torch._scaled_mm``, e4m3 operands, row-wise scales, bf16 out)
    on a CUDA card with FP8 tensor cores, timed as ``matmul_rate``."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device, generator=gen).to(torch.float8_e4m3fn).t()
    sa, sb = torch.ones(n, 1, device=device), torch.ones(1, n, device=device)
    for i in range(3 + reps):
        if i == 3:
            torch.cuda.synchronize(device)
            t = time.perf_counter()
        torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t) / reps
    del a, b
    torch.cuda.empty_cache()
    return 2.0 * n**3 / dt


def ceiling(counts: WorkloadCounts, flops_per_s: float, bytes_per_s: float) -> dict:
    """The two times, their max and sum, and the output tokens/s each allows."""
    t_flops = counts.linear_flops / flops_per_s
    t_bytes = counts.memory_bytes / bytes_per_s
    bound, serial = max(t_flops, t_bytes), t_flops + t_bytes
    return {
        "linear_PFLOP": round(counts.linear_flops / 1e15, 4),
        "attention_PFLOP_not_counted": round(counts.attention_flops / 1e15, 4),
        "kv_write_TB": round(counts.kv_write_bytes / 1e12, 4),
        "kv_read_TB": round(counts.kv_read_bytes / 1e12, 4),
        "weight_read_TB": round(counts.weight_read_bytes / 1e12, 4),
        "min_steps": counts.min_steps,
        "matmul_TFLOPs": round(flops_per_s / 1e12, 3),
        "copy_TBps": round(bytes_per_s / 1e12, 3),
        "compute_s": round(t_flops, 3),
        "memory_s": round(t_bytes, 3),
        "bound": "compute" if t_flops >= t_bytes else "memory",
        "bound_s": round(bound, 3),
        "no_overlap_s": round(serial, 3),
        "tokens_per_s": round(counts.sampled_tokens / bound, 1) if bound else None,
        "tokens_per_s_no_overlap": round(counts.sampled_tokens / serial, 1) if serial else None,
    }
