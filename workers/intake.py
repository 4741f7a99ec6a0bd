"""Work intake: the stage-0 leader reads, leases, takes over and admits work entries for its engine.

:class:`RedisSource` is the engine's request source; a :class:`Prefetcher` thread reads and claims work off the
engine loop and admits entries through the source (``_admit``); the engine loop's :meth:`RedisSource.poll`
only takes what it queued. Results are posted by :mod:`workers.sink`, whose function call also acks.

Leases. Work entries are read with XREADGROUP (group ``pipelines``, consumer ``pipeline-<id>``) by the prefetch
thread (below), only as many as the engine has room for. While a request is in flight
(queued for the engine or running, and until its ``done`` is acked) a keeper thread re-claims its entry every
``lease_s / 3`` (XCLAIM JUSTID, min-idle 0, only entries this consumer still owns), so its idle time stays far
below the lease while the pipeline lives. Entries of a pipeline that died age past
``lease_s`` and are taken over with XAUTOCLAIM; a restarted pipeline takes its own stale entries back after
``lease_s / 2``. A claimed entry's result stream is read first: with ``done``/``error`` it is only acked;
otherwise the request resumes with ``output_ids`` = the tokens already posted. Entries delivered more than
``max_deliveries`` times go to ``hexgen:deadletter`` and the client gets ``error internal``.

Cancellation. Every source reads ``hexgen:cancel`` with a plain XREAD in a thread, starting
``cancel_memory_s`` in the past so a freshly started pipeline still honours recent cancels. Ids cancelled
while in flight are handed to the engine by :meth:`RedisSource.poll_cancelled`; ids cancelled before their
work entry arrived are finished at admission with ``done cancelled``.

Prefetch. The :class:`Prefetcher` thread blocks in XREADGROUP (BLOCK) on ``hexgen:work:<model>`` for the
``pipelines`` group, claims stale pending entries (this pipeline's own after half a lease with XCLAIM, dead
pipelines' after a lease with XAUTOCLAIM) every ``lease_s / 10``, turns the entries into requests with the source's
``admit`` (decoding, dead letters, resume from posted tokens, cancels, duplicates; above) and queues them. The
engine loop takes them with :meth:`Prefetcher.take`: without waiting while it is busy, with a timeout while it is
idle. It makes no Redis call to take work, so a request that lands during a step waits for the step to end, not for
the step and a read.

Bound. The thread asks for at most ``want - held`` entries (XREADGROUP and claims' COUNT): ``want`` is the
engine's free capacity (``max_num_seqs`` less the requests it has running or waiting) as of its last
:meth:`~Prefetcher.take`, less what it took since; ``held`` is what sits in the queue. Capacity falls only
through what the engine takes, so ``held`` + the engine's requests never exceeds ``max_num_seqs``: the worker
holds no more entries than the synchronous read it replaces (COUNT = free capacity, once per step) held in
the scheduler's waiting list. An engine with no room reads nothing, so the entries stay in the stream for the
other pipelines, and a worker that dies holds at most what it would have admitted at its next step (its
entries are taken over after the lease, as any in-flight entry).

Acks are not the thread's business: a queued request is in flight like an admitted one (the source's lease
keeper keeps its entry), and its entry is acked when its ``done`` is written, as before. Draining stops the
reads; what is queued is still handed to the engine. :meth:`close` stops the thread: a blocked read returns
within ``control_block_ms``, the longest the thread blocks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from functools import partial
from typing import Any

import redis

from hexgen.engine.types import Request
from hexgen.wire import figures, trace
from hexgen.wire import keys as C
from hexgen.wire.connection import REDIS_ERRORS, Backoff, ClientFactory, connect
from hexgen.wire.protocol import (
    INTERNAL,
    DoneEvent,
    ErrorEvent,
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


Entry = tuple[str, Any, int]  # (entry id, fields, times delivered)
Admit = Callable[[list[Entry], bool], list[Request]]  # (entries, resumed) -> requests for the engine


class Prefetcher:
    """Reads and claims work entries on a thread; the engine loop takes the requests (see the module doc).

    ``client`` is the thread's own connection (socket timeout above ``block_ms``); ``admit`` runs on the
    thread; ``owned()`` gives the entries the source holds (never claimed back from itself).
    """

    def __init__(self, client: redis.Redis, cfg: IOConfig, admit: Admit, owned: Callable[[], set[str]]) -> None:
        self.cfg = cfg
        self._r = client
        self._admit = admit
        self._owned = owned
        self._cond = threading.Condition()
        self._ready: deque[Request] = deque()  # admitted, not yet taken by the engine
        self._want = 0  # what the engine can take: its free capacity at its last take(), less what it took
        self._paused = False  # draining: read nothing more
        self._reading = False  # a read or claim is under way (its requests may still come)
        self._stop = threading.Event()
        self.backoff = Backoff()
        self._cursor = "0-0"
        self._next_reclaim = 0.0
        self._group_ok = False
        self._thread = threading.Thread(target=self._run, name="work-prefetch", daemon=True)

    def start(self) -> Prefetcher:
        """Start the reading thread; returns self."""
        self._thread.start()
        return self

    # ---- engine thread ---------------------------------------------------------------------------------------

    def take(self, max_requests: int, timeout_s: float) -> list[Request]:
        """Up to ``max_requests`` queued requests (the engine's free capacity); wait up to ``timeout_s`` for
        one when none is queued (0: don't wait). No Redis call."""
        max_requests = max(0, max_requests)
        with self._cond:
            if self._want != max_requests:
                self._want = max_requests
                self._cond.notify_all()  # the thread may be waiting for room
            if not self._ready and timeout_s > 0:
                self._cond.wait_for(self._ready_or_done, timeout_s)
            n = min(max_requests, len(self._ready))
            out = [self._ready.popleft() for _ in range(n)]
            self._want -= n
        if trace.ENABLED and out:
            t = time.monotonic()
            for req in out:
                trace.stamp(req.meta, "src_take", t)
        return out

    def _ready_or_done(self) -> bool:
        return bool(self._ready) or self._stop.is_set() or (self._paused and not self._reading)

    def pause(self) -> None:
        """Read and claim nothing more (drain); queued requests are still taken."""
        with self._cond:
            self._paused = True
            self._cond.notify_all()

    def exhausted(self) -> bool:
        """Paused, with nothing queued and no read under way: no request will come any more."""
        with self._cond:
            return self._paused and not self._ready and not self._reading

    @property
    def held(self) -> int:
        with self._cond:
            return len(self._ready)

    def close(self) -> None:
        """Stop the thread (a blocked read returns within ``control_block_ms``); queued requests are dropped,
        their entries stay pending and are taken over after the lease."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=self.cfg.control_block_ms / 1000 + 2)
        if self._thread.is_alive():
            log.warning("work prefetch thread still running after close")

    # ---- the thread -----------------------------------------------------------------------------------------

    def _room(self) -> int:
        """Wait until the engine can take more than what is queued (or stop); mark a read under way."""
        with self._cond:
            while not self._stop.is_set():
                room = self._want - len(self._ready)
                if room > 0 and not self._paused:
                    self._reading = True
                    return room
                self._cond.wait(self.cfg.control_block_ms / 1000)
            return 0

    def _put(self, reqs: list[Request]) -> None:
        if not reqs:
            return
        with self._cond:
            self._ready.extend(reqs)
            self._cond.notify_all()
        time.sleep(0)  # hand the GIL to an engine loop waiting in take() (measured: 0.24-0.30 -> 0.09-0.12 ms)

    def _run(self) -> None:
        while not self._stop.is_set():
            room = self._room()
            if room <= 0:
                break
            try:
                if self.backoff.ready():
                    self._read(room)
                    self.backoff.ok()
            except REDIS_ERRORS as e:
                self.backoff.fail("work prefetch", e)
            except redis.ResponseError as e:
                if "NOGROUP" in str(e):
                    self._group_ok = False
                self.backoff.fail("work prefetch", e)
            finally:
                with self._cond:
                    self._reading = False
                    self._cond.notify_all()
            if not self.backoff.ready():
                self._stop.wait(self.backoff.remaining())

    def _read(self, room: int) -> None:
        """Claims when due, then new entries: blocking unless the claims found some."""
        self._ensure_group()
        now = time.monotonic()
        claimed = 0
        if now >= self._next_reclaim:
            self._next_reclaim = now + max(0.05, self.cfg.lease_s / 10)
            reqs = self._reclaim(room)
            claimed = len(reqs)
            self._put(reqs)
        if room - claimed <= 0:
            return
        wait_s = 0.0 if claimed else min(self.cfg.block_ms, self.cfg.control_block_ms) / 1000
        wait_s = min(wait_s, max(0.01, self._next_reclaim - time.monotonic()))
        self._put(self._read_new(room - claimed, wait_s))

    def _ensure_group(self) -> None:
        if self._group_ok:
            return
        try:
            self._r.xgroup_create(self.cfg.work_stream, C.PIPELINES_GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ok = True

    def _read_new(self, count: int, wait_s: float) -> list[Request]:
        block = max(1, int(wait_s * 1000)) if wait_s > 0 else None
        res = self._r.xreadgroup(
            C.PIPELINES_GROUP, self.cfg.consumer, {self.cfg.work_stream: ">"}, count=count, block=block
        )
        entries = [e for _stream, es in (res or []) for e in es]
        if not entries:
            return []
        out = self._admit([(as_text(eid), fields, 1) for eid, fields in entries if fields is not None], False)
        if trace.ENABLED:
            t = time.monotonic()
            for req in out:
                trace.stamp(req.meta, "src_read", t)
        return out

    def _reclaim(self, count: int) -> list[Request]:
        """Take back this pipeline's own stale entries, then other pipelines' expired ones."""
        r, cfg = self._r, self.cfg
        owned = self._owned()
        half = max(1, cfg.lease_ms // 2)
        stale = r.xpending_range(
            cfg.work_stream, C.PIPELINES_GROUP, "-", "+", count, consumername=cfg.consumer, idle=half
        )
        ids = [as_text(p["message_id"]) for p in stale if as_text(p["message_id"]) not in owned]
        claimed = list(r.xclaim(cfg.work_stream, C.PIPELINES_GROUP, cfg.consumer, half, ids)) if ids else []
        if len(claimed) < count:
            nxt, entries, *_deleted = r.xautoclaim(
                cfg.work_stream, C.PIPELINES_GROUP, cfg.consumer, cfg.lease_ms, self._cursor, count=count - len(claimed)
            )
            self._cursor = as_text(nxt)
            claimed += [e for e in entries if as_text(e[0]) not in owned]
        claimed = [(as_text(eid), fields) for eid, fields in claimed if fields is not None]
        if not claimed:
            return []
        pipe = r.pipeline(transaction=False)
        for eid, _ in claimed:
            pipe.xpending_range(cfg.work_stream, C.PIPELINES_GROUP, eid, eid, 1)
        counts = [(p[0]["times_delivered"] if p else 1) for p in pipe.execute()]
        log.info("pipeline %s: claimed %d pending entries", cfg.pipeline_id, len(claimed))
        return self._admit([(eid, f, n) for (eid, f), n in zip(claimed, counts)], True)


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
            self._dead_letter(eid, as_text(raw) if raw else None, f"corrupt work item: {e}", deliveries)
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
        if resumed:
            self.takeovers += 1  # read by the figures publisher (workers/metrics.py)
        if req.output_ids:
            log.info("request %s: resuming at seq %d (delivery %d)", req.request_id, len(req.output_ids), deliveries)
        return req

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

    def _dead_letter(self, eid: str, request_id: str | None, reason: str, deliveries: int) -> None:
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
            pipe.xadd(stream, error_event(INTERNAL, f"request failed: {reason}; moved to {C.DEADLETTER_STREAM}"))
            pipe.expire(stream, self.cfg.result_ttl_s)
            pipe.hincrby(figures.ERRORS_KEY, INTERNAL, 1)  # /metrics: hexgen_request_errors_total
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
            while self._cancelled and (
                len(self._cancelled) > 100_000 or now - next(iter(self._cancelled.values())) > self.cfg.cancel_memory_s
            ):
                self._cancelled.popitem(last=False)
            if request_id in self._inflight:
                self._cancel_new.append(request_id)
                log.info("request %s: cancelled", request_id)
