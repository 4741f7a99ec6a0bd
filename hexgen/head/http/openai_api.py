"""The OpenAI-compatible routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
and the probes ``GET /health`` and ``GET /ready``.

A generation request is translated into the fields every HexGen client sends (:func:`translate`), checked
with the Redis path's own validation (:func:`hexgen.head.validation.parse_request`, so a bad value is a
400 naming the parameter and its range before anything is queued), then XADDed to ``hexgen:requests``
through :class:`hexgen.client.HexGenClient`; its events are read from ``hexgen:result:<id>``. The head
validates, tokenizes and queues it exactly as it does any other request, so dedupe, back-pressure, failover
and exactly-once delivery are the same.

The first event is awaited before the response starts, so a refusal by the head (context too long: 400,
queue full: 429) still gets its HTTP status, streaming or not. A client that disconnects before its answer
is complete has its request cancelled (``XADD hexgen:cancel``): the pipeline frees its KV and writes
``done cancelled``. OpenAI's defaults apply to what a request leaves out (``temperature`` 1), except
``max_tokens``, which defaults to the deployment's ``limits.default_max_new_tokens``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from hexgen.client import HexGenClient
from hexgen.head import jsoncheck
from hexgen.head.http.context import HttpContext, RequestRecord
from hexgen.head.http.errors import APIError, from_request_error, invalid, not_ready, unknown_model, unsupported
from hexgen.head.http.readiness import Readiness
from hexgen.head.validation import parse_request
from hexgen.wire.protocol import DoneEvent, Fields, RequestError, TokenEvent, request_fields

log = logging.getLogger(__name__)

OPENAI_DEFAULT_TEMPERATURE = 1.0
CLIENT_CLOSED = 499  # nginx's status for a client that went away (nobody receives it; counted as cancelled)
BODY_CAP_FACTOR = 2  # a body may be this many times limits.max_request_bytes (JSON escapes), then 413

# Parameters accepted at their no-op value only: anything else would change the output, so it is a 400.
# name -> (the values that do nothing, what the error says)
_INERT: dict[str, tuple[tuple[Any, ...], str]] = {
    "presence_penalty": ((None, 0, 0.0), "only 0 is supported"),
    "frequency_penalty": ((None, 0, 0.0), "only 0 is supported"),
    "repetition_penalty": ((None, 1, 1.0), "only 1 is supported"),
    "min_p": ((None, 0, 0.0), "only 0 is supported"),
    "logit_bias": ((None, {}), "is not supported (only null or {})"),
    "logprobs": ((None, False), "is not supported (only null or false)"),
    "top_logprobs": ((None, 0), "is not supported (only null or 0)"),
    "tools": ((None, []), "is not supported (function calling is not implemented)"),
    "functions": ((None, []), "is not supported (function calling is not implemented)"),
    "tool_choice": ((None, "none", "auto"), 'is not supported (only null, "none" or "auto" without tools)'),
    "function_call": ((None, "none", "auto"), "is not supported (function calling is not implemented)"),
    "response_format": ((None, {"type": "text"}), 'is not supported (only {"type": "text"})'),
    "modalities": ((None, ["text"]), 'is not supported (only ["text"])'),
    "audio": ((None,), "is not supported"),
    "prediction": ((None,), "is not supported"),
    "reasoning_effort": ((None,), "is not supported"),
    "web_search_options": ((None,), "is not supported"),
    "echo": ((None, False), "is not supported (only false)"),
    "suffix": ((None, ""), "is not supported (only null)"),
    "best_of": ((None, 1), "is not supported (only 1)"),
    "n": ((None, 1), "only 1 is supported (one choice per request)"),
}
# Accepted and without effect on the output.
_NO_EFFECT = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
_COMMON = (
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "top_k",
    "ignore_eos",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
    "logit_bias",
    "logprobs",
    "user",
    "deadline_s",
)
CHAT_PARAMS = frozenset(
    _COMMON
    + (
        "messages",
        "max_completion_tokens",
        "top_logprobs",
        "tools",
        "functions",
        "tool_choice",
        "function_call",
        "response_format",
        "modalities",
        "audio",
        "prediction",
        "reasoning_effort",
        "web_search_options",
        "metadata",
        "store",
        "service_tier",
        "parallel_tool_calls",
    )
)
COMPLETION_PARAMS = frozenset(_COMMON + ("prompt", "echo", "suffix", "best_of"))
_ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


# ---- request translation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Translated:
    """An OpenAI request as HexGen request fields, plus what shapes the answer."""

    endpoint: str  # chat | completions
    model: str
    params: dict[str, Any]  # HexGenClient.stream's keyword arguments
    fields: dict[str, str]  # the request fields they make (validated)
    request_id: str
    stream: bool
    include_usage: bool
    rename: dict[str, str] = field(default_factory=dict)  # wire field -> the request's parameter name


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _want(cond: bool, param: str, what: str, value: Any) -> None:
    if not cond:
        raise invalid(f"{param}: {json.dumps(value)[:60]} must be {what}", param)


def _content_text(i: int, content: Any) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise unsupported(
                    f"messages[{i}].content[{j}]", 'only text parts ({"type": "text", "text": "..."}) are supported'
                )
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"messages[{i}].content: must be a string or a list of text parts", f"messages[{i}].content")


def _messages(value: Any) -> list[dict[str, Any]]:
    _want(isinstance(value, list) and len(value) > 0, "messages", "a non-empty list of messages", value)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise invalid(f'messages[{i}]: must be an object {{"role": ..., "content": ...}}', f"messages[{i}]")
        for k, v in m.items():
            if k not in ("role", "content") and v is not None:
                raise unsupported(f"messages[{i}].{k}", "is not supported (messages carry role and content)")
        role: Any = m.get("role")
        out.append({"role": _ROLE_ALIASES.get(role, role), "content": _content_text(i, m.get("content"))})
    return out


def _prompt(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, list) and all(isinstance(p, str) for p in value):
        raise unsupported("prompt", f"a list of {len(value)} prompts is not supported; send one prompt per request")
    if isinstance(value, list):
        raise unsupported("prompt", "token-id prompts are not supported; send text")
    raise invalid("prompt: must be a string", "prompt")


def _check_names(body: dict[str, Any], endpoint: str) -> None:
    """Unknown parameters, and known ones at a value that would change the output, are 400s."""
    allowed, path = (
        (CHAT_PARAMS, "/v1/chat/completions") if endpoint == "chat" else (COMPLETION_PARAMS, "/v1/completions")
    )
    for k in body:
        if k not in allowed:
            raise unsupported(k, f"unknown parameter for {path}")
    for k, (ok, why) in _INERT.items():
        if k in body and body[k] not in ok:
            raise unsupported(k, why)


def _served_model(body: dict[str, Any], ctx: HttpContext) -> str:
    model = body.get("model", ctx.model)
    _want(isinstance(model, str) and model != "", "model", "a model name (GET /v1/models lists them)", model)
    if model not in ctx.models:
        raise unknown_model(model, ctx.models)
    return model


def _text_input(body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    if endpoint == "chat":
        if "messages" not in body:
            raise invalid("messages: missing; give the conversation as a list of {role, content}", "messages")
        return {"messages": _messages(body["messages"])}
    if "prompt" not in body:
        raise invalid("prompt: missing", "prompt")
    return {"prompt": _prompt(body["prompt"])}


def _length(body: dict[str, Any], kw: dict[str, Any]) -> str:
    """Set ``max_new_tokens`` from max_completion_tokens or max_tokens; returns the parameter's name."""
    name = next((p for p in ("max_completion_tokens", "max_tokens") if body.get(p) is not None), None)
    if name is None:
        return "max_tokens"
    _want(_is_int(body[name]), name, "an integer ≥ 1", body[name])
    kw["max_new_tokens"] = body[name]
    return name


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    """temperature (OpenAI's default when left out), top_p, seed, top_k, stop, ignore_eos: types only; the
    ranges are the Redis path's validation's."""
    t = body.get("temperature")
    if t is not None:
        _want(_is_num(t), "temperature", "a number (0 = greedy)", t)
    kw: dict[str, Any] = {"temperature": float(OPENAI_DEFAULT_TEMPERATURE if t is None else t)}
    if body.get("top_p") is not None:
        _want(_is_num(body["top_p"]), "top_p", "a number with 0 < top_p ≤ 1", body["top_p"])
        kw["top_p"] = float(body["top_p"])
    for name in ("seed", "top_k"):
        if body.get(name) is not None:
            _want(_is_int(body[name]), name, "an integer", body[name])
            kw[name] = body[name]
    stop = body.get("stop")
    if stop is not None:
        ok = isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
        _want(ok, "stop", "a string or a list of strings", stop)
        if stop != []:
            kw["stop"] = stop
    if body.get("ignore_eos") is not None:
        _want(isinstance(body["ignore_eos"], bool), "ignore_eos", "true or false", body["ignore_eos"])
        kw["ignore_eos"] = body["ignore_eos"]
    if body.get("deadline_s") is not None:
        _want(_is_num(body["deadline_s"]), "deadline_s", "a number of seconds > 0", body["deadline_s"])
        kw["deadline_s"] = float(body["deadline_s"])
    return kw


def _streaming(body: dict[str, Any]) -> tuple[bool, bool]:
    """``(stream, include_usage)``."""
    stream = body.get("stream")
    _want(stream is None or isinstance(stream, bool), "stream", "true or false", stream)
    opts = body.get("stream_options")
    if opts is None:
        return bool(stream), False
    _want(isinstance(opts, dict), "stream_options", 'an object such as {"include_usage": true}', opts)
    for k in opts:
        if k != "include_usage":
            raise unsupported(f"stream_options.{k}", "unknown option (only include_usage)")
    iu = opts.get("include_usage")
    _want(iu is None or isinstance(iu, bool), "stream_options.include_usage", "true or false", iu)
    if not stream:
        raise invalid("stream_options: only allowed with stream: true", "stream_options")
    return True, bool(iu)


def translate(body: Any, endpoint: str, ctx: HttpContext) -> Translated:
    """Check an OpenAI request body's parameters and turn it into HexGen request fields (APIError if not)."""
    if not isinstance(body, dict):
        raise invalid("request body: must be a JSON object", None)
    _check_names(body, endpoint)
    model = _served_model(body, ctx)
    kw: dict[str, Any] = {"model": model, **_text_input(body, endpoint)}
    rename = {"max_new_tokens": _length(body, kw)}
    kw.update(_sampling(body))
    stream, include_usage = _streaming(body)
    request_id = uuid.uuid4().hex
    fields = request_fields(request_id=request_id, **kw)
    try:  # the Redis path's validation, before anything is queued
        parse_request(cast(Fields, fields), request_id, ctx.settings.limits.request_limits())
    except RequestError as e:
        raise _rename_error(e, rename, endpoint) from None
    return Translated(endpoint, model, kw, fields, request_id, stream, include_usage, rename)


def _rename_error(e: RequestError, rename: dict[str, str], endpoint: str) -> APIError:
    out = from_request_error(e, rename)
    if endpoint == "chat" and out.message.startswith("prompt, "):  # the head's context check on chat
        out.message = "messages, " + out.message[len("prompt, ") :]
    return out


# ---- answers -----------------------------------------------------------------------------------------------


def openai_finish_reason(reason: str) -> str:
    """Ours -> OpenAI's: eos and stop strings are ``stop``; ``length`` as is; ``cancelled`` (by a
    ``hexgen:cancel`` from elsewhere) is passed through."""
    return "stop" if reason in ("eos", "stop") else reason


def _usage(done: DoneEvent) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


class _Answer:
    """Builds the JSON of one request's answer and stream chunks."""

    def __init__(self, tr: Translated) -> None:
        self.tr = tr
        self.chat = tr.endpoint == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + tr.request_id
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.tr.model,
            "system_fingerprint": None,
        }

    def full(self, text: str, done: DoneEvent) -> dict[str, Any]:
        reason = openai_finish_reason(done.finish_reason)
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": reason,
            }
            out = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            out = self._head("text_completion")
        out.update(choices=[choice], usage=_usage(done))
        return out

    def chunk(self, text: str | None, reason: str | None = None, first: bool = False) -> str:
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            out = self._head("text_completion")
        out["choices"] = [choice]
        if self.tr.include_usage:
            out["usage"] = None
        return _sse(out)

    def usage_chunk(self, done: DoneEvent) -> str:
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        out.update(choices=[], usage=_usage(done))
        return _sse(out)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


DONE_LINE = "data: [DONE]\n\n"


# ---- the routes --------------------------------------------------------------------------------------------


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

    def _cancel_later(self, request_id: str) -> None:
        """Send the cancel from its own task: the handler's own task is being cancelled."""
        task = asyncio.get_running_loop().create_task(self._cancel(request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel(self, request_id: str) -> None:
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
            try:
                ready = await self.readiness.is_ready(tr.model)
            except (RedisConnectionError, RedisTimeoutError) as e:
                raise _redis_down(e) from None
            if not ready:
                raise not_ready(tr.model)
            gen = self.client.stream(request_id=tr.request_id, **tr.params)
            events = gen.__aiter__()
            first = await self._first(events, gen, tr, request)
        except APIError as e:
            rec.finish(e.status, "cancelled" if e.status == CLIENT_CLOSED else "error", e.code or "")
            raise
        except Exception:
            rec.finish(500, "error", "internal_error")
            raise
        if tr.stream:
            return _EventStream(self._sse(tr, gen, events, first, rec), on_close=lambda: self._closed(tr, rec))
        try:
            return await self._collect(tr, gen, events, first, rec, request)
        except Exception:
            rec.finish(500, "error", "internal_error")  # no-op when _collect recorded it
            raise

    async def _first(
        self, events: AsyncIterator[TokenEvent], gen: Any, tr: Translated, request: Request
    ) -> TokenEvent | None:
        """Send the request and wait for its first event (None: done with no token), cancelling on disconnect."""
        try:
            return await _until_disconnect(request, _next(events))
        except _Disconnected:
            self._cancel_later(tr.request_id)
            raise APIError(CLIENT_CLOSED, "client closed the request", code="client_closed") from None
        except RequestError as e:
            raise _rename_error(e, tr.rename, tr.endpoint) from None
        except (RedisConnectionError, RedisTimeoutError) as e:
            raise _redis_down(e) from None
        except asyncio.CancelledError:
            self._cancel_later(tr.request_id)
            raise

    async def _collect(
        self,
        tr: Translated,
        gen: Any,
        events: AsyncIterator[TokenEvent],
        first: TokenEvent | None,
        rec: _Recorder,
        request: Request,
    ) -> Response:
        parts = []
        if first is not None:
            rec.first_token()
            parts.append(first.text)

            async def rest() -> None:
                async for ev in events:
                    parts.append(ev.text)

            try:
                await _until_disconnect(request, rest())
            except _Disconnected:
                self._cancel_later(tr.request_id)
                rec.finish(CLIENT_CLOSED, "cancelled", "client_closed")
                return Response(status_code=CLIENT_CLOSED)
            except RequestError as e:
                err = _rename_error(e, tr.rename, tr.endpoint)
                rec.finish(err.status, "error", err.code or "")
                raise err from None
            except (RedisConnectionError, RedisTimeoutError) as e:
                err = _redis_down(e)
                rec.finish(err.status, "error", err.code or "")
                raise err from None
            except asyncio.CancelledError:
                self._cancel_later(tr.request_id)
                raise
        done = gen.done
        rec.finish(200, openai_finish_reason(done.finish_reason), "", done)
        return JSONResponse(_Answer(tr).full("".join(parts), done))

    async def _sse(
        self, tr: Translated, gen: Any, events: AsyncIterator[TokenEvent], first: TokenEvent | None, rec: _Recorder
    ) -> AsyncIterator[str]:
        ans = _Answer(tr)
        try:
            if ans.chat:
                yield ans.chunk("", first=True)
            if first is not None:  # one chunk per token event, also when its tokens added no text yet
                rec.first_token()
                yield ans.chunk(first.text)
                async for ev in events:
                    yield ans.chunk(ev.text)
            done = gen.done
            yield ans.chunk(None, openai_finish_reason(done.finish_reason))
            if tr.include_usage:
                yield ans.usage_chunk(done)
            rec.finish(200, openai_finish_reason(done.finish_reason), "", done)
        except (RequestError, RedisConnectionError, RedisTimeoutError) as e:
            err = _rename_error(e, tr.rename, tr.endpoint) if isinstance(e, RequestError) else _redis_down(e)
            rec.finish(200, "error", err.code or "")
            yield err.sse()
        except Exception as e:  # noqa: BLE001 - whatever failed, the client gets an error event and [DONE]
            log.exception("http: stream of request %s failed", tr.request_id)
            rec.finish(200, "error", "internal_error")
            yield APIError(500, f"internal error: {type(e).__name__}", code="internal_error").sse()
        yield DONE_LINE

    def _closed(self, tr: Translated, rec: _Recorder) -> None:
        """After a stream's response ended: a stream that did not finish lost its client; cancel it."""
        if not rec.done:
            self._cancel_later(tr.request_id)
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


class _EventStream(StreamingResponse):
    """A server-sent-event response that calls ``on_close`` once it has ended, however it ended (also when
    the client left before the first chunk, when the body generator never ran)."""

    def __init__(self, body: AsyncIterator[str], on_close: Any) -> None:
        super().__init__(
            body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class _Disconnected(Exception):
    pass


async def _next(events: AsyncIterator[TokenEvent]) -> TokenEvent | None:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


async def _until_disconnect(request: Request, coro: Any) -> Any:
    """Run ``coro`` unless the client disconnects first (then raise _Disconnected; ``coro`` is cancelled)."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (work, watch):
            if not t.done():
                t.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
    if work in done:
        return work.result()
    raise _Disconnected()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


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
