"""Streaming plumbing for the OpenAI routes: the event-stream response and waiting on work unless the
client disconnects first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from hexgen.wire.protocol import TokenEvent


class EventStream(StreamingResponse):
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


class Disconnected(Exception):
    pass


async def next_event(events: AsyncIterator[TokenEvent]) -> TokenEvent | None:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


async def until_disconnect(request: Request, coro: Any) -> Any:
    """Run ``coro`` unless the client disconnects first (then raise Disconnected; ``coro`` is cancelled)."""
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
    raise Disconnected()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
