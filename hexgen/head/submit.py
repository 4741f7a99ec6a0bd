"""The head's one round trip for a valid request: reserve the id, check the depth, queue, ack (one script).

:data:`SUBMIT_SCRIPT` runs atomically in Redis, so the steps the head took in two MULTIs (reserve + depth,
then work XADD + XACK) cost one round trip and cannot be torn apart:

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
from hexgen.wire.protocol import as_text

# KEYS: dedupe key, work stream, requests stream.
# ARGV: entry id, dedupe TTL (s), pipelines group, heads group, max queue depth, then the work item's field pairs.
# Returns {status, owner entry id, depth}; status 1 queued, 0 duplicate (acked), 2 overloaded (nothing written).
SUBMIT_SCRIPT = """
local unpack = unpack or table.unpack
local entry = ARGV[1]
redis.call('SET', KEYS[1], entry, 'NX', 'EX', ARGV[2])
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= entry then
  redis.call('XACK', KEYS[3], ARGV[4], entry)
  redis.call('XDEL', KEYS[3], entry)
  return {0, owner, 0}
end
local depth = 0
if redis.call('EXISTS', KEYS[2]) == 1 then
  local length = redis.call('XLEN', KEYS[2])
  depth = length
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[2])) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == ARGV[3] then
      local pending = tonumber(info['pending']) or 0
      local lag = tonumber(info['lag'])
      if lag then depth = pending + lag else depth = pending + math.max(0, length - pending) end
    end
  end
end
if depth >= tonumber(ARGV[5]) then
  return {2, entry, depth}
end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 6))
redis.call('XACK', KEYS[3], ARGV[4], entry)
redis.call('XDEL', KEYS[3], entry)
return {1, entry, depth}
"""
QUEUED, DUPLICATE, OVER_LIMIT = 1, 0, 2


@dataclass(frozen=True)
class Submitted:
    """What :meth:`Submitter.submit` did: ``status`` (QUEUED, DUPLICATE or OVER_LIMIT), the entry that owns the
    id, and the work queue's depth before this request (0 for a duplicate)."""

    status: int
    owner: str
    depth: int


class Submitter:
    """Runs :data:`SUBMIT_SCRIPT` on an async client (EVALSHA; the client loads the script when Redis lacks it)."""

    def __init__(self, redis: Any, work_stream: str, dedupe_ttl_s: int, max_queue_depth: int) -> None:
        self.work_stream = work_stream
        self.dedupe_ttl_s = dedupe_ttl_s
        self.max_queue_depth = max_queue_depth
        self._script = redis.register_script(SUBMIT_SCRIPT)

    async def submit(self, request_id: str, entry_id: str, work_item: dict[str, bytes]) -> Submitted:
        """Reserve ``request_id`` for ``entry_id`` and, unless a duplicate or over the depth limit, queue
        ``work_item`` and ack the entry; one round trip, atomic."""
        args: list[Any] = [entry_id, self.dedupe_ttl_s, C.PIPELINES_GROUP, C.HEADS_GROUP, self.max_queue_depth]
        for k, v in work_item.items():
            args += [k, v]
        keys = [C.dedupe_key(request_id), self.work_stream, C.REQUESTS_STREAM]
        status, owner, depth = await self._script(keys=keys, args=args)
        owner = as_text(owner)
        return Submitted(int(status), owner, int(depth))
