"""RedisSource: the stage-0 leader's request source (leases, claims, resume, dead letters, cancels).

See :mod:`hexgen.serving.worker_io` for the rules it follows. Work is read and claimed by a
:class:`~hexgen.serving.prefetch.Prefetcher` thread, which admits entries here (``_admit``); the engine loop's
:meth:`RedisSource.poll` only takes what it queued.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from functools import partial
from typing import Any

import redis

from hexgen.engine.types import Request
from hexgen.serving import constants as C
from hexgen.serving.prefetch import Entry, Prefetcher
from hexgen.serving.protocol import (INTERNAL, ProtocolError, decode_work_item, done_event, error_event,
                                     parse_cancel)
from hexgen.serving.worker_io import (REDIS_ERRORS, Backoff, ClientFactory, IOConfig, Post, Poster, as_text,
                                      connect, read_posted)

log = logging.getLogger(__name__)


class RedisSource:
    """Request source of the stage-0 leader (see the module docstring for leases, claims and cancels)."""

    def __init__(self, cfg: IOConfig, *, client_factory: ClientFactory | None = None) -> None:
        self.cfg = cfg
        factory = client_factory or partial(connect, cfg.redis_url)
        self._r = factory(C.socket_timeout_for(cfg.block_ms))  # the prefetch thread's (admission posts too)
        self._keeper_r = factory(10.0)
        self._control_r = factory(C.socket_timeout_for(cfg.control_block_ms))
        self._poster = Poster(self._r, cfg.work_stream, cfg.result_ttl_s)
        self._lock = threading.Lock()
        self._inflight: dict[str, str] = {}  # request id -> work entry id (queued in the prefetcher or running)
        self._finishing: dict[str, float] = {}  # entry id -> when the engine released it (leased until acked)
        self._cancelled: OrderedDict[str, float] = OrderedDict()  # recently cancelled ids -> when
        self._cancel_new: list[str] = []
        self._taken: set[str] = set()  # ids the engine has taken (engine thread only: poll, poll_cancelled, finished)
        self._draining = threading.Event()
        self._stop = threading.Event()
        self._backoff = Backoff()  # admission's Redis errors (logging; the prefetcher backs off its reads)
        self._prefetch = Prefetcher(self._r, cfg, self._admit, self._owned_entries)
        self._threads = [threading.Thread(target=self._keep_leases, name="lease-keeper", daemon=True),
                         threading.Thread(target=self._watch_control, name="cancel-reader", daemon=True)]
        for t in self._threads:
            t.start()

    # ---- RequestSource ------------------------------------------------------------------------------------

    def poll(self, max_requests: int, timeout_s: float) -> list[Request]:
        """Requests the prefetch thread has read and admitted: no Redis call here (see prefetch.py)."""
        if max_requests <= 0:
            if timeout_s > 0:
                self._stop.wait(min(timeout_s, 0.5))
            return []
        out = self._prefetch.take(max_requests, timeout_s)
        self._taken.update(req.request_id for req in out)
        return out

    def poll_cancelled(self) -> list[str]:
        """Cancelled in-flight ids; one admitted but not yet taken by the engine waits until it is."""
        if not self._cancel_new:
            return []
        with self._lock:
            new = [rid for rid in self._cancel_new if rid in self._inflight]
            self._cancel_new.clear()
            self._cancel_new.extend(rid for rid in new if rid not in self._taken)
        return [rid for rid in new if rid in self._taken]

    def finished(self, request_id: str) -> None:
        self._taken.discard(request_id)
        with self._lock:
            entry = self._inflight.pop(request_id, None)
            if entry is not None:
                self._finishing[entry] = time.monotonic()

    def exhausted(self) -> bool:
        """Draining and nothing left in the prefetcher (requests it read before the drain are served)."""
        return self._draining.is_set() and self._prefetch.exhausted()

    def drain(self) -> None:
        """Take no more work; in-flight requests finish (the engine stops once idle)."""
        if not self._draining.is_set():
            log.info("pipeline %s: draining", self.cfg.pipeline_id)
        self._draining.set()
        self._prefetch.pause()

    def close(self) -> None:
        self._draining.set()
        self._stop.set()
        self._prefetch.pause()
        self._prefetch.close()
        for t in self._threads:
            t.join(timeout=self.cfg.control_block_ms / 1000 + 2)
        for c in (self._r, self._keeper_r, self._control_r):
            c.close()

    @property
    def in_flight(self) -> dict[str, str]:
        with self._lock:
            return dict(self._inflight)

    # ---- admission (on the prefetch thread) ------------------------------------------------------------

    def _owned_entries(self) -> set[str]:
        with self._lock:
            return set(self._inflight.values()) | set(self._finishing)

    def _admit(self, entries: list[Entry], resumed: bool) -> list[Request]:
        """Requests to hand to the engine. On a Redis error the rest stay in this consumer's pending list
        (not in flight), so they are taken back after half a lease."""
        out = []
        for eid, fields, deliveries in entries:
            try:
                req = self._admit_one(eid, fields, deliveries, resumed)
            except (*REDIS_ERRORS, redis.ResponseError) as e:
                self._backoff.fail("request source", e)
                break
            if req is not None:
                out.append(req)
        return out

    def _admit_one(self, eid: str, fields: Any, deliveries: int, resumed: bool) -> Request | None:
        try:
            req, _model = decode_work_item(fields)
        except ProtocolError as e:
            raw = fields.get(b"id", fields.get("id")) if isinstance(fields, dict) else None
            self._dead_letter(eid, as_text(raw) if raw else None, f"corrupt work item: {e}", deliveries)
            return None
        if deliveries > self.cfg.max_deliveries:
            self._dead_letter(eid, req.request_id, f"delivered {deliveries} times; the pipelines serving it "
                              "kept failing", deliveries)
            return None
        if resumed:
            try:
                posted, ended = read_posted(self._r, req.request_id)
            except ProtocolError as e:
                self._dead_letter(eid, req.request_id, str(e), deliveries)
                return None
            if ended:
                self._r.xack(self.cfg.work_stream, C.PIPELINES_GROUP, eid)
                return None
            req.output_ids = posted
            if len(posted) >= req.params.max_new_tokens:
                self._finish(eid, req, "length")
                return None
        with self._lock:
            cancelled = req.request_id in self._cancelled
            duplicate = self._inflight.get(req.request_id)
            if not cancelled and duplicate is None:
                self._inflight[req.request_id] = eid
        if cancelled:
            self._finish(eid, req, "cancelled")
            return None
        if duplicate is not None:
            log.warning("request %s: entry %s duplicates in-flight entry %s; acking it", req.request_id, eid,
                        duplicate)
            self._r.xack(self.cfg.work_stream, C.PIPELINES_GROUP, eid)
            return None
        req.meta = {**req.meta, "entry": eid}
        if req.output_ids:
            log.info("request %s: resuming at seq %d (delivery %d)", req.request_id, len(req.output_ids),
                     deliveries)
        return req

    def _finish(self, eid: str, req: Request, reason: str) -> None:
        """Post ``done`` for a request the engine never saw, then ack its entry."""
        n = len(req.output_ids)
        self._poster.post([Post(req.request_id, n, done_event(reason, len(req.prompt_ids), n), eid)])

    def _dead_letter(self, eid: str, request_id: str | None, reason: str, deliveries: int) -> None:
        log.error("entry %s (request %s) moved to %s: %s", eid, request_id, C.DEADLETTER_STREAM, reason)
        pipe = self._r.pipeline(transaction=True)
        pipe.xadd(C.DEADLETTER_STREAM, {"entry": eid, "id": request_id or "", "stream": self.cfg.work_stream,
                                        "reason": reason, "deliveries": str(deliveries),
                                        "pipeline": self.cfg.pipeline_id},
                  maxlen=C.DEADLETTER_MAXLEN, approximate=True)
        if request_id:
            stream = C.result_stream(request_id)
            pipe.xadd(stream, error_event(INTERNAL, f"request failed: {reason}; moved to "
                                                    f"{C.DEADLETTER_STREAM}"))
            pipe.expire(stream, self.cfg.result_ttl_s)
        pipe.xack(self.cfg.work_stream, C.PIPELINES_GROUP, eid)
        pipe.execute()

    # ---- threads -------------------------------------------------------------------------------------------

    def _keep_leases(self) -> None:
        r, cfg = self._keeper_r, self.cfg
        backoff = Backoff()
        while not self._stop.wait(max(0.05, cfg.lease_s / 3)):
            with self._lock:
                now = time.monotonic()
                for e, t in list(self._finishing.items()):
                    if now - t > 2 * cfg.lease_s:
                        del self._finishing[e]
                entries = sorted(set(self._inflight.values()) | set(self._finishing))
            if not entries:
                continue
            try:
                pipe = r.pipeline(transaction=False)
                for eid in entries:
                    pipe.xpending_range(cfg.work_stream, C.PIPELINES_GROUP, eid, eid, 1)
                owners = pipe.execute()
                mine = [eid for eid, p in zip(entries, owners) if p and as_text(p[0]["consumer"]) == cfg.consumer]
                if mine:
                    r.xclaim(cfg.work_stream, C.PIPELINES_GROUP, cfg.consumer, 0, mine, justid=True)
                with self._lock:
                    for eid in set(entries) - set(mine):
                        self._finishing.pop(eid, None)  # acked (done) or lost: nothing left to keep
                backoff.ok()
            except (*REDIS_ERRORS, redis.ResponseError) as e:
                backoff.fail("lease keeper", e)

    def _watch_control(self) -> None:
        r, cfg = self._control_r, self.cfg
        last = f"{max(0, int((time.time() - cfg.cancel_memory_s) * 1000))}-0"
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                res = r.xread({C.CANCEL_STREAM: last}, count=1000, block=cfg.control_block_ms)
                for _stream, entries in res or []:
                    for eid, fields in entries:
                        last = as_text(eid)
                        try:
                            self._on_cancel(parse_cancel(fields))
                        except ProtocolError as e:
                            log.warning("ignoring cancel entry %s: %s", last, e)
                if as_text(r.hget(C.pipeline_key(cfg.pipeline_id), "drain") or "") == "1":
                    self.drain()
                backoff.ok()
            except (*REDIS_ERRORS, redis.ResponseError) as e:
                backoff.fail("cancel reader", e)
                self._stop.wait(backoff.delay)

    def _on_cancel(self, request_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._cancelled[request_id] = now
            self._cancelled.move_to_end(request_id)
            while self._cancelled and (len(self._cancelled) > 100_000
                                       or now - next(iter(self._cancelled.values())) > self.cfg.cancel_memory_s):
                self._cancelled.popitem(last=False)
            if request_id in self._inflight:
                self._cancel_new.append(request_id)
                log.info("request %s: cancelled", request_id)
