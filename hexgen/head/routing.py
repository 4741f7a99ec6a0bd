"""Cache-aware dispatch, the head's half: which pipeline to offer a request to first.

The head already has the request's token ids. For each pipeline whose prefix summary is fresh
(hexgen/wire/prefix_summary.py: TTL'd, so a silent pipeline drops out) and that has room, it counts how many
leading full blocks of the prompt the pipeline holds (hashes chained as the engine chains them,
hexgen/engine/block_hash.py) and names the pipeline with the longest match in the work item's ``prefer``
field. The pipelines do the rest (workers/routing.py): whoever reads the entry hands it to the preferred
pipeline when that one is still live and has room, else keeps it, so pull-by-capacity, leases, take-over and
exactly-once delivery work as before. Summaries are re-read at most every ``refresh_s``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from redis.exceptions import ResponseError

from hexgen.engine.block_hash import block_hashes
from hexgen.wire.prefix_summary import PREFIX_SUMMARY_PREFIX, PrefixSummary, decode_summary, prefix_summary_pattern
from hexgen.wire.protocol import ProtocolError
from hexgen.wire.text import as_text

log = logging.getLogger(__name__)


def matched_blocks(tokens: list[int], summary: PrefixSummary) -> int:
    """Leading full blocks of ``tokens`` (all but the last token, as the engine looks them up) it holds."""
    n = 0
    for h in block_hashes(tokens[: max(0, len(tokens) - 1)], summary.block_size, summary.seed):
        if h not in summary.hashes:
            break
        n += 1
    return n


def pick(tokens: list[int], summaries: list[PrefixSummary]) -> str | None:
    """The pipeline holding the longest prefix of ``tokens`` with room (ties: more room), or None."""
    best: tuple[int, int, str] | None = None
    for s in summaries:
        if s.room <= 0:
            continue
        n = matched_blocks(tokens, s)
        if n and (best is None or (n, s.room) > best[:2]):
            best = (n, s.room, s.pipeline)
    return best[2] if best else None


class PrefixRouter:
    """Keeps the model's pipelines' summaries (re-read at most every ``refresh_s``) and picks one."""

    def __init__(self, redis: Any, model: str, refresh_s: float = 1.0) -> None:
        self.redis, self.model, self.refresh_s = redis, model, refresh_s
        self._summaries: list[PrefixSummary] = []
        self._read_at = float("-inf")
        self.routed = 0  # requests given a preferred pipeline

    async def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._read_at < self.refresh_s:
            return
        self._read_at = now
        out = []
        prefix = f"{PREFIX_SUMMARY_PREFIX}{self.model}:"
        async for key in self.redis.scan_iter(match=prefix_summary_pattern(self.model), count=100):
            k = as_text(key)
            if k.endswith(":handover"):
                continue
            try:
                fields = await self.redis.hgetall(k)
                if fields:  # not expired since the scan
                    out.append(decode_summary(k[len(prefix) :], fields))
            except (ProtocolError, ResponseError) as e:
                log.warning("head: %s", e)
        self._summaries = out

    async def prefer(self, tokens: list[int]) -> str | None:
        """The pipeline to offer ``tokens`` to first, or None (plain pull by capacity)."""
        await self._refresh()
        choice = pick(tokens, self._summaries) if self._summaries else None
        self.routed += choice is not None
        return choice
