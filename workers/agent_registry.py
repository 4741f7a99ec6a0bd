"""A placement agent's records in Redis: registration, heartbeat and its assignments (the head's side of the
same records is :mod:`hexgen.head.placement`).

An agent (``bin/worker`` without ``--stage``) registers ``hexgen:agent:<id>`` (:class:`AgentRecord`) with a
fresh instance token, refreshes ``hexgen:agent-hb:<id>`` (TTL ``limits.heartbeat_ttl_s``) from a daemon
thread, and blocks with XREAD on ``hexgen:assign:<id>`` for entries addressed to its own instance. The
planning head publishes ``hexgen:plan`` and one assignment per live agent in one MULTI.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from hexgen.wire import keys as C
from hexgen.wire.connection import REDIS_ERRORS
from hexgen.wire.placement import AgentRecord, Assignment
from hexgen.wire.protocol import ProtocolError
from hexgen.wire.text import as_text

log = logging.getLogger(__name__)


# ---- agent side (sync redis-py) ---------------------------------------------------------------------------


class AgentRegistry:
    """One agent's registry operations on a synchronous client."""

    def __init__(self, client: redis.Redis, record: AgentRecord, heartbeat_ttl_s: int) -> None:
        self.r = client
        self.record = record
        self.heartbeat_ttl_s = heartbeat_ttl_s

    def register(self) -> None:
        """Write the record (replacing an older instance's) and the first heartbeat."""
        aid = self.record.id
        with self.r.pipeline(transaction=True) as p:
            p.delete(C.agent_key(aid))
            p.hset(C.agent_key(aid), mapping=self.record.to_fields())
            p.set(C.agent_heartbeat_key(aid), f"{time.time():.3f}", ex=self.heartbeat_ttl_s)
            p.execute()
        log.info(
            "registered agent %s (instance %s): %d x %s, %.1f GiB each",
            aid,
            self.record.instance,
            self.record.count,
            self.record.device_type,
            self.record.memory / 2**30,
        )

    def beat(self) -> bool:
        """Refresh the heartbeat and the record; False when another instance has taken this agent id."""
        aid = self.record.id
        current = self.r.hget(C.agent_key(aid), "instance")
        if current is not None and as_text(current) != self.record.instance:
            return False
        with self.r.pipeline(transaction=False) as p:
            p.set(C.agent_heartbeat_key(aid), f"{time.time():.3f}", ex=self.heartbeat_ttl_s)
            p.hset(C.agent_key(aid), mapping=self.record.to_fields())
            p.execute()
        return True

    def deregister(self) -> None:
        """Remove the record and heartbeat unless a newer instance replaced them (the head re-plans at once)."""
        aid = self.record.id
        current = self.r.hget(C.agent_key(aid), "instance")
        if current is not None and as_text(current) != self.record.instance:
            return
        self.r.delete(C.agent_key(aid), C.agent_heartbeat_key(aid))
        log.info("deregistered agent %s", aid)

    def last_entry_id(self) -> str:
        """Id of the newest entry of this agent's assignment stream ("0-0" if none): read after it."""
        rows = self.r.xrevrange(C.assign_stream(self.record.id), count=1)
        return as_text(rows[0][0]) if rows else "0-0"

    def next_assignment(self, reader: redis.Redis, after: str, block_ms: int) -> tuple[str, Assignment | None]:
        """Block up to ``block_ms`` for assignments after entry ``after``; returns (last entry id read, the
        newest assignment addressed to this instance or None). ``reader`` is a connection of its own whose
        socket timeout exceeds the BLOCK."""
        res = reader.xread({C.assign_stream(self.record.id): after}, block=block_ms, count=C.ASSIGN_STREAM_MAXLEN)
        found = None
        for _stream, entries in res or []:
            for eid, fields in entries:
                after = as_text(eid)
                try:
                    a = Assignment.from_fields(fields)
                except ProtocolError as e:
                    log.error("agent %s: ignoring malformed assignment %s: %s", self.record.id, after, e)
                    continue
                if a.instance == self.record.instance:
                    found = a
        return after, found


class AgentHeartbeat(threading.Thread):
    """Daemon thread: beat every ``interval_s``; call ``on_replaced`` once if another instance took the id."""

    def __init__(self, registry: AgentRegistry, interval_s: float, on_replaced: Callable[[], Any]) -> None:
        super().__init__(name=f"agent-heartbeat-{registry.record.id}", daemon=True)
        self.registry = registry
        self.interval_s = interval_s
        self.on_replaced = on_replaced
        self._halt = threading.Event()
        self._last_error = 0.0

    def stop(self, timeout_s: float = 5.0) -> None:
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout_s)

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            try:
                ok = self.registry.beat()
            except REDIS_ERRORS as e:
                if time.monotonic() - self._last_error > 10:
                    log.warning("agent heartbeat: Redis unreachable (%s); retrying every %.1fs", e, self.interval_s)
                    self._last_error = time.monotonic()
                continue
            if not ok:
                log.error("agent %s: another instance registered with this id; stopping", self.registry.record.id)
                self.on_replaced()
                return
