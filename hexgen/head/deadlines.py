"""Request deadlines: a request the head queued that has not finished ``deadline_s`` later ends with an error.

The head adds every request it queues (:meth:`Deadlines.add`); :meth:`Deadlines.run` wakes at the earliest
deadline and, for a request whose result stream has no ``done``/``error`` yet, writes in one MULTI:

- ``error no_ready_pipeline`` when its model has no ready pipeline at that moment, else ``error timeout``;
- an EXPIRE on the result stream, the error counter for ``/metrics``;
- a cancel (``hexgen:cancel``), so a pipeline still holding the request frees it and one that takes its
  work entry later finishes it at admission (``done cancelled``, after the error: readers stop at the first).

The deadlines live in the memory of the head that queued the request: a head that restarts forgets the
deadlines of what it had queued (those requests still finish or fail as before).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hexgen.head.http.readiness import Readiness
from hexgen.wire import figures
from hexgen.wire import keys as C
from hexgen.wire.protocol import (
    NO_READY_PIPELINE,
    TIMEOUT,
    DoneEvent,
    ErrorEvent,
    ProtocolError,
    cancel_fields,
    error_event,
    parse_event,
)

log = logging.getLogger(__name__)

MAX_WAKE_S = 1.0  # the longest the watcher sleeps (a deadline added meanwhile is seen within this)


class Deadlines:
    """Deadlines of the requests one head queued; ``run()`` enforces them until cancelled."""

    def __init__(self, redis: Any, model: str, heartbeat_ttl_s: float, result_ttl_s: int) -> None:
        self.redis = redis
        self.model = model
        self.result_ttl_s = result_ttl_s
        self.readiness = Readiness(redis, heartbeat_ttl_s)
        self._heap: list[tuple[float, str, float]] = []  # (monotonic deadline, request id, deadline_s)
        self._wake = asyncio.Event()
        self.expired = 0  # requests ended by their deadline (tests, logs)

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, request_id: str, deadline_s: float) -> None:
        at = time.monotonic() + deadline_s
        first = not self._heap or at < self._heap[0][0]
        heapq.heappush(self._heap, (at, request_id, deadline_s))
        if first:
            self._wake.set()

    def due(self, now: float | None = None) -> list[tuple[str, float]]:
        """Pop the requests whose deadline has passed: ``(request id, deadline_s)``."""
        now = time.monotonic() if now is None else now
        out = []
        while self._heap and self._heap[0][0] <= now:
            _at, rid, secs = heapq.heappop(self._heap)
            out.append((rid, secs))
        return out

    async def run(self) -> None:
        """Wait for the next deadline, expire what is due; Redis errors are retried on the next wake."""
        while True:
            wait = MAX_WAKE_S if not self._heap else min(MAX_WAKE_S, max(0.0, self._heap[0][0] - time.monotonic()))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass
            due = self.due()
            if not due:
                continue
            try:
                await self.expire(due)
            except (RedisConnectionError, RedisTimeoutError, ResponseError, OSError) as e:
                log.warning("head: could not end %d requests at their deadline (%s); retrying", len(due), e)
                for rid, secs in due:
                    heapq.heappush(self._heap, (time.monotonic() + MAX_WAKE_S, rid, secs))

    async def expire(self, due: list[tuple[str, float]]) -> int:
        """End each unfinished request of ``due`` with its error event; returns how many were ended."""
        async with self.redis.pipeline(transaction=False) as p:
            for rid, _ in due:
                p.xrevrange(C.result_stream(rid), count=1)
            lasts = await p.execute()
        open_ = [(rid, secs) for (rid, secs), last in zip(due, lasts) if not _ended(last)]
        if not open_:
            return 0
        ready = await self.readiness.is_ready(self.model)
        code = TIMEOUT if ready else NO_READY_PIPELINE
        async with self.redis.pipeline(transaction=True) as p:
            for rid, secs in open_:
                why = "" if ready else f"; model {self.model!r} has no ready pipeline"
                msg = f"deadline_s: the request did not finish within {secs:g} s{why}; retry later with a new id"
                stream = C.result_stream(rid)
                p.xadd(stream, error_event(code, msg))
                p.expire(stream, self.result_ttl_s)
                p.hincrby(figures.ERRORS_KEY, code, 1)
                p.xadd(C.CANCEL_STREAM, cancel_fields(rid), maxlen=C.CANCEL_STREAM_MAXLEN, approximate=True)
            await p.execute()
        self.expired += len(open_)
        shown = ", ".join(r for r, _ in open_[:5])
        log.warning("head: %d requests reached their deadline (%s): %s", len(open_), code, shown)
        return len(open_)


def _ended(last: Any) -> bool:
    """Whether the result stream's last entry (XREVRANGE COUNT 1 reply) is a done or error event."""
    if not last:
        return False
    try:
        return isinstance(parse_event(last[0][1]), (DoneEvent, ErrorEvent))
    except ProtocolError:
        return False
