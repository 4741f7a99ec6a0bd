"""Built-in device specs: peak dense fp16/bf16 tensor rate, memory size and memory bandwidth.

Numbers are datasheet values (NVIDIA product pages / whitepapers, cited per entry). Peak rates are *dense* (no
2:4 sparsity) fp16/bf16 tensor-core rates with fp32 accumulation, which is what PyTorch matmuls use. Memory
sizes are the totals ``nvidia-smi`` reports (slightly under the marketing GB), so KV capacity is not overstated.
A cluster TOML may override any field or add a device (see hexgen/planner/cluster.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from hexgen.errors import ConfigError

GiB = 1 << 30
MiB = 1 << 20
GB = 1e9  # bandwidths are decimal GB/s on datasheets
TFLOPS = 1e12


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator (or a generic CPU host): name, memory, memory bandwidth and peak dense fp16/bf16 rate."""

    name: str  # canonical, e.g. "H100", "A100-80GB", "A6000", "CPU"
    memory_bytes: int  # device memory
    mem_bandwidth: float  # bytes/s (datasheet HBM/GDDR bandwidth)
    peak_flops: float  # dense fp16/bf16 tensor FLOP/s

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"device name: {self.name!r} must be a non-empty string")
        if isinstance(self.memory_bytes, bool) or not isinstance(self.memory_bytes, int) or self.memory_bytes <= 0:
            raise ConfigError(f"device {self.name} memory_bytes: {self.memory_bytes!r} must be an integer > 0")
        for field in ("mem_bandwidth", "peak_flops"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
                raise ConfigError(f"device {self.name} {field}: {v!r} must be a finite number > 0")


def _spec(name: str, memory_mib: int, bandwidth_gbs: float, tflops: float) -> DeviceSpec:
    return DeviceSpec(name, memory_mib * MiB, bandwidth_gbs * GB, tflops * TFLOPS)


# name -> spec. Sources: NVIDIA datasheets; memory = nvidia-smi total (MiB).
DEVICE_SPECS: dict[str, DeviceSpec] = {
    s.name: s
    for s in (
        # H100 SXM5 80GB: 989.4 TFLOP/s dense bf16, 3.35 TB/s HBM3 (H100 datasheet, SXM column).
        _spec("H100", 81559, 3350, 989.4),
        # H200 SXM 141GB: same compute as H100 SXM (989 dense bf16), 4.8 TB/s HBM3e (H200 datasheet).
        _spec("H200", 143771, 4800, 989.4),
        # A100 SXM4 40GB: 312 TFLOP/s dense bf16, 1,555 GB/s HBM2 (A100 datasheet).
        _spec("A100-40GB", 40960, 1555, 312),
        # A100 SXM4 80GB: 312 TFLOP/s dense bf16, 2,039 GB/s HBM2e (A100 datasheet).
        _spec("A100-80GB", 81920, 2039, 312),
        # RTX A6000: 48 GB GDDR6, 768 GB/s; 309.7 TFLOP/s fp16 tensor with sparsity -> 154.8 dense
        # (NVIDIA RTX A6000 datasheet / Ampere GA102 whitepaper).
        _spec("A6000", 49140, 768, 154.8),
        # RTX A5000: 24 GB GDDR6, 768 GB/s; 222.2 TFLOP/s tensor with sparsity -> 111.1 dense (A5000 datasheet).
        _spec("A5000", 24564, 768, 111.1),
        # RTX A4000: 16 GB GDDR6, 448 GB/s; 153.4 TFLOP/s tensor with sparsity -> 76.7 dense (A4000 datasheet).
        _spec("A4000", 16376, 448, 76.7),
        # L40S: 48 GB GDDR6, 864 GB/s; 733 TFLOP/s bf16 with sparsity -> 362.05 dense (L40S datasheet).
        _spec("L40S", 46068, 864, 362.05),
        # L4: 24 GB GDDR6, 300 GB/s; 242 TFLOP/s bf16 with sparsity -> 121 dense (L4 datasheet).
        _spec("L4", 23034, 300, 121),
        # GeForce RTX 4090: 24 GB GDDR6X, 1,008 GB/s; 165.2 TFLOP/s fp16 tensor, fp32 accumulate, dense
        # (Ada Lovelace whitepaper, appendix table).
        _spec("RTX4090", 24564, 1008, 165.2),
        # GeForce RTX 3090: 24 GB GDDR6X, 936 GB/s; 71 TFLOP/s fp16 tensor, fp32 accumulate, dense
        # (Ampere GA102 whitepaper, appendix table).
        _spec("RTX3090", 24576, 936, 71),
        # T4: 16 GB GDDR6, 320 GB/s; 65 TFLOP/s mixed fp16/fp32 (T4 datasheet).
        _spec("T4", 15360, 320, 65),
        # V100 SXM2 32GB: 125 TFLOP/s tensor (fp16), 900 GB/s HBM2 (V100 datasheet).
        _spec("V100", 32768, 900, 125),
        # Generic CPU host: dual-channel-ish DRAM ~20 GB/s achievable, ~0.5 TFLOP/s in fp32/bf16 matmuls, 64 GiB.
        # Set memory_gib (and the rest) in the cluster TOML to the host's free memory.
        DeviceSpec("CPU", 64 * GiB, 20 * GB, 0.5 * TFLOPS),
    )
}

# Devices whose GPUs talk over NVLink/NVSwitch inside a node by default (SXM boards); the rest default to PCIe.
NVLINK_DEVICES = frozenset({"H100", "H200", "A100-40GB", "A100-80GB", "V100"})


def _key(name: str) -> str:
    """Case- and punctuation-insensitive key: "a100_80gb", "A100-80GB" and "a100 80 gb" all map to "a10080gb"."""
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


# Extra spellings people write, keyed by _key(): "rtx a6000", "h100 sxm", "a100" (the 80GB part).
_ALIASES = {
    "rtxa6000": "A6000",
    "rtxa5000": "A5000",
    "rtxa4000": "A4000",
    "h100sxm": "H100",
    "h100sxm5": "H100",
    "h10080gb": "H100",
    "h200sxm": "H200",
    "h200141gb": "H200",
    "a100": "A100-80GB",
    "a100sxm": "A100-80GB",
    "v100sxm2": "V100",
    "v10032gb": "V100",
    "4090": "RTX4090",
    "geforcertx4090": "RTX4090",
    "3090": "RTX3090",
    "geforcertx3090": "RTX3090",
    "host": "CPU",
}


def device_spec(name: str, overrides: Mapping[str, DeviceSpec] | None = None) -> DeviceSpec:
    """Look a device up by name, case- and punctuation-insensitively ("a100_80gb", "rtx 4090", "h100").

    ``overrides`` (name -> spec, e.g. from a cluster TOML's ``[devices.X]`` tables) wins over the built-ins.
    Raises ConfigError listing the known names when nothing matches.
    """
    key = _key(name)
    for table in (overrides or {}, DEVICE_SPECS):
        for known, spec in table.items():
            if _key(known) == key:
                return spec
    alias = _ALIASES.get(key)
    if alias is not None:
        for known, spec in (overrides or {}).items():
            if _key(known) == _key(alias):
                return spec
        return DEVICE_SPECS[alias]
    known_names = sorted(set(DEVICE_SPECS) | set(overrides or {}))
    raise ConfigError(
        f"gpu: {name!r} is not a known device; known: {', '.join(known_names)} (or define it in a [devices.NAME] table)"
    )


# Substrings of torch.cuda.get_device_name() (normalised by _key), most specific first.
_CUDA_NAMES = (
    (("h200",), "H200"),
    (("h100",), "H100"),
    (("a100", "40gb"), "A100-40GB"),
    (("a100",), "A100-80GB"),
    (("a6000",), "A6000"),
    (("a5000",), "A5000"),
    (("a4000",), "A4000"),
    (("l40s",), "L40S"),
    (("4090",), "RTX4090"),
    (("3090",), "RTX3090"),
    (("teslat4",), "T4"),
    (("v100",), "V100"),
)


def guess_device_name(cuda_name: str) -> str | None:
    """The built-in spec name of a CUDA device name ("NVIDIA H100 80GB HBM3" -> "H100"); None when unknown."""
    key = _key(cuda_name)
    for subs, name in _CUDA_NAMES:
        if all(sub in key for sub in subs):
            return name
    return "L4" if key.endswith("l4") else None
