"""Make a GPU behave like a smaller, slower one: fewer SMs (CUDA green contexts) and a memory cap.

Used to measure asymmetric layouts and the planner on identical H100s (see docs/planner.md). Set
``EngineConfig.emulate_devices`` (``--emulate-devices``) to a comma-separated list of
``<global rank>=<SMs>:<GiB>`` entries, e.g. ``2=40:24,3=16:16`` (rank 2 gets 40 SMs and 24 GiB, rank 3 16 SMs
and 16 GiB; 0 leaves that resource alone). Ranks not listed run on the whole GPU.

Inside :func:`limited_device` every kernel this thread launches on the current stream goes to a stream of a
green context holding only the requested SMs; NCCL launches its kernels on its own streams, so collectives
still use every SM (a documented approximation). The memory cap goes through
``torch.cuda.set_per_process_memory_fraction`` and :func:`memory_cap` reports it so KV sizing uses the cap
instead of the card's size.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from hexgen.config import DeviceLimit, parse_limits

__all__ = ["DeviceLimit", "limited_device", "memory_cap", "parse_limits"]

log = logging.getLogger(__name__)

_caps: dict[int, int] = {}  # device index -> bytes cap, set by limited_device for this process


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
def limited_device(limit: DeviceLimit | None, device: torch.device) -> Iterator[DeviceLimit | None]:
    """Run the body on ``device`` cut down to ``limit`` (``EngineConfig.device_limit(rank)``); as is when
    ``limit`` is None or the device is not a GPU."""
    if device.type != "cuda":
        limit = None
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
