"""Chained hashes of full KV blocks: the keys of the prefix cache (hexgen.engine.kv_cache) and of the
summaries pipelines publish for cache-aware dispatch (the head computes a request's hashes the same way).

Block i's hash covers block i's token ids and block i-1's hash, so equal hashes mean equal token prefixes,
not just equal blocks. The chain starts from a seed that hashes everything else that changes a block's
contents: the model, its dtype and the KV cache dtype. Hashes are 64-bit BLAKE2b digests of fixed-width
integers: the same on every host and in every process (Python's ``hash`` is not, for strings).

Imports no torch: the head uses it.
"""

from __future__ import annotations

from array import array
from hashlib import blake2b

MASK = (1 << 64) - 1


def prefix_seed(model: str, dtype: str, kv_cache_dtype: str) -> int:
    """The chain's seed for blocks computed by ``model`` (a name or preset) with these dtypes."""
    text = f"hexgen-prefix-v1|{model}|{dtype}|{kv_cache_dtype}".encode()
    return int.from_bytes(blake2b(text, digest_size=8).digest(), "little")


def chain(parent: int, tokens: list[int]) -> int:
    """The hash of one full block of ``tokens`` following the block hashed ``parent`` (or the seed)."""
    data = (parent & MASK).to_bytes(8, "little") + array("q", tokens).tobytes()
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little")


def extend_hashes(hashes: list[int], tokens: list[int], block_size: int, seed: int, num_blocks: int) -> list[int]:
    """Append to ``hashes`` (those of the first blocks of ``tokens``) until it has ``num_blocks`` entries,
    at most as many as ``tokens`` has full blocks; returns ``hashes``."""
    num_blocks = min(num_blocks, len(tokens) // block_size)
    parent = hashes[-1] if hashes else seed
    for i in range(len(hashes), num_blocks):
        parent = chain(parent, tokens[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


def block_hashes(tokens: list[int], block_size: int, seed: int) -> list[int]:
    """The hashes of every full block of ``tokens``."""
    return extend_hashes([], tokens, block_size, seed, len(tokens) // block_size)
