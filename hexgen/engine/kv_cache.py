"""Paged KV cache: the block allocator (stage 0; also driven by the planner's simulator, so this module
imports torch only where the cache storage needs it) and the cache storage (every rank)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hexgen.config import ModelConfig, StageSpec

if TYPE_CHECKING:
    import torch


class BlockManager:
    """Free-list allocator of KV blocks. One instance, on the stage-0 leader, decides for every stage:
    each stage has the same number of blocks (the smallest stage's capacity)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV cache: {n} blocks asked, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


def kv_bytes_per_block(cfg: ModelConfig, stage: StageSpec, n_kv_local: int, block_size: int, dtype: torch.dtype) -> int:
    import torch

    elem = torch.empty(0, dtype=dtype).element_size()
    return stage.num_layers * 2 * block_size * n_kv_local * cfg.head_dim * elem


def allocate_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    n_kv_local: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    import torch

    # [layers, 2 (k, v), slots, n_kv_local, head_dim]
    return torch.zeros(num_layers, 2, num_blocks * block_size, n_kv_local, head_dim, dtype=dtype, device=device)
