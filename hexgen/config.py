"""Model and parallel-layout configuration, validated before any process starts."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from hexgen.errors import ConfigError
from hexgen.quantization import WEIGHT_FORMATS, check_quantization, checkpoint_format

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


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: its TP degree, its layers [layer_start, layer_end), its global ranks."""

    index: int
    tp: int
    layer_start: int
    layer_end: int
    first_rank: int
    num_stages: int

    @property
    def ranks(self) -> list[int]:
        return list(range(self.first_rank, self.first_rank + self.tp))

    @property
    def leader(self) -> int:
        return self.first_rank

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start


def default_partition(num_layers: int, hetero: tuple[int, ...]) -> tuple[int, ...]:
    """Split layers in proportion to each stage's TP degree (largest remainders; every stage ≥ 1)."""
    total = sum(hetero)
    raw = [num_layers * t / total for t in hetero]
    parts = [max(1, int(r)) for r in raw]
    order = sorted(range(len(hetero)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    i = 0
    while sum(parts) < num_layers:
        parts[order[i % len(order)]] += 1
        i += 1
    while sum(parts) > num_layers:
        j = max(range(len(parts)), key=lambda k: parts[k])
        parts[j] -= 1
    return tuple(parts)


@dataclass(frozen=True)
class Layout:
    """A pipeline layout: TP degree per stage (hetero_config) and layers per stage (pp_partition)."""

    hetero_config: tuple[int, ...]
    pp_partition: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.hetero_config:
            raise ConfigError("hetero-config: give at least one TP degree (e.g. --hetero-config 2 1)")
        for t in self.hetero_config:
            if not isinstance(t, int) or t < 1:
                raise ConfigError(f"hetero-config: TP degree {t!r} must be an integer ≥ 1")
        if len(self.pp_partition) != len(self.hetero_config):
            raise ConfigError(
                f"pp-partition: {len(self.pp_partition)} stages given but hetero-config has "
                f"{len(self.hetero_config)}; give one layer count per stage"
            )
        for n in self.pp_partition:
            if not isinstance(n, int) or n < 1:
                raise ConfigError(
                    f"pp-partition: layer count {n!r} must be an integer ≥ 1 (every stage needs at least one layer)"
                )

    @classmethod
    def build(
        cls,
        model: ModelConfig,
        hetero_config: list[int] | tuple[int, ...] | None,
        pp_partition: list[int] | tuple[int, ...] | None = None,
    ) -> Layout:
        """Validate a layout against a model; the partition defaults to layers in proportion to TP."""
        hetero = tuple(int(t) for t in (hetero_config or (1,)))
        for t in hetero:
            if t < 1:
                raise ConfigError(f"hetero-config: TP degree {t} must be ≥ 1")
        if pp_partition is None:
            if len(hetero) > model.num_layers:
                raise ConfigError(
                    f"hetero-config: {len(hetero)} stages but the model has only {model.num_layers} layers"
                )
            part = default_partition(model.num_layers, hetero)
        else:
            part = tuple(int(n) for n in pp_partition)
        layout = cls(hetero, part)
        layout.check(model)
        return layout

    def check(self, model: ModelConfig) -> None:
        if sum(self.pp_partition) != model.num_layers:
            raise ConfigError(
                f"pp-partition: {' '.join(map(str, self.pp_partition))} sums to "
                f"{sum(self.pp_partition)} but the model has {model.num_layers} layers"
            )
        valid = valid_tp_degrees(model)
        for t in self.hetero_config:
            if t not in valid:
                raise ConfigError(
                    f"hetero-config: TP degree {t} is not valid for this model "
                    f"({model.num_heads} query heads, {model.num_kv_heads} KV heads); "
                    f"valid degrees: {', '.join(map(str, valid))}"
                )

    @property
    def world_size(self) -> int:
        return sum(self.hetero_config)

    @property
    def num_stages(self) -> int:
        return len(self.hetero_config)

    def stages(self) -> list[StageSpec]:
        out, layer, rank = [], 0, 0
        for i, (tp, n) in enumerate(zip(self.hetero_config, self.pp_partition)):
            out.append(StageSpec(i, tp, layer, layer + n, rank, len(self.hetero_config)))
            layer += n
            rank += tp
        return out

    def stage_of_rank(self, rank: int) -> StageSpec:
        for s in self.stages():
            if s.first_rank <= rank < s.first_rank + s.tp:
                return s
        raise ConfigError(f"rank {rank} is outside world size {self.world_size}")

    def describe(self) -> str:
        return (
            f"hetero-config {' '.join(map(str, self.hetero_config))} / pp-partition "
            f"{' '.join(map(str, self.pp_partition))}"
        )


def check_devices(layout: Layout, device: str, available: int) -> None:
    """World size must fit the local devices when running on GPUs."""
    if device == "cuda" and layout.world_size > available:
        raise ConfigError(
            f"hetero-config: world size {layout.world_size} (sum of TP degrees) needs "
            f"{layout.world_size} GPUs but {available} are available"
        )


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
KERNEL_CHOICES: dict[str, tuple[str, ...]] = {"gemv": ("triton", "auto", "cublas"), "all_reduce": ("symm", "nccl")}
_ON = ("on", "true", "1", "yes")
_OFF = ("off", "false", "0", "no")


@dataclass(frozen=True)
class KernelConfig:
    """Which implementation each hot path takes. The defaults are the fast paths; each can be turned off for
    A/B runs against the PyTorch reference. A stage resolves it once for its device
    (``hexgen.kernels.choice.resolve``: what cannot run there is turned off) and hands it to the layers.

    Set on the command line as ``--kernel NAME=VALUE`` (repeatable, e.g. ``--kernel gemv=cublas --kernel
    fused=off``) or in a deployment file's ``[kernels]`` table.
    """

    gemv: str = "triton"  # batch-1 linears: the Triton GEMV ("triton"), that or cuBLAS by timing ("auto"), "cublas"
    fused: bool = True  # fused add + RMSNorm, rotary + KV write, SiLU * up (Triton, CUDA)
    pdl: bool = True  # programmatic dependent launch of the Triton kernels inside CUDA graphs (Hopper and later)
    decode_kernel: bool = True  # Triton paged-attention decode kernel (CUDA); off: the PyTorch gather path
    prefill_kernel: bool = True  # Triton paged-attention prefill kernel (CUDA); off: SDPA per sequence
    all_reduce: str = "symm"  # TP all-reduces of decode size: one-shot symmetric memory ("symm") or "nccl" only
    cpu_layout: bool = True  # CPU: each linear shape's weights in the storage order its one-row GEMV reads fastest
    decode_groups: bool = True  # reference decode path: 16+ rows attended in groups of similar context

    def __post_init__(self) -> None:
        for name, allowed in KERNEL_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"kernels.{name}: {getattr(self, name)!r} is not allowed; choose one of {', '.join(allowed)}"
                )
        for f in fields(self):
            if f.name not in KERNEL_CHOICES and not isinstance(getattr(self, f.name), bool):
                raise ConfigError(f"kernels.{f.name}: {getattr(self, f.name)!r} must be on or off (true or false)")

    @classmethod
    def from_dict(cls, table: Mapping[str, Any], key: str = "kernels") -> KernelConfig:
        """From a mapping of setting names to values (a TOML ``[kernels]`` table, or parsed flags); booleans
        may also be given as on/off, true/false, yes/no, 1/0."""
        names = [f.name for f in fields(cls)]
        out: dict[str, Any] = {}
        for name, value in table.items():
            if name not in names:
                raise ConfigError(f"{key}: {name!r} is not a kernel setting; choose one of {', '.join(names)}")
            if name not in KERNEL_CHOICES and isinstance(value, (str, int)) and not isinstance(value, bool):
                text = str(value).lower()
                if text not in _ON + _OFF:
                    raise ConfigError(f"{key}.{name}: {value!r} must be on or off (true or false)")
                value = text in _ON
            out[name] = value
        return cls(**out)

    @classmethod
    def from_flags(cls, items: list[str] | tuple[str, ...] | None) -> KernelConfig:
        """From ``--kernel NAME=VALUE`` flags; later flags win."""
        table: dict[str, str] = {}
        for item in items or ():
            name, sep, value = item.partition("=")
            if not sep or not name.strip() or not value.strip():
                raise ConfigError(f"--kernel: {item!r} must look like NAME=VALUE, e.g. gemv=cublas or fused=off")
            table[name.strip().replace("-", "_")] = value.strip()
        return cls.from_dict(table, key="--kernel")

    def describe(self) -> str:
        """``gemv=triton fused=on ...``: every setting, as the ``--kernel`` flags spell them."""

        def text(v: Any) -> str:
            return ("on" if v else "off") if isinstance(v, bool) else str(v)

        return " ".join(f"{f.name}={text(getattr(self, f.name))}" for f in fields(self))


@dataclass(frozen=True)
class DeviceLimit:
    """What one rank's GPU is cut down to (``hexgen.engine.emulation``): ``sms`` streaming multiprocessors
    (0: all), ``memory_gib`` (0: the whole card)."""

    sms: int = 0
    memory_gib: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.sms, bool) or not isinstance(self.sms, int) or self.sms < 0:
            raise ConfigError(f"emulate_devices: SM count {self.sms!r} must be an integer ≥ 0 (0: all SMs)")
        if not self.memory_gib >= 0:
            raise ConfigError(f"emulate_devices: memory {self.memory_gib!r} GiB must be ≥ 0 (0: the whole card)")


def parse_limits(text: str) -> dict[int, DeviceLimit]:
    """``"2=40:24,3=16:16"`` → {2: DeviceLimit(40, 24.0), 3: DeviceLimit(16, 16.0)}: global rank = SMs:GiB."""
    out: dict[int, DeviceLimit] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        rank, sep, rest = item.partition("=")
        sms, sep2, mem = rest.partition(":")
        try:
            if not sep or not sep2:
                raise ValueError(item)
            out[int(rank)] = DeviceLimit(int(sms), float(mem))
        except ValueError as e:
            raise ConfigError(f"emulate_devices: {item!r} must look like <rank>=<SMs>:<GiB>, e.g. 2=40:24") from e
    return out


def _device_limits(value: Any) -> tuple[tuple[int, DeviceLimit], ...]:
    """``EngineConfig.emulate_devices`` from text (``parse_limits``), a mapping or pairs: sorted pairs."""
    limits = dict(parse_limits(value) if isinstance(value, str) else value)
    for rank, limit in limits.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0 or not isinstance(limit, DeviceLimit):
            raise ConfigError(f"emulate_devices: {rank!r}: {limit!r} must map a global rank ≥ 0 to a DeviceLimit")
    return tuple(sorted(limits.items()))


def check_kv_cache_dtype(value: str) -> None:
    """ConfigError naming the field and the choices unless ``value`` is one of KV_CACHE_DTYPES."""
    if value not in KV_CACHE_DTYPES:
        raise ConfigError(f"kv_cache_dtype: {value!r} must be one of {', '.join(KV_CACHE_DTYPES)}")


@dataclass(frozen=True)
class EngineConfig:
    """Engine knobs shared by every rank of a pipeline."""

    dtype: str = "float32"
    device: str = "cpu"  # "cpu" or "cuda"
    block_size: int = 16
    num_kv_blocks: int = 0  # 0: size from memory (GPU) or from max_num_tokens (CPU)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per step: chunked prefill budget
    max_model_len: int = 0  # 0: the model's max_position_embeddings
    gpu_memory_fraction: float = 0.9
    cpu_kv_tokens: int = 65536  # KV capacity in tokens on CPU when num_kv_blocks is 0
    micro_batches: int = 0  # 0: one per stage
    cuda_graphs: bool = False
    async_steps: bool = True  # one-stage TP 1 pipelines: enqueue step N+1 before step N's ids reach the host
    async_steps_tp: bool = False  # the same for one-stage TP > 1 pipelines (opt-in: not yet measured under load)
    seed: int = 0  # random-weight initialisation seed
    collect_logits: bool = False  # attach float32 logits to every StepOutput (tests, debugging)
    kernels: KernelConfig = KernelConfig()
    # GPUs cut down to fewer SMs and less memory, per global rank (hexgen.engine.emulation); given as a
    # mapping or as text "2=40:24,3=16:16" and kept as sorted (rank, DeviceLimit) pairs
    emulate_devices: tuple[tuple[int, DeviceLimit], ...] = ()
    profile_loop: str = ""  # a file: the stage-0 leader's loop runs under cProfile and writes its profile there
    device_trace: str = ""  # a file: the stage-0 leader's device kernel timeline, summarised (engine.device_trace)
    log_level: str = "WARNING"  # of the rank processes: DEBUG, INFO, WARNING, ERROR or CRITICAL
    kv_cache_dtype: str = "auto"  # "auto": the model dtype; "fp8": e4m3 with per-layer, per-KV-head scales
    quantization: str = "auto"  # weights: "auto" the checkpoint's own format; "fp8" e4m3 (quantized at load)
    cpu_threads: int = 0  # CPU ranks: torch threads each; 0: the host's cores / its ranks (hexgen.engine.threads)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device: {self.device!r} must be 'cpu' or 'cuda'")
        if self.block_size < 1 or self.block_size > 1024:
            raise ConfigError(f"block_size: {self.block_size} must be in [1, 1024]")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs: {self.max_num_seqs} must be ≥ 1")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens: {self.max_num_batched_tokens} must be ≥ 1")
        for name in ("num_kv_blocks", "max_model_len", "micro_batches", "cpu_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: {getattr(self, name)} must be ≥ 0 (0: automatic)")
        if self.cpu_kv_tokens < 1:
            raise ConfigError(f"cpu_kv_tokens: {self.cpu_kv_tokens} must be ≥ 1")
        if not 0.05 <= self.gpu_memory_fraction <= 1.0:
            raise ConfigError(f"gpu_memory_fraction: {self.gpu_memory_fraction} must be in [0.05, 1.0]")
        check_kv_cache_dtype(self.kv_cache_dtype)
        check_quantization(self.quantization)
        self._check_process_fields()

    def _check_process_fields(self) -> None:
        """The log level, the kernel choices and the emulated devices (normalized in place)."""
        level = str(self.log_level).upper()
        if level not in LOG_LEVELS:
            raise ConfigError(f"log_level: {self.log_level!r} must be one of {', '.join(LOG_LEVELS)}")
        object.__setattr__(self, "log_level", level)
        if not isinstance(self.kernels, KernelConfig):
            raise ConfigError(f"kernels: {self.kernels!r} must be a KernelConfig (e.g. KernelConfig(gemv='cublas'))")
        object.__setattr__(self, "emulate_devices", _device_limits(self.emulate_devices))

    def device_limit(self, rank: int) -> DeviceLimit | None:
        """The emulated cut-down of global ``rank``'s GPU, or None (the whole GPU)."""
        return dict(self.emulate_devices).get(rank)
