"""The head's one round trip for a valid request: reserve the id, check the depth, queue, ack (one FCALL).

The library function ``submit`` (:mod:`hexgen.wire.functions`) runs atomically in Redis, so the steps the head
took in two MULTIs (reserve + depth, then work XADD + XACK) cost one round trip and cannot be torn apart:

1. ``SET hexgen:dedupe:<id> <entry id> NX EX``; if the key names another entry, the entry is a duplicate:
   it is acked (and deleted) and nothing else is written (the original's result stream is the answer to both). A
   redelivery of the same entry finds its own entry id and carries on.
2. The work stream's depth (the ``pipelines`` group's pending + lag, or the stream length when the lag is
   unknown; the same count as :attr:`~hexgen.head.status.QueueStatus.depth`). At the limit nothing is
   written: the head then writes the ``overloaded`` error (the id stays spent, as before).
3. Otherwise the work item is XADDed and the request entry acked.

An acked request entry is deleted as well (XDEL): nothing reads it again, and the requests stream would
otherwise keep every request ever sent.

Requests that fail validation never get here: the head reserves their id with its MULTI and writes the error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hexgen.wire import keys as C
from hexgen.wire.functions import AsyncFunction
from hexgen.wire.text import as_text

# The steps themselves are hexgen.wire.functions.SUBMIT (a Redis function, FCALL).
QUEUED, DUPLICATE, OVER_LIMIT = 1, 0, 2


@dataclass(frozen=True)
class Submitted:
    """What :meth:`Submitter.submit` did: ``status`` (QUEUED, DUPLICATE or OVER_LIMIT), the entry that owns the
    id, and the work queue's depth before this request (0 for a duplicate)."""

    status: int
    owner: str
    depth: int


class Submitter:
    """Runs the library function ``submit`` on an async client (FCALL; the library is loaded when Redis lacks
    it: the head's user may)."""

    def __init__(self, redis: Any, work_stream: str, dedupe_ttl_s: int, max_queue_depth: int) -> None:
        self.work_stream = work_stream
        self.dedupe_ttl_s = dedupe_ttl_s
        self.max_queue_depth = max_queue_depth
        self._submit = AsyncFunction(redis, "submit")

    async def submit(self, request_id: str, entry_id: str, work_item: dict[str, bytes]) -> Submitted:
        """Reserve ``request_id`` for ``entry_id`` and, unless a duplicate or over the depth limit, queue
        ``work_item`` and ack the entry; one round trip, atomic."""
        args: list[Any] = [entry_id, self.dedupe_ttl_s, C.PIPELINES_GROUP, C.HEADS_GROUP, self.max_queue_depth]
        for k, v in work_item.items():
            args += [k, v]
        keys = [C.dedupe_key(request_id), self.work_stream, C.REQUESTS_STREAM]
        status, owner, depth = await self._submit(keys, args)
        owner = as_text(owner)
        return Submitted(int(status), owner, int(depth))
