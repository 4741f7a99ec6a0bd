"""Make a GPU behave like a smaller, slower one: fewer SMs (CUDA green contexts) and a memory cap.

Used to measure asymmetric layouts and the planner on identical H100s (see docs/planner.md). Set
``HEXGEN_EMULATE_DEVICES`` to a comma-separated list of ``<global rank>=<SMs>:<GiB>`` entries, e.g.
``2=40:24,3=16:16`` (rank 2 gets 40 SMs and 24 GiB, rank 3 16 SMs and 16 GiB; 0 leaves that resource
alone). Ranks not listed run on the whole GPU.

Inside :func:`limited_device` every kernel this thread launches on the current stream goes to a stream of a
green context holding only the requested SMs; NCCL launches its kernels on its own streams, so collectives
still use every SM (a documented approximation). The memory cap goes through
``torch.cuda.set_per_process_memory_fraction`` and :func:`memory_cap` reports it so KV sizing uses the cap
instead of the card's size.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hexgen.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "HEXGEN_EMULATE_DEVICES"
_caps: dict[int, int] = {}  # device index -> bytes cap, set by limited_device for this process


@dataclass(frozen=True)
class DeviceLimit:
    """What one rank's GPU is cut down to: ``sms`` streaming multiprocessors (0: all), ``memory_gib`` (0: all)."""

    sms: int = 0
    memory_gib: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.sms, bool) or not isinstance(self.sms, int) or self.sms < 0:
            raise ConfigError(f"{ENV}: SM count {self.sms!r} must be an integer ≥ 0 (0: all SMs)")
        if not self.memory_gib >= 0:
            raise ConfigError(f"{ENV}: memory {self.memory_gib!r} GiB must be ≥ 0 (0: the whole card)")


def parse_limits(text: str) -> dict[int, DeviceLimit]:
    """``"2=40:24,3=16:16"`` → {2: DeviceLimit(40, 24.0), 3: DeviceLimit(16, 16.0)}."""
    out: dict[int, DeviceLimit] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        rank, sep, rest = item.partition("=")
        sms, sep2, mem = rest.partition(":")
        try:
            if not sep or not sep2:
                raise ValueError(item)
            out[int(rank)] = DeviceLimit(int(sms), float(mem))
        except ValueError as e:
            raise ConfigError(f"{ENV}: {item!r} must look like <rank>=<SMs>:<GiB>, e.g. 2=40:24") from e
    return out


def memory_cap(device: torch.device) -> int | None:
    """Bytes this process may use on ``device`` when emulation capped it, else None."""
    return _caps.get(device.index if device.index is not None else torch.cuda.current_device())


def _green_stream(device: torch.device, sms: int) -> torch.cuda.ExternalStream:
    from cuda.bindings import driver as drv  # shipped with the CUDA builds of torch

    def ok(result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != drv.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"green context setup failed: {err}")
        return rest[0] if len(rest) == 1 else rest

    ok(drv.cuInit(0))
    dev = ok(drv.cuDeviceGet(device.index))
    res = ok(drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
    groups, _n, _rest = ok(drv.cuDevSmResourceSplitByCount(1, res, 0, sms))
    group = groups[0] if isinstance(groups, (list, tuple)) else groups
    desc = ok(drv.cuDevResourceGenerateDesc([group], 1))
    ctx = ok(drv.cuGreenCtxCreate(desc, dev, drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
    stream = ok(drv.cuGreenCtxStreamCreate(ctx, drv.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
    log.info("emulation: %s limited to %d of %d SMs", device, group.sm.smCount, res.sm.smCount)
    return torch.cuda.ExternalStream(int(stream), device=device)


@contextlib.contextmanager
def limited_device(rank: int, device: torch.device) -> Iterator[DeviceLimit | None]:
    """Run the body on a cut-down ``device`` when ``HEXGEN_EMULATE_DEVICES`` lists ``rank``; else as is."""
    limit = parse_limits(os.environ.get(ENV, "")).get(rank) if device.type == "cuda" else None
    if limit is None:
        yield None
        return
    if limit.memory_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        cap = min(total, int(limit.memory_gib * (1 << 30)))
        torch.cuda.set_per_process_memory_fraction(cap / total, device)
        _caps[device.index] = cap
        log.info("emulation: %s capped at %.1f GiB", device, cap / (1 << 30))
    try:
        if limit.sms:
            with torch.cuda.stream(_green_stream(device, limit.sms)):
                yield limit
        else:
            yield limit
    finally:
        if _caps.pop(device.index, None) is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
