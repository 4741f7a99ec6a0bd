"""Whether the Triton kernels can run here: one cached check that every kernel module asks."""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def triton_importable() -> bool:
    """Whether triton imports here (with or without a GPU)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """Whether Triton runs its kernels in its interpreter (its own ``TRITON_INTERPRET`` switch, read through
    Triton's knobs): there, PDL's grid-dependency calls do not exist and bf16 products need fp32 dots."""
    if not triton_importable():
        return False
    from triton import knobs

    return bool(knobs.runtime.interpret)
