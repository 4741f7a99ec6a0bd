"""What a pipeline publishes of its prefix cache for cache-aware dispatch, and its codec.

``hexgen:prefix:<model>:<pipeline>`` — a hash written by the pipeline's stage-0 leader every publishing
interval with a TTL of a few intervals (like the stage gauges), so a silent pipeline's summary vanishes:

- ``seed`` (decimal), ``block_size``: how the pipeline hashes blocks (hexgen/engine/block_hash.py);
- ``room``: how many more requests it can take now (max_num_seqs less those running and waiting);
- ``hashes``: up to :data:`MAX_SUMMARY_HASHES` block hashes it holds (in use first, then the most recently
  released), packed as little-endian unsigned 64-bit integers.

Everything read back is capped and checked before it is used (a summary is untrusted like any Redis value).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hexgen.wire.protocol import ProtocolError
from hexgen.wire.text import as_text

PREFIX_SUMMARY_PREFIX = "hexgen:prefix:"
MAX_SUMMARY_HASHES = 8192  # 64 KiB a pipeline
PREFER_FIELD = "prefer"  # work-item field: the pipeline the head offers the request to first


def prefix_summary_key(model: str, pipeline_id: str) -> str:
    return f"{PREFIX_SUMMARY_PREFIX}{model}:{pipeline_id}"


def handover_stream(model: str, pipeline_id: str) -> str:
    """Wake-up stream of one pipeline: an entry here means work was handed to it (its read returns at once)."""
    return f"{PREFIX_SUMMARY_PREFIX}{model}:{pipeline_id}:handover"


def prefix_summary_pattern(model: str) -> str:
    return f"{PREFIX_SUMMARY_PREFIX}{model}:*"


@dataclass(frozen=True)
class PrefixSummary:
    pipeline: str
    seed: int
    block_size: int
    room: int
    hashes: frozenset[int]


def encode_summary(seed: int, block_size: int, room: int, hashes: list[int]) -> dict[str, str | bytes]:
    hashes = hashes[:MAX_SUMMARY_HASHES]
    return {
        "seed": str(int(seed)),
        "block_size": str(int(block_size)),
        "room": str(max(0, int(room))),
        "hashes": struct.pack(f"<{len(hashes)}Q", *hashes),
    }


def decode_summary(pipeline_id: str, fields: Mapping[Any, Any]) -> PrefixSummary:
    """A summary hash read back; ProtocolError when a field is missing or malformed."""
    f = {as_text(k): v for k, v in fields.items()}
    try:
        seed, block_size, room = (int(as_text(f[k])) for k in ("seed", "block_size", "room"))
    except (KeyError, ValueError) as e:
        raise ProtocolError(f"prefix summary {pipeline_id!r}: seed, block_size and room must be integers") from e
    raw = f.get("hashes", b"")
    raw = raw.encode("latin-1") if isinstance(raw, str) else raw
    if len(raw) % 8 or len(raw) > 8 * MAX_SUMMARY_HASHES or not 1 <= block_size <= 1024:
        raise ProtocolError(f"prefix summary {pipeline_id!r}: malformed hashes or block_size")
    return PrefixSummary(pipeline_id, seed, block_size, room, frozenset(struct.unpack(f"<{len(raw) // 8}Q", raw)))
