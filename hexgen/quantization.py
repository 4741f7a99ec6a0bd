"""Weight formats: what a checkpoint's ``quantization_config`` declares, and the load-time choice.

A checkpoint in the compressed-tensors format (the "-FP8" Llama checkpoints on the Hugging Face hub) stores
every decoder linear weight as float8 e4m3 with a ``weight_scale`` per output channel or per tensor, and
usually leaves the embedding and the LM head in bf16 (``ignore: ["lm_head"]``). Its activation scheme (static
per-tensor ``input_scale`` or dynamic per-token) is accepted either way: HexGen quantizes activations per
token on the fly (``hexgen.kernels.fp8_linear``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hexgen.errors import ConfigError

QUANTIZATIONS = ("auto", "fp8")  # the load-time choice: auto = the checkpoint's own format
WEIGHT_FORMATS = ("none", "fp8")  # the decoder linears' storage: the model dtype, or e4m3 + per-row scales
_FORMATS = ("float-quantized", "naive-quantized")
_STRATEGIES = ("tensor", "channel")


def check_quantization(value: Any) -> None:
    """ConfigError naming the field and the choices unless ``value`` is one of QUANTIZATIONS."""
    if value not in QUANTIZATIONS:
        raise ConfigError(f"quantization: {value!r} must be one of {', '.join(QUANTIZATIONS)}")


def checkpoint_format(qc: Mapping[str, Any] | None) -> str:
    """The weight format a config.json's ``quantization_config`` declares: "none" (absent) or "fp8"
    (compressed-tensors, 8-bit float weights scaled per tensor or per output channel); ConfigError otherwise."""
    if not qc:
        return "none"
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise ConfigError(
            f"quantization_config.quant_method: {method!r} is not supported; supported: compressed-tensors "
            "(FP8 weights, the format of the hub's -FP8 Llama checkpoints)"
        )
    fmt = qc.get("format")
    if fmt not in _FORMATS:
        raise ConfigError(f"quantization_config.format: {fmt!r} is not supported; supported: {', '.join(_FORMATS)}")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise ConfigError("quantization_config.config_groups: missing; expected one group of FP8 weights")
    for name, group in groups.items():
        w = group.get("weights") or {}
        where = f"quantization_config.config_groups.{name}.weights"
        if w.get("type") != "float" or w.get("num_bits") != 8:
            raise ConfigError(
                f"{where}: type {w.get('type')!r} with num_bits {w.get('num_bits')!r} is not supported; "
                "supported: type 'float', num_bits 8"
            )
        if w.get("strategy") not in _STRATEGIES:
            raise ConfigError(
                f"{where}.strategy: {w.get('strategy')!r} is not supported; supported: {', '.join(_STRATEGIES)}"
            )
        if w.get("dynamic"):
            raise ConfigError(f"{where}.dynamic: true is not supported (weights carry their scales)")
    return "fp8"


def weight_format(checkpoint: str, quantization: str) -> str:
    """The linears' format at run time: fp8 when the checkpoint is or ``quantization`` asks for it."""
    check_quantization(quantization)
    return "fp8" if quantization == "fp8" or checkpoint == "fp8" else checkpoint
