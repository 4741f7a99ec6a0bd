"""The engine's settings: kernel choices, device limits and the KV cache, validated up front."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from hexgen.config.model import KV_CACHE_DTYPES, normalize_dtype
from hexgen.errors import ConfigError
from hexgen.quantization import check_quantization

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
KERNEL_CHOICES: dict[str, tuple[str, ...]] = {
    "gemv": ("triton", "auto", "cublas"),
    "all_reduce": ("symm", "nccl"),
    "fp8_gemv": ("auto", "bits", "convert"),
}
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
    # decode graphs of 128+ rows as two nano-batches on two streams, one's attention beside the other's GEMMs
    # (CUDA, TP 1 stages; hexgen.engine.nano_batch)
    overlap: bool = False
    fp8_gemv: str = "auto"  # fp8 weights' GEMV: e4m3 decoded by integer ops ("bits"), conversions, or either by timing

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
    async_steps_tp: bool = False  # the same for one-stage TP > 1 pipelines (opt-in there)
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
    prefix_cache: bool = True  # reuse the K/V of full blocks of earlier requests' prefixes (engine.kv_cache)

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
        if not isinstance(self.prefix_cache, bool):
            raise ConfigError(f"prefix_cache: {self.prefix_cache!r} must be true or false")
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
