"""The head: turns raw ``hexgen:requests`` entries into validated, tokenized work items.

For each entry (consumer group ``heads``; several heads may share it):

1. The request id is its ``id`` field when valid, else the entry id; every event for it goes to
   ``hexgen:result:<id>``.
2. Validate (:mod:`hexgen.head.validation`); unknown model → ``not_found``; tokenize (chat template with
   ``add_generation_prompt=True`` for ``messages``); prompt + max_new_tokens must fit the model's context.
   This needs no Redis, so it runs first.
3. **Duplicates** — the id is reserved with ``SET hexgen:dedupe:<id> <entry id> NX EX``. An entry whose id is
   already reserved by another entry is acked, logged and dropped: nothing is written, so the original's
   result stream is untouched and is the answer to both. (A redelivery of the same entry finds its own entry
   id in the key and carries on.) A refused or failed id stays spent; retry with a new id.
4. Back-pressure: when the work stream's pending + queued depth has reached ``limits.max_queue_depth``, the
   request is refused at once with ``overloaded``.
5. A valid request's reservation, depth check, work item and ack are one script call (one round trip, atomic;
   :mod:`hexgen.head.submit`). A request that failed step 2 has its id reserved (MULTI) and, unless it is
   a duplicate, an error event written (with EXPIRE) and acked in one MULTI; an unexpected failure there (a
   bug, never the request's fault) is answered ``internal`` the same way, so one request cannot stop the head.
   Acked entries are deleted (XDEL, in the same script or MULTI): the requests stream holds only entries
   still to handle, so Redis memory does not grow with the number of requests served. Entries left pending
   by a dead head are reclaimed with XAUTOCLAIM after ``limits.lease_s``; after ``limits.max_deliveries``
   they go to ``hexgen:deadletter`` with an ``internal`` error event.

Cancellation is not the head's business: ``XADD hexgen:cancel '*' id <id>`` is read by the pipelines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import time
import uuid
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hexgen.engine.types import Request
from hexgen.head.deadlines import Deadlines
from hexgen.head.routing import PrefixRouter
from hexgen.head.status import StatusReport, collect_status, queue_status
from hexgen.head.structured import GrammarCompiler
from hexgen.head.submit import DUPLICATE, OVER_LIMIT, Submitter
from hexgen.head.tokenizing import (
    INLINE_TOKENIZE_CHARS,
    check_param_ids,
    load_head_tokenizer,
    model_context_len,
    text_chars,
    tokenize,
)
from hexgen.head.tool_prompt import tool_format
from hexgen.head.validation import check_context, parse_request, peek_request_id
from hexgen.wire import figures, trace
from hexgen.wire import keys as C
from hexgen.wire.functions import aload_library
from hexgen.wire.prefix_summary import PREFER_FIELD
from hexgen.wire.protocol import (
    InternalError,
    NotFound,
    Overloaded,
    RequestError,
    encode_work_item,
    error_event,
)
from hexgen.wire.redis_url import async_wait_replicas, parse_redis_url
from hexgen.wire.settings import Settings, async_redis
from hexgen.wire.text import as_text

log = logging.getLogger(__name__)

READ_COUNT = 16


class Head:
    """One head process. ``run()`` loops until ``stop()``; ``handle_entry`` is the per-request logic."""

    def __init__(
        self,
        settings: Settings,
        tokenizer: Any,
        max_model_len: int,
        *,
        redis: Any,
        reader: Any | None = None,
        consumer: str | None = None,
    ) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.request_limits = settings.limits.request_limits()
        self.tokenizer = tokenizer
        self.grammars = GrammarCompiler(tokenizer)
        self.max_model_len = max_model_len
        self.redis = redis
        self.reader = reader if reader is not None else redis  # blocking XREADGROUP: its own connection
        self.consumer = consumer or f"{C.HEAD_CONSUMER_PREFIX}{socket.gethostname()}-{os.getpid()}"
        self.work_stream = settings.work_stream
        self.health: StatusReport | None = None
        self._stopping = asyncio.Event()
        self._last_reclaim = 0.0
        self.submitter = Submitter(redis, self.work_stream, self.limits.dedupe_ttl_s, self.limits.max_queue_depth)
        self.router = PrefixRouter(redis, settings.model.name) if settings.engine.prefix_routing else None
        self._durability = parse_redis_url(settings.redis.url)  # wait_replicas: WAIT after each submit
        self.deadlines = Deadlines(redis, settings.model.name, self.limits.heartbeat_ttl_s, self.limits.result_ttl_s)

    # ---- lifecycle ---------------------------------------------------------------------------------------

    async def setup(self) -> None:
        """Create the ``heads`` and ``pipelines`` groups (MKSTREAM, from the start of the stream), load the
        function library, and set the epoch when this Redis has none (a new or wiped server)."""
        for stream, group in ((C.REQUESTS_STREAM, C.HEADS_GROUP), (self.work_stream, C.PIPELINES_GROUP)):
            try:
                await self.redis.xgroup_create(stream, group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        await aload_library(self.redis)
        if await self.redis.set(C.EPOCH_KEY, uuid.uuid4().hex, nx=True):
            log.info("head %s: this Redis had no epoch; set a new one", self.consumer)

    async def check_epoch(self) -> None:
        """Set everything up again when Redis lost its data (no epoch: a new, empty server)."""
        if not await self.redis.exists(C.EPOCH_KEY):
            log.warning(
                "head %s: Redis has no epoch: it lost its data (restarted without persistence, or "
                "replaced); recreating the groups, the function library and the epoch",
                self.consumer,
            )
            await self.setup()

    def stop(self) -> None:
        """Stop reading; the entry being handled is finished first."""
        if not self._stopping.is_set():
            log.info("head %s: stopping", self.consumer)
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> None:
        """Set up groups, then read, handle and ack entries until ``stop()``; watch worker health meanwhile.

        Redis outages are waited out with backoff; a Redis that comes back without the groups (a new, empty
        server) is set up again at once (``NOGROUP``) or by the health watch (no epoch)."""
        log.info(
            "head %s: serving model %r from %s into %s",
            self.consumer,
            self.settings.model.name,
            C.REQUESTS_STREAM,
            self.work_stream,
        )
        watcher = asyncio.create_task(self.watch_health(), name="hexgen-head-health")
        deadlines = asyncio.create_task(self.deadlines.run(), name="hexgen-head-deadlines")
        backoff, ready = 0.1, False
        try:
            while not self.stopping:
                try:
                    if not ready:
                        await self.setup()
                        ready = True
                    await self.step()
                    backoff = 0.1
                except (RedisConnectionError, RedisTimeoutError) as e:
                    log.warning("head %s: redis unavailable (%s); retrying in %.1fs", self.consumer, e, backoff)
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                except ResponseError as e:
                    if "NOGROUP" not in str(e):
                        raise
                    log.warning(
                        "head %s: the consumer group is gone (a new, empty Redis?); setting up again", self.consumer
                    )
                    ready = False
        finally:
            watcher.cancel()
            deadlines.cancel()
            await asyncio.gather(watcher, deadlines, return_exceptions=True)
            await self._leave_group()
        log.info("head %s: stopped", self.consumer)

    async def step(self) -> int:
        """Reclaim stale entries when due, then read and handle one batch; returns entries handled."""
        handled = 0
        if time.monotonic() - self._last_reclaim >= self.limits.lease_s / 2:
            self._last_reclaim = time.monotonic()
            handled += await self.reclaim()
        for entry_id, fields in await self._read():
            await self.handle_entry(entry_id, fields)
            handled += 1
        return handled

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def _read(self) -> list[tuple[str, dict]]:
        read = asyncio.ensure_future(
            self.reader.xreadgroup(
                C.HEADS_GROUP, self.consumer, {C.REQUESTS_STREAM: ">"}, count=READ_COUNT, block=self.limits.block_ms
            )
        )
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            done, _ = await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this task is cancelled: leave no orphaned read behind
            stop.cancel()
            if not read.done():  # stopping: entries already delivered stay pending, reclaimed later
                read.cancel()
                await asyncio.gather(read, return_exceptions=True)
        if read not in done:
            return []
        out = []
        for _stream, entries in read.result() or []:
            out += [(as_text(eid), fields) for eid, fields in entries]
        return out

    async def _leave_group(self) -> None:
        """Remove this head's consumer from the group when it holds no pending entries."""
        try:
            for c in await self.redis.xinfo_consumers(C.REQUESTS_STREAM, C.HEADS_GROUP):
                if as_text(c["name"]) == self.consumer and int(c["pending"]) == 0:
                    await self.redis.xgroup_delconsumer(C.REQUESTS_STREAM, C.HEADS_GROUP, self.consumer)
        except (RedisConnectionError, RedisTimeoutError, ResponseError) as e:
            log.debug("head %s: could not leave the group: %s", self.consumer, e)

    # ---- per-entry logic ---------------------------------------------------------------------------------

    async def handle_entry(self, entry_id: str, fields: dict) -> str:
        """Handle one request entry; returns ``queued``, ``duplicate`` or the error code written.

        A valid request costs one round trip after tokenizing (:mod:`hexgen.head.submit`: reserve the id,
        depth check, work XADD and ack in one script). A request that fails validation has its id reserved
        (MULTI) before its error is written, so a duplicate of an earlier entry is dropped without one.
        """
        t_read = time.monotonic()
        request_id = peek_request_id(fields, entry_id)
        try:
            req, model = await self._prepare(entry_id, request_id, fields)
        except RequestError as e:
            return await self._refuse(request_id, entry_id, e)
        except Exception as e:  # noqa: BLE001 -- the per-request boundary: a bug for one request (in parsing,
            # the tokenizer or the chat template; no Redis call happens in _prepare) must not stop the head
            log.exception("head: request %r (entry %s) failed in validation or tokenizing", request_id, entry_id)
            return await self._refuse(
                request_id,
                entry_id,
                InternalError(f"the head could not process this request ({type(e).__name__}); it was not queued"),
            )
        trace.stamp(req.meta, "head_read", t_read)
        trace.stamp(req.meta, "head_tok")
        trace.stamp(req.meta, "head_send")
        item = encode_work_item(req, model)
        prefer = await self.router.prefer(req.prompt_ids + req.output_ids) if self.router is not None else None
        if prefer:  # cache-aware dispatch: offered to this pipeline first (hexgen.head.routing)
            item[PREFER_FIELD] = prefer.encode("utf-8")
        done = await asyncio.shield(self.submitter.submit(request_id, entry_id, item))
        if self._durability.wait_replicas and done.status != OVER_LIMIT:
            await async_wait_replicas(self.redis, self._durability)  # docs/reliability.md: the loss window
        if done.status == DUPLICATE:
            self._log_duplicate(request_id, entry_id, done.owner)
            return "duplicate"
        if done.status == OVER_LIMIT:
            error = Overloaded(
                f"the work queue of model {model!r} holds {done.depth} requests (limit "
                f"{self.limits.max_queue_depth}); retry later with a new id"
            )
            await self.fail(request_id, entry_id, error)
            return error.code
        self.deadlines.add(request_id, req.meta.get("deadline_s") or self.limits.default_deadline_s)
        log.debug("head: queued %r (%d prompt tokens)", request_id, len(req.prompt_ids))
        return "queued"

    async def _refuse(self, request_id: str, entry_id: str, error: RequestError) -> str:
        """Reserve the id of a request that failed validation; write its error unless it is a duplicate."""
        owner = await self._reserve(request_id, entry_id)
        if owner is not None and owner != entry_id:
            self._log_duplicate(request_id, entry_id, owner)
            await self._ack(entry_id)
            return "duplicate"
        await self.fail(request_id, entry_id, error)
        return error.code

    @staticmethod
    def _log_duplicate(request_id: str, entry_id: str, owner: str) -> None:
        log.warning(
            "head: dropped duplicate request id %r (entry %s; first seen in entry %s)", request_id, entry_id, owner
        )

    async def _reserve(self, request_id: str, entry_id: str) -> str | None:
        """Reserve the id for this entry (SET NX, GET in one MULTI) for a request that failed validation;
        returns the entry that owns the id (None if the key vanished). Valid requests reserve in the script."""
        async with self.redis.pipeline(transaction=True) as p:
            p.set(C.dedupe_key(request_id), entry_id, nx=True, ex=self.limits.dedupe_ttl_s)
            p.get(C.dedupe_key(request_id))
            _, owner = await p.execute()
        return None if owner is None else as_text(owner)

    async def _prepare(self, entry_id: str, request_id: str, fields: dict) -> tuple[Request, str]:
        parsed = parse_request(fields, entry_id, self.request_limits)
        model = parsed.model or self.settings.model.name
        if model != self.settings.model.name:
            raise NotFound(f"model: {model!r} is not served here; available: {self.settings.model.name}")
        check_param_ids(self.tokenizer, parsed)
        if text_chars(parsed) <= INLINE_TOKENIZE_CHARS:
            ids = tokenize(self.tokenizer, parsed)
        else:
            ids = await asyncio.to_thread(tokenize, self.tokenizer, parsed)
        check_context(len(ids), parsed.params.max_new_tokens, self.max_model_len)
        params = parsed.params
        if parsed.structured is not None:  # compiled in a thread, cached by hash (hexgen.head.structured)
            fmt = tool_format(self.tokenizer.chat_template) if parsed.structured.calls_tools else None
            grammar = await asyncio.to_thread(self.grammars.compile, parsed.structured, fmt)
            params = dataclasses.replace(params, grammar=grammar)
        meta = {
            "request_entry": entry_id,
            "head": self.consumer,
            "received_at": time.time(),
            "deadline_s": parsed.deadline_s or self.limits.default_deadline_s,
        }
        return Request(request_id, ids, params, meta=meta), model

    async def queue_depth(self) -> int:
        """Work items queued or pending in this model's work stream."""
        return (await queue_status(self.redis, self.work_stream, C.PIPELINES_GROUP)).depth

    async def fail(self, request_id: str, entry_id: str, error: RequestError) -> None:
        """Write an error event to the request's result stream (with EXPIRE), ack and delete the entry, atomically."""
        log.info("head: request %r refused: %s", request_id, error)
        stream = C.result_stream(request_id)
        async with self.redis.pipeline(transaction=True) as p:
            p.xadd(stream, error_event(error.code, error.message))
            p.expire(stream, self.limits.result_ttl_s)
            p.hincrby(figures.ERRORS_KEY, error.code, 1)  # /metrics: hexgen_request_errors_total
            p.xack(C.REQUESTS_STREAM, C.HEADS_GROUP, entry_id)
            p.xdel(C.REQUESTS_STREAM, entry_id)
            await asyncio.shield(p.execute())

    async def _ack(self, entry_id: str) -> None:
        """Ack a request entry and delete it (an acked entry is never read again); one round trip, no MULTI
        (an XDEL lost between the two would only leave the entry's memory behind)."""
        async with self.redis.pipeline(transaction=False) as p:
            p.xack(C.REQUESTS_STREAM, C.HEADS_GROUP, entry_id)
            p.xdel(C.REQUESTS_STREAM, entry_id)
            await asyncio.shield(p.execute())

    async def reclaim(self) -> int:
        """Take over entries another head left pending longer than the lease; dead-letter repeat failures."""
        handled, start = 0, "0-0"
        idle_ms = int(self.limits.lease_s * 1000)
        while True:
            reply = await self.redis.xautoclaim(
                C.REQUESTS_STREAM, C.HEADS_GROUP, self.consumer, idle_ms, start_id=start, count=READ_COUNT
            )
            start, entries = as_text(reply[0]), reply[1]
            for eid, fields in entries:
                eid = as_text(eid)
                if fields is None:
                    continue
                if await self._deliveries(eid) > self.limits.max_deliveries:
                    await self.dead_letter(eid, fields)
                else:
                    log.info("head %s: reclaimed stale entry %s", self.consumer, eid)
                    await self.handle_entry(eid, fields)
                handled += 1
            if start == "0-0" or not entries:
                return handled

    async def _deliveries(self, entry_id: str) -> int:
        rows = await self.redis.xpending_range(C.REQUESTS_STREAM, C.HEADS_GROUP, entry_id, entry_id, 1)
        return int(rows[0]["times_delivered"]) if rows else 0

    async def dead_letter(self, entry_id: str, fields: dict) -> None:
        """Move an entry that keeps failing to ``hexgen:deadletter`` and tell the client."""
        request_id = peek_request_id(fields, entry_id)
        reason = f"request entry {entry_id} failed {self.limits.max_deliveries} times in the head"
        log.error("head: dead-lettering %r: %s", request_id, reason)
        dl = {"source": C.REQUESTS_STREAM, "entry": entry_id, "id": request_id, "reason": reason}
        async with self.redis.pipeline(transaction=True) as p:
            p.xadd(C.DEADLETTER_STREAM, dl, maxlen=C.DEADLETTER_MAXLEN, approximate=True)
            await asyncio.shield(p.execute())
        owner = await self.redis.get(C.dedupe_key(request_id))
        if owner is not None and as_text(owner) != entry_id:  # a duplicate: the id's stream is the original's
            await self._ack(entry_id)
            return
        await self.fail(request_id, entry_id, InternalError(reason))

    # ---- health --------------------------------------------------------------------------------------------

    async def check_health(self) -> StatusReport:
        """Read the registry; log workers that died or came back and pipelines that changed state."""
        report = await collect_status(self.redis, self.limits.heartbeat_ttl_s)
        before = self.health
        if before is not None:
            was_alive = {w.id: w.alive for w in before.workers}
            for w in report.workers:
                if was_alive.get(w.id, not w.alive) != w.alive:
                    (log.info if w.alive else log.warning)(
                        "worker %s (pipeline %s stage %d rank %d on %s %s) is %s",
                        w.id,
                        w.record.pipeline,
                        w.record.stage,
                        w.record.tp_rank,
                        w.record.host,
                        w.record.device,
                        "alive" if w.alive else "dead: heartbeat expired",
                    )
            states = {p.id: p.state for p in before.pipelines}
            for p in report.pipelines:
                if states.get(p.id) != p.state:
                    log.info("pipeline %s is %s (%s)", p.id, p.state, p.layout)
        for p in report.pipelines:
            if p.state == "ready" and p.alive_workers < p.workers:
                log.warning(
                    "pipeline %s is ready but %d of its %d workers have no heartbeat",
                    p.id,
                    p.workers - p.alive_workers,
                    p.workers,
                )
        self.health = report
        return report

    async def watch_health(self) -> None:
        """Check the epoch and health every half heartbeat TTL until stopped."""
        while not self.stopping:
            try:
                await self.check_epoch()
                await self.check_health()
            except (RedisConnectionError, RedisTimeoutError, ResponseError) as e:
                log.warning("head: health check failed: %s", e)
            await self._sleep(self.limits.heartbeat_ttl_s / 2)


def _http_front(settings: Settings, tokenizer: Any) -> Any:
    """The head's HTTP front (:class:`hexgen.head.http.app.HttpFront`, its port bound), or None when off."""
    if not settings.http.enabled:
        return None
    from hexgen.head.http.app import HttpFront

    return HttpFront(settings, settings.http.host, settings.http.port, settings.http.api_key, tokenizer=tokenizer)


async def run_head(
    settings: Settings, *, tokenizer: Any | None = None, install_signals: bool = True, placement: Any | None = None
) -> None:
    """Run a head until SIGTERM/SIGINT: load the tokenizer, connect, serve, close connections.

    With ``settings.http`` enabled the head also serves the OpenAI-compatible HTTP API on its loop
    (:class:`hexgen.head.http.app.HttpFront`; the port is bound first, so a busy one fails the start). It
    stops with the head: no new connections, open responses get a few seconds to finish.

    ``placement`` (a :class:`~hexgen.head.placement.Placer`, ``--auto-plan``) also runs the
    placement loop: this head may become the one that plans the registered agents' stages.
    """
    tokenizer = tokenizer if tokenizer is not None else load_head_tokenizer(settings)
    max_len = model_context_len(settings)
    front = _http_front(settings, tokenizer)  # binds the port first: a busy one fails here
    url = settings.redis.url
    redis = async_redis(url, socket_timeout=settings.limits.socket_timeout_s)
    reader = async_redis(url, socket_timeout=settings.limits.socket_timeout_s)
    head = Head(settings, tokenizer, max_len, redis=redis, reader=reader)
    loop = asyncio.get_running_loop()
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, head.stop)
    log.info("head: redis %s, model %s (context %d tokens)", settings.redis.display_url, settings.model.name, max_len)
    planning = None
    if placement is not None:
        from hexgen.head.placement import PlacementLoop

        planner = PlacementLoop(settings, placement, redis=redis, consumer=head.consumer)
        planning = asyncio.create_task(planner.run(), name="hexgen-head-placement")
    if front is not None:
        front.start(on_failure=head.stop)  # the HTTP server dying stops the head too
    try:
        await head.run()
    finally:
        if front is not None:
            await front.close()
        if planning is not None:
            planner.stop()
            await asyncio.gather(planning, return_exceptions=True)
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        await reader.aclose()
        await redis.aclose()
