"""Paged KV cache: the block allocator (stage 0; also driven by the planner's simulator, so this module
imports torch only where the cache storage needs it) and the cache storage (every rank)."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from hexgen.config import ModelConfig, StageSpec

if TYPE_CHECKING:
    import torch


class BlockManager:
    """Allocator of KV blocks, with the prefix cache. One instance, on the stage-0 leader, decides for every
    stage: each stage has the same number of blocks (the smallest stage's capacity), and a block id means
    the same tokens' K/V on every rank, so a block table in the step plan is all a rank needs to reuse one.

    Blocks are reference-counted. With ``prefix_cache`` on, a full block is registered under the chained
    hash of its tokens (hexgen.engine.block_hash) once its K/V is written everywhere (``register``); when
    its last holder releases it, it stays resident, unreferenced, in least-recently-used order, and a later
    sequence with the same prefix takes it again (``match``). Unreferenced cached blocks count as free:
    ``allocate`` takes never-hashed blocks first and evicts the least recently used cached ones only when
    those run out, so the cache never makes a request fail that would fit without it.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = False, seed: int = 0) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self.seed = seed  # the hash chain's seed (hexgen.engine.block_hash.prefix_seed)
        self._free = list(range(num_blocks - 1, -1, -1))  # unreferenced, holding nothing reusable
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block -> hash, registered blocks
        self._by_hash: dict[int, int] = {}  # hash -> block
        self._lru: OrderedDict[int, None] = OrderedDict()  # unreferenced registered blocks, oldest first
        self.evictions = 0  # cached blocks given to other tokens

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._lru)

    @property
    def num_cached(self) -> int:
        """Blocks registered under a hash (referenced or not)."""
        return len(self._by_hash)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free) + len(self._lru)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free) + len(self._lru):
            raise RuntimeError(f"KV cache: {n} blocks asked, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:  # evict the least recently used cached block
                b, _ = self._lru.popitem(last=False)
                del self._by_hash[self._hash_of.pop(b)]
                self.evictions += 1
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        """Release one reference to each block; a cached block left unreferenced stays resident. The last
        blocks of a sequence are released first, so they are evicted before the prefix blocks they extend."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._hash_of:
                    self._lru[b] = None
                else:
                    self._free.append(b)

    def match(self, hashes: list[int]) -> list[int]:
        """The blocks of the longest cached prefix of ``hashes`` (chained block hashes), each with one more
        reference (release them with ``free``)."""
        out: list[int] = []
        if not self.prefix_cache:
            return out
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            out.append(b)
        for b in out:
            if self._refs[b] == 0:
                del self._lru[b]
            self._refs[b] += 1
        return out

    def register(self, block: int, block_hash: int) -> None:
        """Block ``block`` (referenced) now holds the full block of tokens hashed ``block_hash`` on every
        stage. A hash already held by another block keeps that one; this block then stays private."""
        if self.prefix_cache and block_hash not in self._by_hash and block not in self._hash_of:
            self._by_hash[block_hash] = block
            self._hash_of[block] = block_hash

    def refs(self, block: int) -> int:
        return self._refs[block]

    def held_hashes(self, limit: int) -> list[int]:
        """Up to ``limit`` registered hashes: those of blocks in use, then the unreferenced ones, most recently
        released first (the summary cache-aware dispatch publishes)."""
        in_use = [h for b, h in self._hash_of.items() if self._refs[b] > 0]
        idle = [self._hash_of[b] for b in reversed(self._lru)]
        return (in_use + idle)[:limit]


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
