"""Work intake: the stage-0 leader reads, leases, takes over and admits work entries for its engine.

:class:`RedisSource` is the engine's request source; a :class:`~workers.prefetch.Prefetcher` thread reads and
claims work off the engine loop and admits entries through the source (``_admit``); the engine loop's
:meth:`RedisSource.poll` only takes what it queued. Results are posted by :mod:`workers.sink`, whose function
call also acks.

Leases. Work entries are read with XREADGROUP (group ``pipelines``, consumer ``pipeline-<id>``) by the prefetch
thread (:mod:`workers.prefetch`), only as many as the engine has room for. While a request is in flight
(queued for the engine or running, and until its ``done`` is acked) a keeper thread re-claims its entry every
``lease_s / 3`` (XCLAIM JUSTID, min-idle 0, only entries this consumer still owns), so its idle time stays far
below the lease while the pipeline lives. Entries of a pipeline that died age past
``lease_s`` and are taken over with XAUTOCLAIM; a restarted pipeline takes its own stale entries back after
``lease_s / 2``. A claimed entry's result stream is read first: with ``done``/``error`` it is only acked;
otherwise the request resumes with ``output_ids`` = the tokens already posted. Entries delivered more than
``max_deliveries`` times go to ``hexgen:deadletter`` and the client gets ``error internal``.

Trust boundary. Anyone who may XADD to the work stream can put an item there, so each decoded item is checked
again (:mod:`hexgen.wire.itemcheck`: token ids within the vocabulary, types, lengths, the deployment's caps);
a bad one is dead-lettered with ``error invalid_request`` before the engine sees it. When a step fails on
its input anyway, the leader calls :meth:`RedisSource.failed` with the step's requests before the rank exits:
they are dead-lettered with ``error internal`` instead of being replayed into the same failure.

Orphaned streams. A client that reads a request's results may keep ``hexgen:reader:<id>`` alive (the HTTP front
does, TTL ``lease_s``); the lease keeper cancels an in-flight request whose reader key it has seen and that has
expired (nobody reads its results any more).

Cancellation. Every source reads ``hexgen:cancel`` with a plain XREAD in a thread, starting
``cancel_memory_s`` in the past so a freshly started pipeline still honours recent cancels. Ids cancelled
while in flight are handed to the engine by :meth:`RedisSource.poll_cancelled`; ids cancelled before their
work entry arrived are finished at admission with ``done cancelled``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from functools import partial
from typing import Any

import redis

from hexgen.engine.types import Request
from hexgen.wire import figures
from hexgen.wire import keys as C
from hexgen.wire.connection import REDIS_ERRORS, Backoff, ClientFactory, connect
from hexgen.wire.itemcheck import check_work_item
from hexgen.wire.protocol import (
    INTERNAL,
    INVALID_REQUEST,
    DoneEvent,
    ErrorEvent,
    InvalidRequest,
    ProtocolError,
    TokenEvent,
    decode_work_item,
    done_event,
    error_event,
    parse_cancel,
    parse_event,
)
from hexgen.wire.text import as_text
from workers.io_config import IOConfig
from workers.prefetch import Entry, Prefetcher
from workers.sink import Post, Poster

log = logging.getLogger(__name__)


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
                raise ProtocolError(f"result stream of {request_id!r}: token seq {ev.seq} follows {len(ids)} tokens")
            ids.extend(ev.ids)
    return ids, False


def _peek_id(raw: Any) -> str | None:
    """The request id to write a refused item's error to: only an id the head would have accepted (the
    result stream's key is built from it)."""
    text = as_text(raw) if isinstance(raw, (bytes, str)) and raw else None
    return text if text is not None and _ID_RE.fullmatch(text) else None


_ID_RE = re.compile(C.ID_PATTERN)


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
        self._watched: set[str] = set()  # in-flight ids whose reader key was seen (cancelled once it expires)
        self._taken: set[str] = set()  # ids the engine has taken (engine thread only: poll, poll_cancelled, finished)
        self._draining = threading.Event()
        self._stop = threading.Event()
        self._backoff = Backoff()  # admission's Redis errors (logging; the prefetcher backs off its reads)
        self.takeovers = 0  # entries claimed from a lapsed lease and admitted (prefetch thread only)
        self._prefetch = Prefetcher(self._r, cfg, self._admit, self._owned_entries)
        self._threads = [
            threading.Thread(target=self._keep_leases, name="lease-keeper", daemon=True),
            threading.Thread(target=self._watch_control, name="cancel-reader", daemon=True),
        ]

    def start(self) -> RedisSource:
        """Start the lease keeper, the cancel reader and the prefetch thread; returns self."""
        for t in self._threads:
            t.start()
        self._prefetch.start()
        return self

    # ---- RequestSource ------------------------------------------------------------------------------------

    def poll(self, max_requests: int, timeout_s: float) -> list[Request]:
        """Requests the prefetch thread has read and admitted: no Redis call here (see the module doc)."""
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

    def failed(self, request_ids: list[str], reason: str) -> None:
        """The engine's step with these requests failed (the rank is about to exit): dead-letter their entries
        with an ``internal`` error now, so the restarted pipeline does not replay them into the same failure."""
        with self._lock:
            entries = [(rid, self._inflight.pop(rid, None)) for rid in request_ids]
        for rid, eid in entries:
            if eid is None:
                continue
            try:
                self._dead_letter(eid, rid, reason, 1)
            except (*REDIS_ERRORS, redis.ResponseError) as e:
                log.warning("request %s: could not dead-letter after the failed step: %s", rid, e)

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
            if t.ident is not None:
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
            self._dead_letter(eid, _peek_id(raw), f"corrupt work item: {e}", deliveries)
            return None
        if not self._checked(eid, req, deliveries):
            return None
        if deliveries > self.cfg.max_deliveries:
            self._dead_letter(
                eid, req.request_id, f"delivered {deliveries} times; the pipelines serving it kept failing", deliveries
            )
            return None
        if resumed and not self._resume(eid, req, deliveries):
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
            log.warning("request %s: entry %s duplicates in-flight entry %s; acking it", req.request_id, eid, duplicate)
            self._ack(eid)
            return None
        req.meta = {**req.meta, "entry": eid}
        if resumed and deliveries > 1:  # claimed after a lease lapsed (a handed-over entry has one delivery)
            self.takeovers += 1  # read by the figures publisher (workers/metrics.py)
        if req.output_ids:
            log.info("request %s: resuming at seq %d (delivery %d)", req.request_id, len(req.output_ids), deliveries)
        return req

    def _checked(self, eid: str, req: Request, deliveries: int) -> bool:
        """Whether a decoded item passes the head's checks again (:mod:`hexgen.wire.itemcheck`); one that does
        not is dead-lettered with ``error invalid_request`` before the engine sees it."""
        if not self.cfg.vocab_size:
            return True
        try:
            check_work_item(
                req,
                vocab_size=self.cfg.vocab_size,
                max_model_len=self.cfg.max_model_len or 1 << 62,
                max_new_tokens=self.cfg.max_new_tokens,
            )
        except InvalidRequest as e:
            rid = _peek_id(req.request_id if isinstance(req.request_id, str) else None)
            self._dead_letter(eid, rid, f"invalid work item: {e.message}", deliveries, INVALID_REQUEST)
            return False
        return True

    def _resume(self, eid: str, req: Request, deliveries: int) -> bool:
        """A redelivered request continues from the tokens already posted; False when it is settled here
        (unreadable result stream: dead letter; already ended: acked; no tokens left: ``done length``)."""
        try:
            posted, ended = read_posted(self._r, req.request_id)
        except ProtocolError as e:
            self._dead_letter(eid, req.request_id, str(e), deliveries)
            return False
        if ended:
            self._ack(eid)
            return False
        req.output_ids = posted
        if len(posted) >= req.params.max_new_tokens:
            self._finish(eid, req, "length")
            return False
        return True

    def _finish(self, eid: str, req: Request, reason: str) -> None:
        """Post ``done`` for a request the engine never saw, then ack its entry."""
        n = len(req.output_ids)
        self._poster.post([Post(req.request_id, n, done_event(reason, len(req.prompt_ids), n), eid)])

    def _dead_letter(
        self, eid: str, request_id: str | None, reason: str, deliveries: int, code: str = INTERNAL
    ) -> None:
        log.error("entry %s (request %s) moved to %s: %s", eid, request_id, C.DEADLETTER_STREAM, reason)
        pipe = self._r.pipeline(transaction=True)
        pipe.xadd(
            C.DEADLETTER_STREAM,
            {
                "entry": eid,
                "id": request_id or "",
                "stream": self.cfg.work_stream,
                "reason": reason,
                "deliveries": str(deliveries),
                "pipeline": self.cfg.pipeline_id,
            },
            maxlen=C.DEADLETTER_MAXLEN,
            approximate=True,
        )
        if request_id:
            stream = C.result_stream(request_id)
            pipe.xadd(stream, error_event(code, f"request failed: {reason}; moved to {C.DEADLETTER_STREAM}"))
            pipe.expire(stream, self.cfg.result_ttl_s)
            pipe.hincrby(figures.ERRORS_KEY, code, 1)  # /metrics: hexgen_request_errors_total
        pipe.xack(self.cfg.work_stream, C.PIPELINES_GROUP, eid)
        pipe.xdel(self.cfg.work_stream, eid)
        pipe.execute()

    def _ack(self, eid: str) -> None:
        """Ack a work entry and delete it (an acked entry is never read again)."""
        pipe = self._r.pipeline(transaction=True)
        pipe.xack(self.cfg.work_stream, C.PIPELINES_GROUP, eid)
        pipe.xdel(self.cfg.work_stream, eid)
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
                self._check_readers(r)
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

    def _check_readers(self, r: redis.Redis) -> None:
        """Cancel in-flight requests whose reader key (``hexgen:reader:<id>``, kept alive by a client that reads
        the result stream) was seen and has expired: nobody reads their results any more."""
        with self._lock:
            rids = sorted(self._inflight)
        if not rids:
            self._watched.clear()
            return
        pipe = r.pipeline(transaction=False)
        for rid in rids:
            pipe.exists(C.reader_key(rid))
        alive = pipe.execute()
        self._watched.intersection_update(rids)
        for rid, n in zip(rids, alive):
            if n:
                self._watched.add(rid)
            elif rid in self._watched:
                self._watched.discard(rid)
                log.warning("request %s: no reader left (its reader key expired); cancelling", rid)
                self._on_cancel(rid)

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
            while self._cancelled and (
                len(self._cancelled) > 100_000 or now - next(iter(self._cancelled.values())) > self.cfg.cancel_memory_s
            ):
                self._cancelled.popitem(last=False)
            if request_id in self._inflight:
                self._cancel_new.append(request_id)
                log.info("request %s: cancelled", request_id)
