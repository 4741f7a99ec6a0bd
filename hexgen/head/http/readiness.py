"""Whether a model has a ready pipeline: registry state ``ready`` and every member's heartbeat alive.

:class:`Readiness` answers ``/ready`` with a fresh read and gates each generation request on a cached one
(at most ``max_age_s`` old), so a request costs no registry scan; when the cache says no, it is read again
(at most every ``min_recheck_s``) before the request is refused, so a pipeline that just became ready is
seen at once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from hexgen.head.status import read_pipelines, read_workers


@dataclass(frozen=True)
class ReadyPipeline:
    id: str
    model: str
    layout: str
    workers: int


async def ready_pipelines(redis: Any, heartbeat_ttl_s: float) -> list[ReadyPipeline]:
    """Pipelines in state ``ready`` whose registered workers all have live heartbeats, with their model."""
    workers = await read_workers(redis, heartbeat_ttl_s=heartbeat_ttl_s)
    out = []
    for p in await read_pipelines(redis, workers, []):
        if p.state != "ready" or p.workers == 0 or p.alive_workers < p.workers:
            continue
        models = {w.record.model for w in workers if w.record.pipeline == p.id}
        for model in sorted(models):
            out.append(ReadyPipeline(p.id, model, p.layout, p.workers))
    return out


class Readiness:
    """Cached :func:`ready_pipelines` per model."""

    def __init__(self, redis: Any, heartbeat_ttl_s: float, max_age_s: float = 1.0, min_recheck_s: float = 0.25) -> None:
        self.redis = redis
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.max_age_s = max_age_s
        self.min_recheck_s = min_recheck_s
        self._ready: list[ReadyPipeline] = []
        self._read_at = float("-inf")
        self._reading: asyncio.Future | None = None

    async def refresh(self) -> list[ReadyPipeline]:
        """Read the registry; concurrent callers share one read."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(ready_pipelines(self.redis, self.heartbeat_ttl_s))
        reading = self._reading
        try:
            ready = await asyncio.shield(reading)
        finally:
            if self._reading is reading and reading.done():
                self._reading = None
        self._ready, self._read_at = ready, time.monotonic()
        return ready

    async def pipelines(self, model: str) -> list[ReadyPipeline]:
        """A fresh read: the model's ready pipelines."""
        return [p for p in await self.refresh() if p.model == model]

    async def is_ready(self, model: str) -> bool:
        """From the cache when it is fresh and says yes; else read again (rate-limited)."""
        age = time.monotonic() - self._read_at
        if age > self.max_age_s:
            await self.refresh()
        elif not any(p.model == model for p in self._ready) and age > self.min_recheck_s:
            await self.refresh()
        return any(p.model == model for p in self._ready)
