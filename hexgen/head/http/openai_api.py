"""The OpenAI-compatible routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
and the probes ``GET /health`` and ``GET /ready``.

A generation request is translated into the fields every HexGen client sends and validated
(:mod:`hexgen.head.http.openai_request`), then XADDed to ``hexgen:requests``
through :class:`hexgen.client.HexGenClient`; its events are read from ``hexgen:result:<id>``. The head
validates, tokenizes and queues it exactly as it does any other request, so dedupe, back-pressure, failover
and exactly-once delivery are the same.

The first event is awaited before the response starts, so a refusal by the head (context too long: 400,
queue full: 429) still gets its HTTP status, streaming or not. A client that disconnects before its answer
is complete has its request cancelled (``XADD hexgen:cancel``): the pipeline frees its KV and writes
``done cancelled``. Answers are shaped by :mod:`hexgen.head.http.openai_response`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from hexgen.client import HexGenClient
from hexgen.head import jsoncheck
from hexgen.head.http.context import HttpContext, RequestRecord
from hexgen.head.http.errors import APIError, from_request_error, not_ready, unknown_model
from hexgen.head.http.openai_choices import TokenTexts
from hexgen.head.http.openai_fanout import Fanout
from hexgen.head.http.openai_request import rename_error, translate
from hexgen.head.http.openai_response import DONE_LINE, Answer, openai_finish_reason
from hexgen.head.http.openai_stream import Disconnected, EventStream, until_disconnect
from hexgen.head.http.readiness import Readiness
from hexgen.wire.protocol import DoneEvent, RequestError, TokenEvent

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for a client that went away (nobody receives it; counted as cancelled)
BODY_CAP_FACTOR = 2  # a body may be this many times limits.max_request_bytes (JSON escapes), then 413


class OpenAIRoutes:
    """The route handlers of one app; ``client`` sends requests and reads events over ``ctx.redis``."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        limits = ctx.settings.limits
        self.client = HexGenClient(
            ctx.settings.redis.url, block_ms=limits.block_ms, redis=ctx.redis, reader_ttl_s=limits.lease_s
        )
        self.readiness = Readiness(ctx.redis, limits.heartbeat_ttl_s, max_age_s=min(1.0, limits.heartbeat_interval_s))
        self.body_cap = BODY_CAP_FACTOR * limits.max_request_bytes
        self._background: set[asyncio.Task] = set()
        self.texts = TokenTexts(ctx.tokenizer)

    # ---- helpers ----

    async def _body(self, request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.body_cap:
            raise APIError(
                413,
                f"request body: {length} bytes exceeds the limit of {self.body_cap} bytes",
                code="request_too_large",
            )
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.body_cap:
                    raise APIError(
                        413, f"request body: exceeds the limit of {self.body_cap} bytes", code="request_too_large"
                    )
                chunks.append(chunk)
        except ClientDisconnect:
            raise APIError(CLIENT_CLOSED, "client closed the request", code="client_closed") from None
        try:
            return jsoncheck.loads(b"".join(chunks))
        except RequestError as e:
            raise from_request_error(e) from None

    def _cancel_later(self, request_ids: list[str]) -> None:
        """Send the cancels from their own task: the handler's own task is being cancelled."""
        task = asyncio.get_running_loop().create_task(self._cancel(request_ids))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            try:
                await self.client.cancel(request_id)
                log.info("http: client went away; cancelled request %s", request_id)
            except (RedisConnectionError, RedisTimeoutError) as e:
                log.warning("http: could not cancel request %s: %s", request_id, e)

    # ---- generation ----

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completions")

    async def _generate(self, request: Request, endpoint: str) -> Response:
        ctx, started = self.ctx, time.monotonic()
        rec = _Recorder(ctx, endpoint, started)
        try:
            tr = translate(await self._body(request), endpoint, ctx)
            rec.model, rec.stream = tr.model, tr.stream
            rec.n, rec.max_tokens = tr.n, tr.params.get("max_new_tokens")
            try:
                ready = await self.readiness.is_ready(tr.model)
            except (RedisConnectionError, RedisTimeoutError) as e:
                raise _redis_down(e) from None
            if not ready:
                raise not_ready(tr.model)
            fan = Fanout(self.client, tr, self.texts)
            firsts = await self._firsts(fan, request)
        except APIError as e:
            rec.finish(e.status, "cancelled" if e.status == CLIENT_CLOSED else "error", e.code or "")
            raise
        except Exception:
            rec.finish(500, "error", "internal_error")
            raise
        if tr.stream:
            return EventStream(self._sse(fan, firsts, rec), on_close=lambda: self._closed(fan, rec))
        try:
            return await self._collect(fan, firsts, rec, request)
        except Exception:
            rec.finish(500, "error", "internal_error")  # no-op when _collect recorded it
            raise

    async def _firsts(self, fan: Fanout, request: Request) -> list[TokenEvent | None]:
        """Send the requests and wait for each one's first event, cancelling them all on disconnect or error."""
        tr = fan.tr
        try:
            return await until_disconnect(request, fan.firsts())
        except Disconnected:
            self._cancel_later(fan.request_ids)
            raise APIError(CLIENT_CLOSED, "client closed the request", code="client_closed") from None
        except RequestError as e:
            if len(tr.jobs) > 1:
                self._cancel_later(fan.request_ids)
            raise rename_error(e, tr.rename, tr.endpoint) from None
        except (RedisConnectionError, RedisTimeoutError) as e:
            raise _redis_down(e) from None
        except asyncio.CancelledError:
            self._cancel_later(fan.request_ids)
            raise

    async def _collect(
        self, fan: Fanout, firsts: list[TokenEvent | None], rec: _Recorder, request: Request
    ) -> Response:
        tr = fan.tr
        echoes = [c.first_text(f)[0] for c, f in zip(fan.choices, firsts)]
        for c, f in zip(fan.choices, firsts):
            if f is not None:
                rec.first_token()
                c.add(f)

        async def rest() -> None:
            async for i, ev in fan.rest(firsts):
                if ev is None:
                    fan.finish(i)
                else:
                    fan.choices[i].add(ev)

        try:
            await until_disconnect(request, rest())
        except Disconnected:
            self._cancel_later(fan.request_ids)
            rec.finish(CLIENT_CLOSED, "cancelled", "client_closed")
            return Response(status_code=CLIENT_CLOSED)
        except RequestError as e:
            err = rename_error(e, tr.rename, tr.endpoint)
            self._cancel_later(fan.request_ids)
            rec.finish(err.status, "error", err.code or "")
            raise err from None
        except (RedisConnectionError, RedisTimeoutError) as e:
            err = _redis_down(e)
            rec.finish(err.status, "error", err.code or "")
            raise err from None
        except asyncio.CancelledError:
            self._cancel_later(fan.request_ids)
            raise
        done = fan.done()
        rec.finish(200, openai_finish_reason(done.finish_reason), "", done)
        choices = [c.whole(e) for c, e in zip(fan.choices, echoes)]
        return JSONResponse(Answer(tr).full(choices, done))

    async def _sse(self, fan: Fanout, firsts: list[TokenEvent | None], rec: _Recorder) -> AsyncIterator[str]:
        tr = fan.tr
        ans = Answer(tr)
        try:
            for x in _opening_chunks(ans, fan, firsts, rec):
                yield x
            async for i, ev in fan.rest(firsts):
                for x in _event_chunks(ans, fan, i, ev):
                    yield x
            done = fan.done()
            if tr.include_usage:
                yield ans.usage_chunk(done)
            rec.finish(200, openai_finish_reason(done.finish_reason), "", done)
        except (RequestError, RedisConnectionError, RedisTimeoutError) as e:
            err = rename_error(e, tr.rename, tr.endpoint) if isinstance(e, RequestError) else _redis_down(e)
            rec.finish(200, "error", err.code or "")
            yield err.sse()
        except Exception as e:  # noqa: BLE001 - whatever failed, the client gets an error event and [DONE]
            log.exception("http: stream of request %s failed", tr.request_id)
            rec.finish(200, "error", "internal_error")
            yield APIError(500, f"internal error: {type(e).__name__}", code="internal_error").sse()
        yield DONE_LINE

    def _closed(self, fan: Fanout, rec: _Recorder) -> None:
        """After a stream's response ended: a stream that did not finish lost its client; cancel it."""
        if not rec.done:
            self._cancel_later(fan.request_ids)
            rec.finish(200, "cancelled", "client_closed")

    # ---- models and probes ----

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model(m) for m in self.ctx.models]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in self.ctx.models:
            raise unknown_model(name, self.ctx.models)
        return JSONResponse(self._model(name))

    def _model(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": int(self.ctx.started_at), "owned_by": "hexgen"}

    async def health(self, request: Request) -> Response:
        try:
            await self.ctx.redis.ping()
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            return JSONResponse({"status": "unhealthy", "redis": f"down: {type(e).__name__}"}, status_code=503)
        return JSONResponse({"status": "ok", "redis": "up"})

    async def ready(self, request: Request) -> Response:
        try:
            pipes = [p for m in self.ctx.models for p in await self.readiness.pipelines(m)]
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            return JSONResponse({"status": "not_ready", "reason": f"redis down: {type(e).__name__}"}, status_code=503)
        body = {
            "status": "ready" if pipes else "not_ready",
            "models": list(self.ctx.models),
            "pipelines": [{"id": p.id, "model": p.model, "layout": p.layout, "workers": p.workers} for p in pipes],
        }
        return JSONResponse(body, status_code=200 if pipes else 503)

    async def aclose(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _opening_chunks(ans: Answer, fan: Fanout, firsts: list[TokenEvent | None], rec: _Recorder) -> list[str]:
    """Each choice's first chunks: the assistant role (chat) or the echoed prompt, then its first tokens."""
    out: list[str] = []
    for c, f in zip(fan.choices, firsts):
        text, lps = c.first_text(f)
        if ans.chat:
            out.append(ans.chunk("", first=True, index=c.index))
        elif text:
            out.append(ans.chunk(text, index=c.index, logprobs=lps))
        if f is not None:  # one chunk per token event, also when its tokens added no text yet
            rec.first_token()
            text, lps = c.add(f)
            out += ans.text_chunks(text, c.index, lps)
    return out


def _event_chunks(ans: Answer, fan: Fanout, i: int, ev: TokenEvent | None) -> list[str]:
    """Choice ``i``'s chunks for its next token event, or its last ones when it is done (``ev`` None)."""
    c = fan.choices[i]
    if ev is None:
        return ans.end_chunks(fan.finish(i), c.index)
    text, lps = c.add(ev)
    return ans.text_chunks(text, c.index, lps)


def _redis_down(e: Exception) -> APIError:
    return APIError(
        503,
        f"redis is unavailable ({type(e).__name__}); retry later",
        code="redis_unavailable",
        headers={"Retry-After": "1"},
    )


class _Recorder:
    """Collects one request's outcome for ``ctx.counters`` (once) and keeps ``in_flight`` right."""

    def __init__(self, ctx: HttpContext, endpoint: str, started: float) -> None:
        self.ctx, self.endpoint, self.started = ctx, endpoint, started
        self.model, self.stream = ctx.model, False
        self.n, self.max_tokens = 1, None
        self.first_at: float | None = None
        self.done = False
        ctx.counters.in_flight += 1

    def first_token(self) -> None:
        if self.first_at is None:
            self.first_at = time.monotonic()

    def finish(self, status: int, outcome: str, error_code: str, done: DoneEvent | None = None) -> None:
        if self.done:
            return
        self.done = True
        self.ctx.counters.in_flight -= 1
        self.ctx.counters.record(
            RequestRecord(
                endpoint=self.endpoint,
                model=self.model,
                stream=self.stream,
                status=status,
                outcome=outcome,
                error_code=error_code,
                prompt_tokens=done.prompt_tokens if done else 0,
                completion_tokens=done.completion_tokens if done else 0,
                started_at=self.started,
                first_token_at=self.first_at,
                finished_at=time.monotonic(),
                n=self.n,
                max_tokens=self.max_tokens,
            )
        )


def install(app: Starlette, ctx: HttpContext) -> OpenAIRoutes:
    """Add the /v1 routes and the probes to ``app``."""
    routes = OpenAIRoutes(ctx)
    app.add_route("/v1/chat/completions", routes.chat, methods=["POST"])
    app.add_route("/v1/completions", routes.completions, methods=["POST"])
    app.add_route("/v1/models", routes.models, methods=["GET"])
    app.add_route("/v1/models/{model}", routes.model, methods=["GET"])
    app.add_route("/health", routes.health, methods=["GET"])
    app.add_route("/ready", routes.ready, methods=["GET"])
    return routes
