"""Redis side of a pipeline: shared config and rules of :class:`~hexgen.serving.source.RedisSource` (feeds
the stage-0 leader) and :class:`~hexgen.serving.sink.RedisSink` (posts results from the last-stage leader).

Leases. Work entries are read with XREADGROUP (group ``pipelines``, consumer ``pipeline-<id>``) by a prefetch
thread (:mod:`hexgen.serving.prefetch`), only as many as the engine has room for. While a request is in flight
(queued for the engine or running, and until its ``done`` is acked) a keeper thread re-claims its entry every
``lease_s / 3`` (XCLAIM JUSTID, min-idle 0, only entries this consumer still owns), so its idle time stays far
below the lease while the pipeline lives. Entries of a pipeline that died age past
``lease_s`` and are taken over with XAUTOCLAIM; a restarted pipeline takes its own stale entries back after
``lease_s / 2``. A claimed entry's result stream is read first: with ``done``/``error`` it is only acked;
otherwise the request resumes with ``output_ids`` = the tokens already posted. Entries delivered more than
``max_deliveries`` times go to ``hexgen:deadletter`` and the client gets ``error internal``.

Exactly-once posting. Events are appended by :data:`APPEND_SCRIPT` (one EVALSHA per step, atomic), at
explicit stream ids: the token with ``seq`` n is entry ``<n+1>-0`` and ``done`` after n tokens is ``<n+1>-0``.
An event at position p is appended only if the stream currently ends at position p-1 (empty for p = 0); if
the stream already holds exactly this event (a retried write whose reply was lost) it counts as written;
anything else means another pipeline holds the request (a lease lapsed under a live pipeline): this writer
stops posting it and never acks it. So the client sees each position once, in order, with no gap. Error
events (dead letters) use ``*`` ids, which also end any late writer.

Acks. The same script XACKs a request's work entry when it writes that request's ``done``, so a ``done`` is
never written without its ack or the other way round; a claimed entry whose stream already ends with
``done`` or ``error`` is only acked.

Cancellation. Every source reads ``hexgen:cancel`` with a plain XREAD in a thread, starting
``cancel_memory_s`` in the past so a freshly started pipeline still honours recent cancels. Ids cancelled
while in flight are handed to the engine by :meth:`RedisSource.poll_cancelled`; ids cancelled before their
work entry arrived are finished at admission with ``done cancelled``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import redis

from hexgen.serving import constants as C
from hexgen.serving.protocol import DoneEvent, ErrorEvent, ProtocolError, TokenEvent, parse_event
from hexgen.serving.settings import Settings, sync_redis

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)
ClientFactory = Callable[[float], redis.Redis]  # socket timeout (s) -> a new client


@dataclass(frozen=True)
class IOConfig:
    """Everything a pipeline's source and sink need; plain values so that it pickles for spawned ranks."""

    redis_url: str
    model: str
    pipeline_id: str
    lease_s: float = C.LEASE_S
    max_deliveries: int = C.MAX_DELIVERIES
    block_ms: int = C.BLOCK_MS
    result_ttl_s: int = C.RESULT_TTL_S
    cancel_memory_s: float = 600.0  # how far back a new source reads cancels, and how long it remembers them
    control_block_ms: int = 1000  # longest BLOCK of the source's threads (cancel reader, work prefetch): the
    # drain flag is checked this often and close() returns within about this
    flush_timeout_s: float = 30.0  # RedisSink.close() waits this long for pending writes

    @classmethod
    def from_settings(cls, settings: Settings, pipeline_id: str, **overrides: Any) -> "IOConfig":
        lim = settings.limits
        kw = dict(redis_url=settings.redis.url, model=settings.model.name, pipeline_id=pipeline_id,
                  lease_s=lim.lease_s, max_deliveries=lim.max_deliveries, block_ms=lim.block_ms,
                  result_ttl_s=lim.result_ttl_s)
        kw.update(overrides)
        return cls(**kw)

    @property
    def work_stream(self) -> str:
        return C.work_stream(self.model)

    @property
    def consumer(self) -> str:
        return C.PIPELINE_CONSUMER_PREFIX + self.pipeline_id

    @property
    def lease_ms(self) -> int:
        return max(1, int(self.lease_s * 1000))

    def __repr__(self) -> str:  # the URL may hold a password
        return f"IOConfig(model={self.model!r}, pipeline_id={self.pipeline_id!r}, lease_s={self.lease_s})"


def connect(url: str, socket_timeout: float) -> redis.Redis:
    """Default client factory: a fresh pooled client with the given socket timeout."""
    return sync_redis(url, socket_timeout=socket_timeout, socket_connect_timeout=5.0)


def as_text(v: bytes | str) -> str:
    """A Redis reply value as str (clients may or may not decode responses)."""
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def event_id(position: int) -> str:
    """Explicit result-stream id of the event at ``position`` (token seq, or the token count for done)."""
    return f"{position + 1}-0"


# KEYS[1] = work stream, KEYS[2..] = one result stream per event (in posting order).
# ARGV = group, ttl, then per event: position, entry id to ack ("" = none), n field pairs, fields...
# Returns per event: 1 appended, 2 already there (a retry), 0 refused (another writer holds the request).
APPEND_SCRIPT = """
local unpack = unpack or table.unpack
local out, refused = {}, {}
local a = 3
for i = 2, #KEYS do
  local key = KEYS[i]
  local pos, entry, n = tonumber(ARGV[a]), ARGV[a + 1], tonumber(ARGV[a + 2])
  local fields = {}
  for j = 1, 2 * n do fields[j] = ARGV[a + 2 + j] end
  a = a + 3 + 2 * n
  local id = (pos + 1) .. '-0'
  local status = 0
  if not refused[key] then
    local here = redis.call('XRANGE', key, id, id)
    if #here > 0 then
      local same = #here[1][2] == #fields
      for j = 1, #fields do same = same and here[1][2][j] == fields[j] end
      if same then status = 2 end
    else
      local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
      local top_id = (#top > 0) and top[1][1] or nil
      if (pos == 0 and top_id == nil) or top_id == (pos .. '-0') then
        redis.call('XADD', key, id, unpack(fields))
        status = 1
      end
    end
  end
  if status == 0 then
    refused[key] = true
  else
    redis.call('EXPIRE', key, ARGV[2])
    if entry ~= '' then redis.call('XACK', KEYS[1], ARGV[1], entry) end
  end
  out[#out + 1] = status
end
return out
"""
APPENDED, ALREADY_THERE, REFUSED = 1, 2, 0


@dataclass(frozen=True)
class Post:
    """One result event to append: at ``position`` of ``request_id``'s stream; ack ``entry`` once written."""

    request_id: str
    position: int
    fields: dict[str, str]
    entry: str = ""


class Poster:
    """Appends result events with :data:`APPEND_SCRIPT` (loaded once per client, EVALSHA afterwards)."""

    def __init__(self, client: redis.Redis, work_stream: str, result_ttl_s: int) -> None:
        self.client = client
        self.work_stream = work_stream
        self.result_ttl_s = result_ttl_s
        self._script = client.register_script(APPEND_SCRIPT)

    def post(self, posts: list[Post]) -> list[int]:
        """Status of each post (APPENDED, ALREADY_THERE or REFUSED), in order; one round trip."""
        if not posts:
            return []
        keys = [self.work_stream] + [C.result_stream(p.request_id) for p in posts]
        args: list[str | int] = [C.PIPELINES_GROUP, self.result_ttl_s]
        for p in posts:
            args += [p.position, p.entry, len(p.fields)]
            for k, v in p.fields.items():
                args += [k, v]
        return [int(x) for x in self._script(keys=keys, args=args)]


class Backoff:
    """Exponential backoff after Redis errors: 0.1 s doubling to ``cap_s``; log at most every 10 s."""

    def __init__(self, cap_s: float = 5.0) -> None:
        self.cap_s = cap_s
        self.delay = 0.0
        self.until = 0.0
        self._logged = 0.0

    def ready(self) -> bool:
        return time.monotonic() >= self.until

    def remaining(self) -> float:
        return max(0.0, self.until - time.monotonic())

    def fail(self, what: str, err: Exception) -> None:
        self.delay = min(self.cap_s, max(0.1, self.delay * 2))
        self.until = time.monotonic() + self.delay
        if time.monotonic() - self._logged > 10:
            log.warning("%s: Redis unavailable (%s); retrying with backoff up to %.0fs", what, err, self.cap_s)
            self._logged = time.monotonic()

    def ok(self) -> None:
        if self.delay:
            log.info("Redis reachable again")
        self.delay = 0.0
        self.until = 0.0


def read_posted(client: redis.Redis, request_id: str) -> tuple[list[int], bool]:
    """(token ids already posted in seq order, whether the stream already ended with done/error)."""
    ids: list[int] = []
    for _eid, fields in client.xrange(C.result_stream(request_id)):
        try:
            ev = parse_event(fields)
        except ProtocolError as e:
            log.warning("request %s: skipping a malformed result event: %s", request_id, e)
            continue
        if isinstance(ev, (DoneEvent, ErrorEvent)):
            return ids, True
        if isinstance(ev, TokenEvent):
            if ev.seq != len(ids):
                raise ProtocolError(f"result stream of {request_id!r}: token seq {ev.seq} follows "
                                    f"{len(ids)} tokens")
            ids.extend(ev.ids)
    return ids, False
