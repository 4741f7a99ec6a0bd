"""Batch-1 linear layers (GEMV) as a Triton kernel, for decode steps whose time is the weight reads.

At batch 1 a linear layer is a pass over its weight. With its best configuration per shape the kernel reads
Llama-2-7B's shapes faster than cuBLAS for most of them, and in a whole captured decode step the kernel
everywhere beats the per-shape best of the two (hence ``gemv="triton"`` by default).
``tune`` times the configurations on a stage's real weights (every layer's matrix of a shape in turn, so
L2 holds none of them; captured in a CUDA graph and replayed, as the decode steps run; a layer fed gate | up
through ``gemv_silu``, whose SiLU every program recomputes per K slice, so wider tiles pay there) and sets
each layer's ``gemv`` attribute: None for cuBLAS, or a (BLOCK_N, BLOCK_K, num_warps, ahead) configuration
(``ahead``: the loop loads the next tile before it multiplies the current one).
``linear(x, w, config)`` applies it to one-row inputs. ``KernelConfig.gemv`` picks the candidates: ``triton``
(default) the kernel's configurations, ``auto`` those and cuBLAS, ``cublas`` none.

One program reads BLOCK_N whole rows of the weight, BLOCK_K columns at a time (16-byte loads along K), and
keeps a [BLOCK_N, BLOCK_K] fp32 partial product that it reduces once at the end. ``linear_silu`` feeds the
MLP's down projection straight from the gate/up output, computing SiLU(gate) * up per K slice (one kernel
instead of two; the same roundings as ``fused.silu_mul``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TypeVar

import torch
import torch.nn.functional as F

from hexgen.kernels import pdl
from hexgen.kernels.support import triton_importable
from hexgen.kernels.timing import replay_time

log = logging.getLogger(__name__)

Config = tuple[int, int, int, int]  # BLOCK_N, BLOCK_K, num_warps, ahead (0 or 1)
# An fp8 weight's configuration: a fifth field picks how the kernel turns e4m3 into fp32: DECODE_BITS (integer
# operations on the bytes, see gemv_kernels) or DECODE_CONVERT (the float conversion instructions)
Fp8Config = tuple[int, int, int, int, int]
DECODE_CONVERT, DECODE_BITS = 0, 1
DECODES = {DECODE_CONVERT: "convert", DECODE_BITS: "bits"}
_TILES = [
    (2, 1024, 4),
    (4, 512, 4),
    (4, 1024, 4),
    (4, 1024, 8),
    (8, 1024, 8),
    (1, 2048, 4),
    (2, 2048, 8),
    (8, 512, 4),
    (8, 512, 8),
    (16, 256, 4),
    (16, 512, 8),
]
CANDIDATES: list[Config] = [(*t, ahead) for ahead in (0, 1) for t in _TILES]


def usable(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16)


def gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    config: Config | Fp8Config = (4, 512, 4, 0),
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: [1, K]; w: [N, K] (row-major); scale: None or [N] fp32 row scales (an fp8 weight's), applied before
    the output's rounding; ``config`` an ``Fp8Config`` for e4m3 weights. Returns [1, N] in x's dtype."""
    if w.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("gemv: x and w must be contiguous along K")
    return _launch(x, w, config, silu=False, scale=scale)


def gemv_silu(
    gu: torch.Tensor,
    w: torch.Tensor,
    config: Config | Fp8Config = (4, 512, 4, 0),
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """gu: [1, 2K] (gate | up); w: [N, K]. Returns [1, N] = gemv(silu(gate) * up, w, scale) in gu's dtype."""
    k = w.shape[1]
    if gu.shape[1] != 2 * k or w.stride(1) != 1 or gu.stride(1) != 1:
        raise ValueError(f"gemv_silu: gate/up width {gu.shape[1]} must be 2 x {k}, both contiguous along K")
    return _launch(gu, w, config, silu=True, scale=scale)


def decode(config: Config | Fp8Config) -> int:
    """The e4m3 decode of a configuration: its fifth field, DECODE_CONVERT for a 4-field one."""
    return config[4] if len(config) > 4 else DECODE_CONVERT


def _launch(
    x: torch.Tensor, w: torch.Tensor, config: Config | Fp8Config, silu: bool, scale: torch.Tensor | None
) -> torch.Tensor:
    from hexgen.kernels import gemv_kernels as kern

    n, k = w.shape
    bn, bk, nw, ahead = config[:4]
    bits = decode(config)
    if bits not in DECODES:
        raise ValueError(f"gemv: config decode {bits} must be one of {sorted(DECODES)}")
    if bits == DECODE_BITS:
        if w.dtype != torch.float8_e4m3fn:
            raise ValueError(f"gemv: the bits decode needs a float8_e4m3fn weight, got {w.dtype}")
        w = w.view(torch.int8)  # [N, K] the same bytes
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    s = y if scale is None else scale  # unread without a scale
    kern.gemv[(-(-n // bn),)](
        x,
        w,
        y,
        s,
        n,
        k,
        w.stride(0),
        BLOCK_N=bn,
        BLOCK_K=bk,
        SILU=silu,
        AHEAD=bool(ahead),
        HAS_SCALE=scale is not None,
        FP8_BITS=bits == DECODE_BITS,
        num_warps=nw,
        **pdl.launch(x),
    )
    return y


def linear_silu(gu: torch.Tensor, w: torch.Tensor, config: Config | None = None) -> torch.Tensor:
    """gu: [tokens, 2K] (gate | up) → [tokens, N] = linear(silu(gate) * up, w) with the fused SiLU kernel;
    one-row CUDA inputs take ``gemv_silu`` when ``config``."""
    if config is not None and usable(gu):
        return gemv_silu(gu, w, config)
    from hexgen.kernels import fused

    return F.linear(fused.silu_mul(gu), w)


def linear(x: torch.Tensor, w: torch.Tensor, config: Config | None = None) -> torch.Tensor:
    """x: [tokens, K]; w: [N, K] → [tokens, N]; one-row CUDA inputs take the kernel when ``config``."""
    if config is not None and usable(x):
        return gemv(x, w, config)
    return F.linear(x, w)


def _time_us(fn, weights: list[torch.Tensor], x: torch.Tensor, reps: int = 5) -> float:
    """Microseconds per call of ``fn(x, w)`` over every weight of a shape, as the decode graphs run it:
    captured and replayed (eager launches would time the launch, not the read, for the smaller shapes)."""

    def every_weight() -> None:
        for w in weights:
            fn(x, w)

    try:
        return replay_time(every_weight, warmup=1, reps=reps) * 1e6 / len(weights)
    except RuntimeError as e:  # capture refused (unexpected): time eager launches instead
        log.warning("gemv tune: graph capture failed (%s); timing eager launches", e)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        every_weight()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(weights))


L = TypeVar("L")
Key = tuple[int, int, bool]  # a tuning group: the weight's N and K, and whether it is fed gate | up (SiLU inside)


def groups(layers: list[L]) -> dict[Key, list[L]]:
    """``layers`` by weight shape and by how they are called: a layer with ``silu_input`` set runs
    ``gemv_silu`` on a [1, 2K] gate | up row, whose cost (SiLU per K slice in every program) depends on the
    configuration, so it is timed that way, apart from plain layers of its shape."""
    by_key: dict[Key, list[L]] = defaultdict(list)
    for layer in layers:
        n, k = layer.weight.shape
        by_key[(n, k, bool(getattr(layer, "silu_input", False)))].append(layer)
    return by_key


def probe(w: torch.Tensor, silu: bool, dtype: torch.dtype) -> torch.Tensor:
    """A random input row for tuning ``w`` [N, K]: [1, K], or with ``silu`` the [1, 2K] gate | up row."""
    return torch.randn(1, 2 * w.shape[1] if silu else w.shape[1], device=w.device, dtype=dtype)


def describe(key: Key) -> str:
    return f"[{key[0]}, {key[1]}]" + (" (SiLU input)" if key[2] else "")


def tune(layers: list[torch.nn.Module], mode: str = "triton") -> dict[Key, Config | None]:
    """Set ``layer.gemv`` on every layer (each has ``weight`` [N, K]) to the fastest candidate of ``mode``
    (``KernelConfig.gemv``; see the module docstring), timed per group (``groups``) over all its layers, each
    as it is called (``linear`` or ``linear_silu``). cuBLAS everywhere without CUDA or triton, for fp32
    weights, or with mode ``cublas``."""
    for layer in layers:
        layer.gemv = None
    if not layers or mode == "cublas" or not triton_importable() or not layers[0].weight.is_cuda:
        return {}
    chosen: dict[Key, Config | None] = {}
    for key, group in groups(layers).items():
        weights = [m.weight for m in group]
        if weights[0].dtype not in (torch.bfloat16, torch.float16):
            chosen[key] = None
            continue
        silu = key[2]
        x = probe(weights[0], silu, weights[0].dtype)
        want = linear_silu(x, weights[0]).float() if silu else F.linear(x, weights[0]).float()
        run = gemv_silu if silu else gemv
        times: dict[Config | None, float] = {}
        if mode == "auto":
            times[None] = _time_us(linear_silu if silu else F.linear, weights, x)
        for cfg in CANDIDATES:
            got = run(x, weights[0], cfg).float()
            if not torch.allclose(got, want, atol=5e-2 * want.abs().max().item() + 1e-2, rtol=2e-2):
                log.warning("gemv %s on %s: differs from cuBLAS; not used", cfg, describe(key))
                continue
            times[cfg] = _time_us(lambda a, b, c=cfg, f=run: f(a, b, c), weights, x)
        best = min(times, key=times.get) if times else None
        chosen[key] = best
        for m in group:
            m.gemv = best
        log.info(
            "gemv %s x%d: %s (%s)",
            describe(key),
            len(group),
            best or "cuBLAS",
            ", ".join(f"{c or 'cuBLAS'}: {t:.1f} µs" for c, t in times.items()),
        )
    return chosen
