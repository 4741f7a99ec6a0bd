"""Model, layout and engine configuration, validated before any process starts: ``model`` (shapes, dtypes,
presets), ``layout`` (stages, TP degrees, layer counts, shard shares) and ``engine`` (kernels, device limits,
the KV cache and the engine's switches)."""

from hexgen.config.engine import (
    KERNEL_CHOICES,
    LOG_LEVELS,
    DeviceLimit,
    EngineConfig,
    KernelConfig,
    check_kv_cache_dtype,
    parse_limits,
)
from hexgen.config.layout import Layout, StageSpec, check_devices, default_partition
from hexgen.config.model import (
    DTYPES,
    KV_CACHE_DTYPES,
    PRESETS,
    ModelConfig,
    normalize_dtype,
    preset,
    valid_tp_degrees,
)

__all__ = [
    "DTYPES",
    "KERNEL_CHOICES",
    "KV_CACHE_DTYPES",
    "LOG_LEVELS",
    "PRESETS",
    "DeviceLimit",
    "EngineConfig",
    "KernelConfig",
    "Layout",
    "ModelConfig",
    "StageSpec",
    "check_devices",
    "check_kv_cache_dtype",
    "default_partition",
    "normalize_dtype",
    "parse_limits",
    "preset",
    "valid_tp_degrees",
]
