"""Async Python client for HexGen over redis.asyncio (works under asyncio and uvloop).

::

    async with HexGenClient(url="redis://localhost:6379/0") as client:
        result = await client.generate(prompt="Hello", max_new_tokens=32)
        print(result.text)

        stream = client.stream(messages=[{"role": "user", "content": "Hi"}])
        async for delta in stream:          # TokenEvent(seq, ids, text)
            print(delta.text, end="")
        print(stream.done.finish_reason)

        await client.cancel(stream.id)      # same as: redis-cli XADD hexgen:cancel '*' id <id>

A request is an XADD to ``hexgen:requests`` with a fresh uuid4-hex ``id``; its events are read from
``hexgen:result:<id>`` with XREAD BLOCK. Refusals and failures raise :class:`HexGenRequestError`
subclasses carrying the server's ``code`` and ``message``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from hexgen.errors import HexGenError
from hexgen.wire import keys as C
from hexgen.wire.connection import REDIS_ERRORS
from hexgen.wire.protocol import (
    DoneEvent,
    ErrorEvent,
    InternalError,
    InvalidRequest,
    NotFound,
    Overloaded,
    TokenEvent,
    cancel_fields,
    parse_event,
    request_fields,
)
from hexgen.wire.protocol import RequestError as HexGenRequestError
from hexgen.wire.redis_url import async_wait_replicas, parse_redis_url
from hexgen.wire.settings import RedisSettings, async_redis

__all__ = [
    "HexGenClient",
    "Result",
    "GenerationStream",
    "TokenEvent",
    "DoneEvent",
    "HexGenRequestError",
    "InvalidRequest",
    "Overloaded",
    "NotFound",
    "InternalError",
    "GenerationTimeout",
    "RequestLost",
    "RedisUnavailable",
]


MAX_CONNECTIONS = 10_000  # default pool cap of a client: Redis's own default maxclients


class GenerationTimeout(HexGenError, TimeoutError):
    """No ``done`` or ``error`` event arrived within the client's timeout."""


class RequestLost(InternalError):
    """Redis lost its data while the request was in flight (its epoch changed: a new, empty server); the
    request will not be answered. Send it again (a new id) if it should run."""


class RedisUnavailable(HexGenError, ConnectionError):
    """Redis stayed unreachable for longer than the client's ``reconnect_s``."""


@dataclass(frozen=True)
class Result:
    """A finished generation."""

    id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose K/V the pipeline's prefix cache supplied


class GenerationStream:
    """One request's token deltas: iterate it with ``async for``; ``done`` is set once it has finished.

    The request is sent when iteration starts. Token events with a ``seq`` already seen are skipped, so a
    resumed request never shows a token twice.
    """

    def __init__(self, client: HexGenClient, fields: dict[str, str], request_id: str, timeout_s: float | None) -> None:
        self._client = client
        self._fields = fields
        self.id = request_id
        self.timeout_s = timeout_s
        self.done: DoneEvent | None = None
        self._started = False
        self._touched = 0.0  # when the reader key was last renewed

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._started:
            raise RuntimeError(f"stream {self.id}: can be iterated only once")
        self._started = True
        return self._events()

    async def _events(self) -> AsyncIterator[TokenEvent]:
        c = self._client
        stream = C.result_stream(self.id)
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        epoch = await c._submit(self._fields, self.id)
        last_id, next_seq = "0-0", 0
        self._touched = time.monotonic()
        while True:
            block = c.block_ms if c.reader_ttl_s is None else min(c.block_ms, max(1, int(c.reader_ttl_s * 1000 / 3)))
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GenerationTimeout(f"request {self.id}: no result within {self.timeout_s}s")
                block = max(1, min(block, int(left * 1000)))
            reply = await self._read(stream, last_id, block, epoch)
            for _name, entries in reply or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    ev = parse_event(fields)
                    if isinstance(ev, TokenEvent):
                        if ev.seq < next_seq:
                            continue  # already seen (a resumed request re-posting)
                        next_seq = ev.seq + len(ev.ids)
                        yield ev
                    elif isinstance(ev, DoneEvent):
                        self.done = ev
                        await self._release()
                        return
                    elif isinstance(ev, ErrorEvent):
                        await self._release()
                        raise ev.to_exception()

    async def _release(self) -> None:
        """Delete the reader key once the stream has ended (best effort: it expires anyway)."""
        if self._client.reader_ttl_s is not None:
            try:
                await self._client.redis.delete(C.reader_key(self.id))
            except REDIS_ERRORS:
                pass

    async def _read(self, stream: str, last_id: Any, block: int, epoch: bytes | None) -> Any:
        """One XREAD. Nothing for a ``block_ms``: check Redis still knows the request (its epoch). A lost
        connection: reconnect, check the epoch, send the request again (a duplicate is a no-op; a request
        lost in a crash or failover is served), then report nothing read."""
        c = self._client
        try:
            ttl = c.reader_ttl_s
            if ttl is not None and time.monotonic() - self._touched >= ttl / 3:
                await c.redis.set(C.reader_key(self.id), "1", px=max(1, int(ttl * 1000)))
                self._touched = time.monotonic()
            reply = await c.redis.xread({stream: last_id}, block=block, count=256)
            if not reply:
                await c._check_epoch(epoch, self.id)
            return reply
        except REDIS_ERRORS as e:
            await c._reconnect(e, self.id)
            await c._check_epoch(epoch, self.id)
            await c._submit(self._fields, self.id)
            return None

    async def cancel(self) -> None:
        """Ask the pipeline to stop this request (it then ends with finish_reason ``cancelled``)."""
        await self._client.cancel(self.id)


class HexGenClient:
    """Connection to a HexGen deployment's Redis. Use ``async with`` or call :meth:`aclose`.

    ``block_ms`` is the XREAD BLOCK per read (the socket timeout is set longer); ``timeout_s`` bounds a
    whole generation (None: wait as long as it takes). ``model`` is sent with every request when set.
    ``max_connections`` caps the connection pool: each stream being read holds one connection while its
    XREAD blocks, so it bounds the generations one client can follow at once (redis-py's own default, 100,
    would fail the 101st with MaxConnectionsError).

    Redis going away (docs/reliability.md): every call is retried with backoff for up to ``reconnect_s``
    (then :class:`RedisUnavailable`); after a reconnect the request is sent again with the same id (the head
    drops it as a duplicate unless Redis lost the first one, which is then served). The client reads the
    deployment's epoch (``hexgen:epoch``) with each request and again whenever it waited ``block_ms``
    without events or reconnected: a different epoch means Redis lost its data, and the request ends with
    :class:`RequestLost`. With ``reader_ttl_s``, a stream being read keeps the key ``hexgen:reader:<id>``
    alive (TTL ``reader_ttl_s``, renewed every third of it); a pipeline cancels a request whose reader key
    has expired, so a client that died mid-stream does not leave its generation running. A URL with
    ``wait_replicas=N`` makes each request's XADD wait until N replicas
    hold it (``WAIT``), so a failover cannot lose it.
    """

    def __init__(
        self,
        url: str = C.DEFAULT_REDIS_URL,
        *,
        model: str | None = None,
        block_ms: int = C.BLOCK_MS,
        timeout_s: float | None = None,
        reconnect_s: float = 60.0,
        redis: Any | None = None,
        max_connections: int = MAX_CONNECTIONS,
        reader_ttl_s: float | None = None,
    ) -> None:
        if block_ms < 1:
            raise ValueError(f"block_ms: {block_ms} must be ≥ 1")
        if not reconnect_s >= 0:
            raise ValueError(f"reconnect_s: {reconnect_s} must be ≥ 0")
        if max_connections < 1:
            raise ValueError(f"max_connections: {max_connections} must be ≥ 1")
        if reader_ttl_s is not None and not 0 < reader_ttl_s < float("inf"):
            raise ValueError(f"reader_ttl_s: {reader_ttl_s} must be a finite number > 0 (or None: no reader key)")
        self.reader_ttl_s = reader_ttl_s
        self.url = RedisSettings(url).url
        self._target = parse_redis_url(self.url)
        self.model = model
        self.block_ms = block_ms
        self.timeout_s = timeout_s
        self.reconnect_s = reconnect_s
        self._own = redis is None
        # no retries inside redis-py: this client must see each lost connection to resend its requests
        # any redis.asyncio-compatible client (fakeredis in tests): redis-py's own annotations mix sync and async
        self.redis: Any = (
            redis
            if redis is not None
            else async_redis(
                self.url,
                socket_timeout=C.socket_timeout_for(block_ms),
                retry=Retry(NoBackoff(), 0),
                max_connections=max_connections,
            )
        )

    async def _submit(self, fields: dict[str, str], request_id: str) -> bytes | None:
        """XADD the request (retried through outages; with ``wait_replicas``, then WAIT); returns the epoch."""
        while True:
            try:
                async with self.redis.pipeline(transaction=False) as p:
                    p.get(C.EPOCH_KEY)
                    if self.reader_ttl_s is not None:
                        p.set(C.reader_key(request_id), "1", px=max(1, int(self.reader_ttl_s * 1000)))
                    p.xadd(C.REQUESTS_STREAM, fields)
                    epoch = (await p.execute())[0]
                await async_wait_replicas(self.redis, self._target)
                return epoch
            except REDIS_ERRORS as e:
                await self._reconnect(e, request_id)

    async def _reconnect(self, err: Exception, request_id: str) -> None:
        """Wait, with backoff, until Redis answers again; RedisUnavailable after ``reconnect_s``."""
        deadline = time.monotonic() + self.reconnect_s
        delay = 0.05
        while True:
            if time.monotonic() + delay > deadline:
                raise RedisUnavailable(
                    f"request {request_id}: Redis unreachable for {self.reconnect_s}s ({err})"
                ) from err
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)
            try:
                await self.redis.ping()
                return
            except REDIS_ERRORS as e:
                err = e

    async def _check_epoch(self, epoch: bytes | None, request_id: str) -> None:
        """RequestLost when Redis's epoch is no longer the one seen at submission (None: nothing to compare)."""
        if epoch is None:
            return
        while True:
            try:
                now = await self.redis.get(C.EPOCH_KEY)
                break
            except REDIS_ERRORS as e:
                await self._reconnect(e, request_id)
        if now != epoch:
            raise RequestLost(
                f"request {request_id}: Redis lost its data while the request was in flight (a "
                "new, empty server); it will not be answered"
            )

    async def __aenter__(self) -> HexGenClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (only when this client created it)."""
        if self._own:
            await self.redis.aclose()

    def stream(
        self,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
        **params: Any,
    ) -> GenerationStream:
        """A request whose token deltas are read by iterating the returned stream.

        ``params``: max_new_tokens, temperature, top_k, top_p, seed, stop, model, ignore_eos (the server
        validates them; see hexgen.head.validation).
        """
        request_id = request_id or uuid.uuid4().hex
        params.setdefault("model", self.model)
        try:
            fields = request_fields(prompt, messages, request_id=request_id, **params)
        except TypeError as e:
            raise InvalidRequest(f"client: {e}") from e
        return GenerationStream(self, fields, request_id, timeout_s if timeout_s is not None else self.timeout_s)

    async def generate(
        self, prompt: str | None = None, messages: list[dict[str, str]] | None = None, **params: Any
    ) -> Result:
        """Run one request to completion; raises HexGenRequestError subclasses on refusal or failure."""
        s = self.stream(prompt, messages, **params)
        ids: list[int] = []
        parts: list[str] = []
        async for ev in s:
            ids.extend(ev.ids)
            parts.append(ev.text)
        done = s.done
        if done is None:  # the iterator only ends normally after done
            raise InternalError(f"request {s.id}: stream ended without a done event")
        return Result(
            id=s.id,
            text="".join(parts),
            token_ids=ids,
            finish_reason=done.finish_reason,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            cached_tokens=done.cached_tokens,
        )

    async def cancel(self, request_id: str) -> None:
        """Cancel a request by id (any client may cancel any id)."""
        await self.redis.xadd(
            C.CANCEL_STREAM, cancel_fields(request_id), maxlen=C.CANCEL_STREAM_MAXLEN, approximate=True
        )


async def generate(prompt: str | None = None, *, url: str = C.DEFAULT_REDIS_URL, **params: Any) -> Result:
    """One-shot helper: connect, generate, close."""
    async with HexGenClient(url) as client:
        return await client.generate(prompt, **params)
