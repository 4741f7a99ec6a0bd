"""One-shot all-reduce through PyTorch symmetric memory, for the small all-reduces of decode steps.

Each rank of a TP group maps its peers' buffer (CUDA IPC between the GPUs of one host); one kernel copies
the local partial sums in, waits for its peers and reads their copies: for the few KB of a decode step's
all-reduce about half NCCL's time inside a CUDA graph on two NVLinked GPUs, and no NCCL work inside the
captured graph. NVLink multicast is never used (TORCH_SYMM_MEM_DISABLE_MULTICAST=1 on the lent machines).
PyTorch implements it for bf16 and fp32 only.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DTYPES = (torch.bfloat16, torch.float32)


class OneShotAllReduce:
    """A symmetric buffer of ``max_elems`` elements of ``dtype`` on every rank of ``group``; constructed
    collectively by every rank of the group. ``__call__`` returns the sum (a new tensor)."""

    def __init__(self, group: dist.ProcessGroup, max_elems: int, dtype: torch.dtype, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm

        if dtype not in DTYPES:
            raise ValueError(f"one-shot all-reduce: dtype {dtype} not in {DTYPES}")
        self.name = group.group_name
        enable = getattr(symm, "enable_symm_mem_for_group", None)
        if enable is not None:  # needed by older PyTorch; deprecated (a no-op) in newer
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                enable(self.name)
        self.dtype = dtype
        self.max_elems = max_elems
        self.buf = symm.empty(max_elems, dtype=dtype, device=device)  # [max_elems]
        symm.rendezvous(self.buf, self.name)
        self._copy_op: Callable[..., Any] | None
        try:  # copies the local input into the buffer inside the all-reduce kernel (newer PyTorch)
            self._copy_op = torch.ops.symm_mem.one_shot_all_reduce_copy
        except (AttributeError, RuntimeError):
            self._copy_op = None

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == self.dtype and x.numel() <= self.max_elems and x.is_contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        buf = self.buf[:n]
        if self._copy_op is not None:
            out = self._copy_op(buf, x.view(-1), "sum", self.name)
        else:
            buf.copy_(x.view(-1))
            out = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", self.name)
        return out.view(x.shape)

    def check(self, group: dist.ProcessGroup, device: torch.device) -> None:
        """Compare against an fp32 NCCL sum of the same inputs, which differ per rank; RuntimeError when the
        result is off by more than summation in ``dtype`` in any order can be (world x eps x the sum of
        magnitudes: bf16 sums over 4 ranks legitimately differ from NCCL's by a few roundings). Collective."""
        g = torch.Generator(device=device).manual_seed(1234 + dist.get_rank(group))
        world = dist.get_world_size(group)
        eps = torch.finfo(self.dtype).eps
        for n in sorted({min(self.max_elems, 4096), self.max_elems}):
            x = torch.randn(n, generator=g, device=device).to(self.dtype)  # [n]
            exact = x.float()
            magnitude = exact.abs()
            dist.all_reduce(exact, group=group)
            dist.all_reduce(magnitude, group=group)
            err = (self(x).float() - exact).abs()  # [n]
            bound = world * eps * magnitude + 1e-6
            if bool((err > bound).any()):
                worst = int((err - bound).argmax())
                raise RuntimeError(
                    f"one-shot all-reduce differs from NCCL by {err[worst]:.4g} where summation "
                    f"error allows {bound[worst]:.4g}"
                )
        torch.cuda.synchronize(device)
