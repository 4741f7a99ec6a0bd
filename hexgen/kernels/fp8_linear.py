"""FP8 (e4m3) linear layers: weights stored as float8 with one float32 scale per output row.

``linear(x, w, scale)`` computes ``x @ (w * scale[:, None]).T`` in x's dtype by one of three paths:

- CUDA cards with FP8 tensor cores (compute capability 8.9 and up: Ada, Hopper, Blackwell):
  ``torch._scaled_mm`` with the activations quantized to e4m3 per token on the fly (row-wise scales on
  both operands, fp32 accumulation; where the build offers no row-wise scaled GEMM, one activation scale per
  call and the weight's row scales applied after: ``gemm_mode``). One-row inputs with a GEMV configuration
  (``tune``) take the Triton GEMV of ``hexgen.kernels.gemv`` on the fp8 weight instead: batch-1 decode reads
  half the bytes of bf16.
- CUDA cards without FP8 tensor cores, shapes the FP8 GEMM does not take (a dimension not a multiple of 16),
  and CPU: the dequantizing path, ``F.linear(x, w.to(x.dtype)) * scale`` — weight-only quantization,
  exact up to the compute dtype's rounding (what CI tests the loader and the math with). On such GPUs it
  converts each weight per call: correct, and slower than bf16 weights.

Per-row scales cover both checkpoint strategies: a per-tensor scale is repeated over its rows, so the fused
QKV and gate/up projections keep one scale per section. A layer takes part when it has a ``weight_scale``
attribute (the parallel linears register it as None); ``convert`` turns those into fp8 on the meta device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hexgen.errors import LoadError
from hexgen.kernels import fused, gemv
from hexgen.kernels.support import triton_importable

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_MIN_SCALE = 1e-12  # an all-zero row or token gets this scale instead of 0 (its values stay 0)
# GEMV tiles for fp8 weights: bf16's, and the same byte sizes with twice the columns (a byte per weight)
_TILES: list[gemv.Config] = list(
    dict.fromkeys(gemv.CANDIDATES + [(bn, 2 * bk, nw, a) for bn, bk, nw, a in gemv.CANDIDATES if bk <= 2048])
)
# each tile with each e4m3 decode (gemv.DECODES): float conversions, or integer operations on the bytes
CANDIDATES: list[gemv.Fp8Config] = [(*t, d) for d in (gemv.DECODE_BITS, gemv.DECODE_CONVERT) for t in _TILES]
DECODE_CHOICES = {"auto": tuple(gemv.DECODES), "bits": (gemv.DECODE_BITS,), "convert": (gemv.DECODE_CONVERT,)}
_RANDOM_ROWS = 4096  # random init: rows generated (in the compute dtype) and quantized at a time

ScaleFn = Callable[[], torch.Tensor]


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] → (q [N, K] e4m3, scale [N] fp32) with w ≈ q * scale[:, None] (symmetric, per row)."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / FP8_MAX).clamp(min=_MIN_SCALE)  # [N]
    return (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q: [N, K] e4m3, scale: [N] → [N, K] in ``dtype`` (the reference weights)."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def scale_rows(scale: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a checkpoint's weight_scale: per channel ([N, 1] or [N]) sliced, per tensor
    ([1] or []) repeated. Returns [stop - start] fp32."""
    s = scale.float().reshape(-1)
    if s.numel() == 1:
        return s.expand(stop - start).clone()
    if stop > s.numel():
        raise LoadError(f"weight_scale: {s.numel()} rows, the weight needs rows {start}..{stop - 1}")
    return s[start:stop].clone()


def is_fp8(layer: nn.Module) -> bool:
    return getattr(layer, "weight_scale", None) is not None


def convert(model: nn.Module) -> int:
    """Every module with a ``weight_scale`` attribute of None (the parallel linears) gets an e4m3 ``weight``
    and a float32 ``weight_scale`` [out]; run on the meta device before ``to_empty``. Returns the count."""
    n = 0
    for m in model.modules():
        if hasattr(m, "weight_scale") and m.weight_scale is None:
            rows, cols = m.weight.shape
            dev = m.weight.device
            m.weight = nn.Parameter(torch.empty(rows, cols, dtype=FP8, device=dev), requires_grad=False)
            m.weight_scale = nn.Parameter(torch.empty(rows, dtype=torch.float32, device=dev), requires_grad=False)
            n += 1
    return n


def fill(
    weight: torch.Tensor, scale: torch.Tensor, value: torch.Tensor, value_scale: ScaleFn | None, what: str
) -> None:
    """Fill fp8 ``weight`` [n, K] and its ``scale`` [n] from a checkpoint slice ``value`` [n, K]: e4m3 values
    take their scales from ``value_scale`` (the checkpoint's weight_scale rows), others are quantized per row."""
    if tuple(weight.shape) != tuple(value.shape):
        raise LoadError(f"{what}: checkpoint slice has shape {tuple(value.shape)}, expected {tuple(weight.shape)}")
    if value.dtype == FP8:
        if value_scale is None:
            raise LoadError(f"{what}: the checkpoint's weight is float8 but it has no weight_scale")
        s = value_scale()
        if s.shape != scale.shape:
            raise LoadError(f"{what}: weight_scale has {s.numel()} rows, expected {scale.numel()}")
        q = value
    else:
        q, s = quantize_rows(value.to(weight.device))
    with torch.no_grad():
        weight.copy_(q)
        scale.copy_(s)


def random_fill(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> None:
    """Random N(0, 0.02) weights drawn in ``dtype`` and quantized per row, ``_RANDOM_ROWS`` rows at a time."""
    with torch.no_grad():
        for a in range(0, weight.shape[0], _RANDOM_ROWS):
            b = min(a + _RANDOM_ROWS, weight.shape[0])
            w = torch.empty(b - a, weight.shape[1], dtype=dtype, device=weight.device).normal_(
                0.0, 0.02, generator=generator
            )
            weight[a:b], scale[a:b] = quantize_rows(w)


@cache
def _gemm_mode(device: torch.device) -> str:
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return ""
    a = torch.zeros(16, 16, device=device).to(FP8)
    try:  # row-wise scales: not every build offers them on every FP8 card
        torch._scaled_mm(
            a,
            a.t(),
            scale_a=torch.ones(16, 1, device=device),
            scale_b=torch.ones(1, 16, device=device),
            out_dtype=torch.bfloat16,
        )
    except RuntimeError as e:
        log.info("fp8: row-wise scaled GEMM unavailable on %s (%s); per-tensor activation scales", device, e)
        return "tensorwise"
    return "rowwise"


def gemm_mode(device: torch.device) -> str:
    """The FP8 tensor-core GEMM ``device`` runs: "rowwise" (per-token activation scales), "tensorwise" (one
    activation scale per call, then the weight's row scales), or "" (no FP8 tensor cores: dequantizing path).
    Probed once per device with a small GEMM; ``tune`` asks first, before any CUDA graph capture."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _gemm_mode(device)


def tensor_cores(device: torch.device) -> bool:
    """Whether ``device`` has FP8 tensor cores (CUDA compute capability ≥ 8.9)."""
    return device.type == "cuda" and gemm_mode(device) != ""


def quantize_tokens(
    x: torch.Tensor, kernel: bool | None = None, silu: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] → (q [M, K] e4m3, scale [M, 1] fp32), dynamic per-token (row) scales. With ``silu`` x is the
    MLP's gate | up [M, 2K] and the rows quantized are ``fused.silu_mul(x)``'s. ``kernel`` (default: on CUDA
    with Triton): one Triton kernel instead of the PyTorch ops below, the same values up to the last bit of the
    division."""
    if kernel is None:
        kernel = x.is_cuda and triton_importable()
    if kernel and x.shape[0] > 0:
        return _quantize_tokens_kernel(x, silu)
    if silu:
        x = fused.silu_mul_ref(x)  # [M, K]
    xf = x.float()
    s = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)  # [M, 1]
    return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def _quantize_tokens_kernel(x: torch.Tensor, silu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from hexgen.kernels import fp8_quant_kernels as kern

    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape[0], x.shape[1] // 2 if silu else x.shape[1]
    if silu and k > kern.ONCE_MAX:
        x, silu = fused.silu_mul(x), False  # [M, K]
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block = 1 << (max(1, k) - 1).bit_length()
    args = (x, q, s, k, x.stride(0), q.stride(0))
    if k <= kern.ONCE_MAX:  # the row read once and held: 4 warps up to 2,048 values, 16 from 8,192
        warps = min(16, max(4, block // 512))
        kern.quantize_rows_once[(m,)](
            *args, FP8_MAX=FP8_MAX, MIN_SCALE=_MIN_SCALE, BLOCK=block, SILU=silu, num_warps=warps
        )
    else:
        kern.quantize_rows[(m,)](*args, FP8_MAX=FP8_MAX, MIN_SCALE=_MIN_SCALE, BLOCK=4096, num_warps=4)
    return q, s


def scaled_mm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """The FP8 tensor-core GEMM: x [M, K] quantized per token, w [N, K] e4m3, scale [N] → [M, N] x.dtype.
    With ``silu`` x is gate | up [M, 2K], multiplied as ``fused.silu_mul`` inside the quantization kernel.
    Without row-wise scales (``gemm_mode``): x over one scale, the weight's row scales applied after."""
    if gemm_mode(x.device) == "tensorwise":
        if silu:
            x = fused.silu_mul(x)  # [M, K]
        xf = x.float()
        xs = (xf.abs().amax() / FP8_MAX).clamp(min=_MIN_SCALE)  # [] one scale for the whole input
        xq = (xf / xs).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        one = torch.ones((), device=x.device)
        y = torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=one, out_dtype=torch.bfloat16)  # [M, N]
        return (y * scale.to(y.dtype)).to(x.dtype)
    xq, xs = quantize_tokens(x, silu=silu)
    y = torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=scale[None, :], out_dtype=torch.bfloat16)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What ``scaled_mm`` computes, in fp32 on any device: per-token quantized x times the dequantized w."""
    xq, xs = quantize_tokens(x)
    return (xq.float() * xs) @ (w.float() * scale.float()[:, None]).t()


def _gemm_shape(w: torch.Tensor) -> bool:
    """Whether the FP8 GEMM takes w [N, K] (and its input [M, K]): N and K multiples of 16."""
    return w.shape[1] % 16 == 0 and w.shape[0] % 16 == 0


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    config: gemv.Config | gemv.Fp8Config | None = None,
    silu: bool = False,
) -> torch.Tensor:
    """x: [tokens, K] (with ``silu``: [tokens, 2K], gate | up, multiplied as ``fused.silu_mul``);
    w: [N, K] e4m3; scale: [N] fp32 → [tokens, N] in x's dtype, by the path the module docstring names."""
    if config is not None and gemv.usable(x):
        return gemv.gemv_silu(x, w, config, scale) if silu else gemv.gemv(x, w, config, scale)  # [1, N]
    if x.is_cuda and tensor_cores(x.device) and _gemm_shape(w):
        return scaled_mm(x, w, scale, silu)
    if silu:
        x = fused.silu_mul(x)  # [tokens, K]
    return F.linear(x, w.to(x.dtype)) * scale.to(x.dtype)


def tune(layers: list[Any], mode: str = "triton", decode: str = "auto") -> dict[gemv.Key, gemv.Fp8Config | None]:
    """Set ``layer.gemv`` on fp8 ``layers`` to the fastest Triton GEMV configuration per group
    (``gemv.groups``: weight shape, and whether the layer is fed gate | up; None: batch-1 rows take the FP8
    GEMM). Only on CUDA cards with FP8 tensor cores, with Triton, unless ``mode`` is ``cublas``; ``decode``
    (``KernelConfig.fp8_gemv``: auto, bits or convert) limits the candidates to one e4m3 decode. Each
    configuration is checked against the dequantized reference first."""
    if decode not in DECODE_CHOICES:
        raise ValueError(f"fp8 gemv decode: {decode!r} must be one of {', '.join(DECODE_CHOICES)}")
    for layer in layers:
        layer.gemv = None
    if not layers or not layers[0].weight.is_cuda or not tensor_cores(layers[0].weight.device):
        return {}
    if mode == "cublas" or not triton_importable():
        return {}
    candidates = [c for c in CANDIDATES if c[4] in DECODE_CHOICES[decode]]
    chosen: dict[gemv.Key, gemv.Fp8Config | None] = {}
    for key, group in gemv.groups(layers).items():
        times = _time_group(group, key[2], mode, candidates)
        best = min(times, key=lambda c: times[c]) if times else None
        chosen[key] = best
        for m in group:
            m.gemv = best
        log.info("fp8 gemv %s x%d: %s (%s)", gemv.describe(key), len(group), _describe(best), _fastest(times))
    return chosen


def _time_group(
    group: list[Any], silu: bool, mode: str, candidates: list[gemv.Fp8Config]
) -> dict[gemv.Fp8Config | None, float]:
    """Microseconds per call of each candidate (None: the FP8 GEMM, with ``mode`` auto) over the layers of one
    group, called as they run (``silu``: on a gate | up row); candidates that fail to run or differ from the
    dequantized reference are left out."""
    w0, s0 = group[0].weight, group[0].weight_scale
    x = gemv.probe(w0, silu, torch.bfloat16)  # [1, K] or [1, 2K]
    where = gemv.describe((w0.shape[0], w0.shape[1], silu))
    want = F.linear(fused.silu_mul(x).float() if silu else x.float(), dequantize(w0, s0, torch.float32))  # [1, N]
    weights = [m.weight for m in group]
    times: dict[gemv.Fp8Config | None, float] = {}
    if mode == "auto" and _gemm_shape(w0):
        times[None] = gemv._time_us(lambda a, b, s=s0: scaled_mm(a, b, s, silu), weights, x)
    run = gemv.gemv_silu if silu else gemv.gemv
    for cfg in candidates:
        try:
            got = run(x, w0, cfg, s0).float()
        except Exception as e:  # a variant this device's Triton cannot build or launch: the others remain
            log.warning("fp8 gemv %s on %s: failed to run (%s); not used", _describe(cfg), where, e)
            continue
        if not torch.allclose(got, want, atol=5e-2 * want.abs().max().item() + 1e-2, rtol=2e-2):
            log.warning("fp8 gemv %s on %s: differs from the reference; not used", _describe(cfg), where)
            continue
        times[cfg] = gemv._time_us(lambda a, b, c=cfg, sc=s0, f=run: f(a, b, c, sc), weights, x)
    return times


def _describe(cfg: gemv.Fp8Config | None) -> str:
    if cfg is None:
        return "FP8 GEMM"
    return f"{cfg[:4]} decode={gemv.DECODES[cfg[4]]}"


def _fastest(times: dict[gemv.Fp8Config | None, float]) -> str:
    """The fastest time of each kind of candidate (FP8 GEMM, each decode), for the tuning log line."""
    best: dict[str, float] = {}
    for cfg, t in times.items():
        kind = "FP8 GEMM" if cfg is None else f"best {gemv.DECODES[cfg[4]]}"
        best[kind] = min(t, best.get(kind, t))
    return ", ".join(f"{kind}: {t:.1f} µs" for kind, t in best.items())
