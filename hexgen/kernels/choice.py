"""The kernel choices a stage runs with: its ``KernelConfig`` resolved once for its device.

``resolve`` turns off what cannot run on the device (the Triton kernels without CUDA or without triton,
PDL below compute capability 9.0 or under Triton's interpreter, the CPU weight layout on GPUs, the
two-stream decode off CUDA), so the layers read plain booleans and never look at the device or the
environment again.
"""

from __future__ import annotations

import dataclasses

import torch

from hexgen.config import KernelConfig
from hexgen.kernels import pdl
from hexgen.kernels.support import triton_importable

# Every fast path off: the PyTorch reference math (CPU, and tests that build a stage by hand).
REFERENCE = KernelConfig(
    gemv="cublas",
    fused=False,
    pdl=False,
    decode_kernel=False,
    prefill_kernel=False,
    all_reduce="nccl",
    cpu_layout=False,
    decode_groups=True,
    overlap=False,
)


def resolve(cfg: KernelConfig, device: torch.device) -> KernelConfig:
    """What of ``cfg`` runs on ``device``."""
    triton = device.type == "cuda" and triton_importable()
    return dataclasses.replace(
        cfg,
        gemv=cfg.gemv if triton else "cublas",
        fused=cfg.fused and triton,
        pdl=cfg.pdl and triton and pdl.supported(device),
        decode_kernel=cfg.decode_kernel and triton,
        prefill_kernel=cfg.prefill_kernel and triton,
        all_reduce=cfg.all_reduce if device.type == "cuda" else "nccl",
        cpu_layout=cfg.cpu_layout and device.type == "cpu",
        overlap=cfg.overlap and device.type == "cuda",
    )
