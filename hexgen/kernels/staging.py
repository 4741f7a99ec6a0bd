"""Host → device uploads that do not make the host wait for the device.

A copy from pageable host memory synchronizes the stream before it starts, so the host would wait for every
kernel already enqueued: the asynchronous step loop (hexgen/engine/pipeline.py) enqueues step N+1 while step N
runs and must not wait there. The data goes through pinned memory instead (torch's caching host allocator
keeps a pinned block alive until the copy that reads it has run).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def upload(
    values: Sequence[int] | Sequence[float] | np.ndarray | torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``values`` as a 1-D or n-D tensor of ``dtype`` on ``device``, copied without a host sync on CUDA."""
    if isinstance(values, torch.Tensor):
        host = values.to(dtype)
    elif isinstance(values, np.ndarray):
        host = torch.from_numpy(values).to(dtype)
    else:
        host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
