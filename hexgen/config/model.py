"""The model's configuration: its shapes from config.json or a preset, dtypes and the valid TP degrees."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from hexgen.errors import ConfigError
from hexgen.quantization import WEIGHT_FORMATS, checkpoint_format

DTYPES = ("float32", "float16", "bfloat16")
KV_CACHE_DTYPES = ("auto", "fp8")  # "auto": the model's dtype; "fp8": e4m3 (hexgen.kernels.kv_quant)
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


def normalize_dtype(name: str) -> str:
    """Map fp32/fp16/bf16 spellings onto torch dtype names; raise ConfigError otherwise."""
    key = _DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DTYPES:
        raise ConfigError(f"dtype: {name!r} is not supported; use one of fp32, fp16, bf16")
    return key


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family model, read from a Hugging Face config.json or a preset."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # llama3 scaling params, sorted (key, value)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    quantization: str = "none"  # the decoder linears' weights: "none" (the model dtype) or "fp8" (hexgen.quantization)

    def __post_init__(self) -> None:
        if self.quantization not in WEIGHT_FORMATS:
            raise ConfigError(f"model config quantization: {self.quantization!r} must be one of {WEIGHT_FORMATS}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"model config {name}: {v!r} must be a positive integer")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"model config hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_heads}; set head_dim"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config num_key_value_heads {self.num_kv_heads} must divide num_attention_heads {self.num_heads}"
            )
        scaling = dict(self.rope_scaling)
        rtype = scaling.get("rope_type", scaling.get("type", "default"))
        if rtype not in ("default", "llama3", None):
            raise ConfigError(f"model config rope_scaling type {rtype!r} is not supported; supported: default, llama3")

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face LlamaConfig dict (old rope_theta/rope_scaling or new rope_parameters)."""
        arch = d.get("model_type", "llama")
        if arch not in ("llama", "mistral"):
            raise ConfigError(f"model config model_type {arch!r} is not supported; expected 'llama'")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ConfigError(f"model config {flag}: true is not supported (Llama checkpoints have no biases)")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"model config hidden_act {d['hidden_act']!r} is not supported; expected 'silu'")
        rope_params = d.get("rope_parameters") or {}
        rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or {}
        if not scaling and rope_params.get("rope_type", "default") not in ("default", None):
            scaling = rope_params
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type")) in ("default", None):
            scaling = {}
        eos = d.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]),
            num_kv_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
            head_dim=int(d.get("head_dim") or 0),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            rope_scaling=tuple(sorted(scaling.items())),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            quantization=checkpoint_format(d.get("quantization_config")),
        )

    @classmethod
    def from_dir(cls, model_dir: str) -> ModelConfig:
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"model: {model_dir!r} has no config.json (expected a Hugging Face model directory)")
        with open(path, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f))


LLAMA31_ROPE: tuple[tuple[str, Any], ...] = tuple(
    sorted(
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }.items()
    )
)

# Exact-name presets: real Llama-2 and Llama-3.1 shapes for benchmarks with --random-weights, and tiny ones for tests.
PRESETS: dict[str, ModelConfig] = {
    "llama-2-7b": ModelConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        max_position_embeddings=4096,
    ),
    "llama-2-13b": ModelConfig(
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_layers=40,
        num_heads=40,
        num_kv_heads=40,
        max_position_embeddings=4096,
    ),
    "llama-2-70b": ModelConfig(
        vocab_size=32000,
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        max_position_embeddings=4096,
    ),
    # Llama-3.1 (meta-llama/Llama-3.1-8B, -70B config.json): GQA with 8 KV heads, vocab 128,256, rope theta
    # 500,000 with llama3 scaling (factor 8 over an original 8,192-token context), 131,072 positions.
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        rope_theta=500000.0,
        rope_scaling=LLAMA31_ROPE,
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_ids=(128001,),
    ),
    "llama-3.1-70b": ModelConfig(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        rope_theta=500000.0,
        rope_scaling=LLAMA31_ROPE,
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_ids=(128001,),
    ),
    "tiny": ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_layers=6,
        num_heads=8,
        num_kv_heads=2,
        max_position_embeddings=1024,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"preset: {name!r} is unknown; choose one of {', '.join(sorted(PRESETS))}") from None


def valid_tp_degrees(cfg: ModelConfig, limit: int = 64) -> list[int]:
    """TP degrees this model supports: they divide the query heads, and KV heads shard or replicate evenly."""
    out = []
    for tp in range(1, min(cfg.num_heads, limit) + 1):
        if cfg.num_heads % tp:
            continue
        if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
            continue
        out.append(tp)
    return out
