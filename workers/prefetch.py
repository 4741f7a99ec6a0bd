"""The stage-0 leader's work prefetch thread (:class:`Prefetcher`), used by :class:`workers.intake.RedisSource`.

Prefetch. The :class:`Prefetcher` thread blocks in XREADGROUP (BLOCK) on ``hexgen:work:<model>`` for the
``pipelines`` group, claims stale pending entries (this pipeline's own after half a lease with XCLAIM, dead
pipelines' after a lease with XAUTOCLAIM) every ``lease_s / 10``, turns the entries into requests with the source's
``admit`` (decoding, dead letters, resume from posted tokens, cancels, duplicates: :mod:`workers.intake`) and
queues them. The engine loop takes them with :meth:`Prefetcher.take`: without waiting while it is busy, with a
timeout while it is idle. It makes no Redis call to take work, so a request that lands during a step waits for
the step to end, not for the step and a read.

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
from collections import deque
from collections.abc import Callable
from typing import Any

import redis

from hexgen.engine.types import Request
from hexgen.wire import keys as C
from hexgen.wire import trace
from hexgen.wire.connection import REDIS_ERRORS, Backoff
from hexgen.wire.text import as_text
from workers.io_config import IOConfig
from workers.routing import Handover

log = logging.getLogger(__name__)

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
        self.handover = Handover(client, cfg)  # cache-aware dispatch (workers/routing.py)
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
        time.sleep(0)  # hand the GIL to an engine loop waiting in take(), which then wakes sooner

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
        handed = self.handover.handed_here(self._owned(), room - claimed)
        if handed:  # admitted like claimed entries: tokens already posted (a restart) are honoured
            reqs = self._admit(handed, True)
            claimed += len(handed)
            self._put(reqs)
            if room - claimed <= 0:
                return
        wait_s = 0.0 if claimed else min(self.cfg.block_ms, self.cfg.control_block_ms) / 1000
        wait_s = min(wait_s, max(0.01, self._next_reclaim - time.monotonic()))
        self._put(self._read_new(room - claimed, wait_s))

    def _ensure_group(self) -> None:
        if self._group_ok:
            return
        for stream in (self.cfg.work_stream, self.handover.wake_stream):
            try:
                self._r.xgroup_create(stream, C.PIPELINES_GROUP, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        self._group_ok = True

    def _read_new(self, count: int, wait_s: float) -> list[Request]:
        block = max(1, int(wait_s * 1000)) if wait_s > 0 else None
        wake = self.handover.wake_stream
        res = self._r.xreadgroup(
            C.PIPELINES_GROUP, self.cfg.consumer, {self.cfg.work_stream: ">", wake: ">"}, count=count, block=block
        )
        res = res or []
        self.handover.woken([eid for s, es in res if as_text(s) == wake for eid, _f in es])
        entries = [
            (as_text(eid), fields) for s, es in res if as_text(s) != wake for eid, fields in es if fields is not None
        ]
        if not entries:
            return []
        entries = self.handover.keep(entries)  # those preferred for another live pipeline with room go there
        out = self._admit([(eid, fields, 1) for eid, fields in entries], False)
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
