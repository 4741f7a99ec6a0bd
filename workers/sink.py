"""Result posting: the last-stage leader's sink posts token/done events off the engine loop, exactly once.

:class:`RedisSink` queues each step's outputs and a thread writes them with :class:`Poster`.

Exactly-once posting. Events are appended by the library function ``append`` (:mod:`hexgen.wire.functions`:
one FCALL per step, atomic), at
explicit stream ids: the token with ``seq`` n is entry ``<n+1>-0`` and ``done`` after n tokens is ``<n+1>-0``.
An event at position p is appended only if the stream currently ends at position p-1 (empty for p = 0); if
the stream already holds exactly this event (a retried write whose reply was lost) it counts as written;
anything else means another pipeline holds the request (a lease lapsed under a live pipeline): this writer
stops posting it and never acks it. So the client sees each position once, in order, with no gap. Error
events (dead letters) use ``*`` ids, which also end any late writer.

Acks. The same function XACKs a request's work entry when it writes that request's ``done``, so a ``done`` is
never written without its ack or the other way round; a claimed entry whose stream already ends with
``done`` or ``error`` is only acked. An acked entry is also deleted (XDEL, in the same script or MULTI):
nothing reads it again, and the work stream would otherwise keep every request ever served.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import redis

from hexgen.engine.types import StepOutput
from hexgen.wire import keys as C
from hexgen.wire import trace
from hexgen.wire.connection import REDIS_ERRORS, Backoff, ClientFactory, connect
from hexgen.wire.functions import SyncFunction
from hexgen.wire.protocol import (
    INTERNAL,
    ProtocolError,
    done_event,
    error_event,
    token_event,
)
from workers.io_config import IOConfig

log = logging.getLogger(__name__)


def event_id(position: int) -> str:
    """Explicit result-stream id of the event at ``position`` (token seq, or the token count for done)."""
    return f"{position + 1}-0"


# The append itself is hexgen.wire.functions.APPEND (a Redis function, FCALL): statuses per event.
APPENDED, ALREADY_THERE, REFUSED = 1, 2, 0


@dataclass(frozen=True)
class Post:
    """One result event to append: at ``position`` of ``request_id``'s stream; ack ``entry`` once written."""

    request_id: str
    position: int
    fields: dict[str, str]
    entry: str = ""


class Poster:
    """Appends result events with the library function ``append`` (FCALL; while the library is missing
    and this user may not load it, :class:`~hexgen.wire.functions.LibraryMissing`, an outage to retry)."""

    def __init__(self, client: redis.Redis, work_stream: str, result_ttl_s: int) -> None:
        self.client = client
        self.work_stream = work_stream
        self.result_ttl_s = result_ttl_s
        self._append = SyncFunction(client, "append")

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
        return [int(x) for x in self._append(keys, args)]


_MAX_STEPS_PER_WRITE = 256  # steps that piled up while Redis was slow go out together
_MAX_REFUSALS = 5  # error replies (not connection errors) before a batch is dropped


@dataclass(frozen=True)
class _Out:
    """The part of a StepOutput that goes to Redis (no tensors)."""

    request_id: str
    seq: int
    ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    entry: str | None
    trace: dict[str, float] | None = None  # first token's latency stamps (HEXGEN_TRACE_TIMING=1 only)
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied
    logprobs: Any = None  # StepOutput's logprobs, prompt_ids and prompt_logprobs
    prompt_ids: Any = None
    prompt_logprobs: Any = None


class RedisSink:
    """Output sink of the last-stage leader.

    :meth:`emit` only queues; a writer thread sends everything queued in one atomic function call (token and
    done events at explicit ids, EXPIRE, XACK of each finished request's work entry). Redis errors are
    retried with backoff (retries are idempotent); :meth:`close` flushes for up to ``flush_timeout_s``.
    """

    def __init__(self, cfg: IOConfig, *, client_factory: ClientFactory | None = None) -> None:
        self.cfg = cfg
        factory = client_factory or partial(connect, cfg.redis_url)
        self._r = factory(10.0)
        self._poster = Poster(self._r, cfg.work_stream, cfg.result_ttl_s)
        self._q: queue.SimpleQueue[list[_Out] | threading.Event | None] = queue.SimpleQueue()
        self._lost: set[str] = set()  # requests another pipeline posts: we stop posting them
        self._newly_lost: list[str] = []  # for lost(): handed to the engine so stage 0 stops them
        self._lost_lock = threading.Lock()
        self._closing_deadline: float | None = None
        self._backoff = Backoff()
        self.steps_written = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="result-writer", daemon=True)

    def start(self) -> RedisSink:
        """Start the writer thread; returns self."""
        self._thread.start()
        return self

    def emit(self, outputs: list[StepOutput]) -> None:
        if outputs:
            self._q.put(
                [
                    _Out(
                        o.request_id,
                        o.seq,
                        tuple(o.ids),
                        o.text,
                        o.finish_reason,
                        o.prompt_tokens,
                        o.completion_tokens,
                        (o.meta or {}).get("entry"),
                        _first_token_stamps(o) if trace.ENABLED else None,
                        o.cached_tokens,
                        o.logprobs,
                        o.prompt_ids,
                        o.prompt_logprobs,
                    )
                    for o in outputs
                ]
            )

    def lost(self) -> list[str]:
        """Requests found taken over by another pipeline since the last call (the engine stops them)."""
        with self._lost_lock:
            out, self._newly_lost = self._newly_lost, []
        return out

    def close(self) -> None:
        """Flush queued events (up to ``flush_timeout_s``), then release the connection."""
        self._closing_deadline = time.monotonic() + self.cfg.flush_timeout_s
        self._q.put(None)
        if self._thread.ident is not None:
            self._thread.join(self.cfg.flush_timeout_s + 5)
        self._r.close()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything emitted so far is written; True when it was (tests, shutdown)."""
        marker = threading.Event()
        self._q.put(marker)
        return marker.wait(timeout_s)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            steps: list[list[_Out]] = []
            markers: list[threading.Event] = []
            stop = False
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    markers.append(item)
                else:
                    steps.append(item)
                if stop or len(steps) >= _MAX_STEPS_PER_WRITE:
                    break
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
            outs = [o for step in steps for o in step]
            if outs:
                self._write_retrying(outs)
            self.steps_written += len(steps)
            for m in markers:
                m.set()
            if stop:
                return

    def _write_retrying(self, outs: list[_Out]) -> None:
        refusals = 0
        while True:
            try:
                self._write(outs)
                self._backoff.ok()
                return
            except (*REDIS_ERRORS, redis.ResponseError) as e:
                self._backoff.fail("result writer", e)
                refusals += isinstance(e, redis.ResponseError)  # Redis answered: retrying may never help
                closing = self._closing_deadline is not None and time.monotonic() > self._closing_deadline
                if closing or refusals >= _MAX_REFUSALS:
                    self.dropped += len(outs)
                    log.error(
                        "result writer: dropped %d outputs (%s); their entries stay pending and are "
                        "resumed from the posted tokens after the lease",
                        len(outs),
                        e,
                    )
                    return
                time.sleep(self._backoff.delay)

    def _posts(self, outs: list[_Out]) -> list[Post]:
        """The events of ``outs`` to post (none for requests another pipeline now posts)."""
        posts: list[Post] = []
        for o in outs:
            if o.request_id in self._lost:
                continue
            if o.ids:
                event = token_event(o.seq, list(o.ids), o.text, o.logprobs, o.prompt_ids, o.prompt_logprobs)
                posts.append(Post(o.request_id, o.seq, event))
            if o.finish_reason is not None:
                try:
                    final = done_event(o.finish_reason, o.prompt_tokens, o.completion_tokens, o.cached_tokens)
                except ProtocolError as e:  # an engine bug must not stop the writer: tell the client instead
                    log.error("request %s: %s", o.request_id, e)
                    final = error_event(INTERNAL, f"the engine ended the request with {o.finish_reason!r}")
                posts.append(Post(o.request_id, o.seq + len(o.ids), final, o.entry or ""))
        return posts

    def _write(self, outs: list[_Out]) -> None:
        picked = time.monotonic() if trace.ENABLED else 0.0
        posts = self._posts(outs)
        statuses = self._poster.post(posts)
        posted = time.monotonic() if trace.ENABLED else 0.0
        for post, status in zip(posts, statuses):
            if status == REFUSED and post.request_id not in self._lost:
                log.warning(
                    "request %s: position %d is taken; another pipeline is posting this request, so "
                    "this one stops posting it",
                    post.request_id,
                    post.position,
                )
                self._lost.add(post.request_id)
                with self._lost_lock:
                    self._newly_lost.append(post.request_id)
        for o in outs:  # a request's final output ends our interest in it
            if o.finish_reason is not None:
                self._lost.discard(o.request_id)
        if trace.ENABLED:
            self._write_traces(outs, picked, posted)

    def _write_traces(self, outs: list[_Out], picked: float, posted: float) -> None:
        traced = [o for o in outs if o.trace is not None]
        if not traced:
            return
        pipe = self._r.pipeline(transaction=False)
        for o in traced:
            fields = {k: repr(v) for k, v in {**(o.trace or {}), "picked": picked, "posted": posted}.items()}
            pipe.xadd(C.TRACE_STREAM, {"id": o.request_id, **fields}, maxlen=C.TRACE_STREAM_MAXLEN, approximate=True)
        pipe.execute()


def _first_token_stamps(o: StepOutput) -> dict[str, float] | None:
    """The request's latency stamps plus ``emit`` (now), for its first token only."""
    found = trace.stamps(o.meta) if o.seq == 0 and o.ids else None
    if found is not None:
        found["emit"] = time.monotonic()
    return found
