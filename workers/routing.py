"""Cache-aware dispatch, the pipelines' half (the head's is hexgen/head/routing.py).

A work entry may name a preferred pipeline (``prefer``: the one whose prefix cache holds most of its
prompt). Every pipeline still reads the one work stream by capacity. When a pipeline reads an entry
preferred for another pipeline whose prefix summary is live (its TTL'd key exists, so that pipeline has
published within a few intervals) and that has room, it hands the entry over: ``XCLAIM ... JUSTID`` with
min-idle 0 moves it from its own pending list to the preferred pipeline's consumer, atomically and without
counting a delivery. Otherwise it keeps the entry and serves it (pull by capacity).

The preferred pipeline finds handed-over entries in its own pending list (``XPENDING`` for its consumer,
entries it does not already hold) on every read and admits them like claimed ones: any tokens already
posted are honoured, so an entry it held before a restart resumes correctly. If it dies or stays full, the
entry's lease lapses like any other and another pipeline takes it over, so the detour is bounded by one
lease and delivery stays exactly-once.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from hexgen.wire import keys as C
from hexgen.wire.prefix_summary import PREFER_FIELD, handover_stream, prefix_summary_key
from hexgen.wire.text import as_text
from workers.io_config import IOConfig

log = logging.getLogger(__name__)

Entry = tuple[str, Any]  # (entry id, fields)


def preferred(fields: Any) -> str:
    raw = fields.get(PREFER_FIELD, fields.get(PREFER_FIELD.encode())) if isinstance(fields, dict) else None
    return as_text(raw) if raw else ""


class Handover:
    """Hands entries preferred for another live pipeline with room over to it, and finds those handed here."""

    def __init__(self, client: redis.Redis, cfg: IOConfig) -> None:
        self._r, self.cfg = client, cfg
        self.handed_over = 0  # entries this pipeline passed to others
        self.received = 0  # entries others passed to this one

    def keep(self, entries: list[Entry]) -> list[Entry]:
        """The entries this pipeline serves; the others are handed to their preferred pipelines."""
        wanted = {p for _eid, f in entries if (p := preferred(f)) and p != self.cfg.pipeline_id}
        if not wanted:
            return entries
        pids = sorted(wanted)
        pipe = self._r.pipeline(transaction=False)
        for pid in pids:
            pipe.hget(prefix_summary_key(self.cfg.model, pid), "room")
        room: dict[str, int] = {}
        for pid, raw in zip(pids, pipe.execute()):
            text = as_text(raw) if raw is not None else ""
            room[pid] = int(text) if text.isdigit() else 0
        kept, moves = [], []
        for eid, fields in entries:
            pid = preferred(fields)
            if pid in room and room[pid] > 0:
                room[pid] -= 1
                moves.append((eid, pid))
            else:
                kept.append((eid, fields))
        if moves:
            pipe = self._r.pipeline(transaction=False)
            for eid, pid in moves:
                consumer = C.PIPELINE_CONSUMER_PREFIX + pid
                pipe.xclaim(self.cfg.work_stream, C.PIPELINES_GROUP, consumer, 0, [eid], justid=True)
            for pid in {pid for _eid, pid in moves}:  # wakes its blocked read
                pipe.xadd(handover_stream(self.cfg.model, pid), {"from": self.cfg.pipeline_id}, maxlen=64)
            pipe.execute()
            self.handed_over += len(moves)
            log.debug("pipeline %s: handed %d entries to their preferred pipelines", self.cfg.pipeline_id, len(moves))
        return kept

    @property
    def wake_stream(self) -> str:
        """Read (group ``pipelines``) alongside the work stream: other pipelines' hand-overs wake the read."""
        return handover_stream(self.cfg.model, self.cfg.pipeline_id)

    def woken(self, ids: list[Any]) -> None:
        """Drop the wake-up entries read."""
        if ids:
            pipe = self._r.pipeline(transaction=False)
            pipe.xack(self.wake_stream, C.PIPELINES_GROUP, *ids)
            pipe.xdel(self.wake_stream, *ids)
            pipe.execute()

    def handed_here(self, owned: set[str], count: int) -> list[tuple[str, Any, int]]:
        """Up to ``count`` entries in this pipeline's pending list that it does not hold: (id, fields,
        deliveries). Entries idle past half a lease are left to the claim path (workers/intake.py)."""
        cfg = self.cfg
        pend = self._r.xpending_range(
            cfg.work_stream, C.PIPELINES_GROUP, "-", "+", len(owned) + count, consumername=cfg.consumer
        )
        half = max(1, cfg.lease_ms // 2)
        fresh = [
            (as_text(p["message_id"]), int(p["times_delivered"]))
            for p in pend
            if as_text(p["message_id"]) not in owned and int(p["time_since_delivered"]) < half
        ][:count]
        if not fresh:
            return []
        pipe = self._r.pipeline(transaction=False)
        for eid, _ in fresh:
            pipe.xrange(cfg.work_stream, eid, eid)
        out = []
        for (eid, n), found in zip(fresh, pipe.execute()):
            if found and found[0][1] is not None:
                out.append((eid, found[0][1], n))
        self.received += len(out)
        return out
