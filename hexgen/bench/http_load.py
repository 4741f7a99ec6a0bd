"""The HTTP leg of ``hexgen bench serve``: the same requests as the Redis leg, sent to the head's
OpenAI-compatible ``POST /v1/completions`` with ``stream: true`` (httpx, one connection per request).

Each SSE chunk is stamped as it is read. The front sends one chunk per token event (also when its tokens
added no text), and a token event may hold several tokens, so the stamps are made one per token from the
chunks: the first token at the first chunk, the last at the last chunk before the one carrying the
finish_reason, and the count from the final usage chunk (``stream_options.include_usage``). TTFT, TPOT (first
to last over the count) and throughput (tokens over the span) are then exact, as on the Redis leg.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from hexgen.bench.stats import RequestTiming


async def offer_http(
    base_url: str,
    items: list[Any],
    model: str | None = None,
    timeout_s: float = 900.0,
    sent: dict[str, float] | None = None,
) -> list[RequestTiming]:
    """Send each item (``offset``, ``text``, ``request``) at its arrival; one RequestTiming per item.
    ``model`` None: the served one."""
    import httpx

    from hexgen.bench.serve import sleep_until

    limits = httpx.Limits(max_connections=max(1, len(items)), max_keepalive_connections=max(1, len(items)))
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits, trust_env=False) as client:
        t0 = time.monotonic() + 0.05

        async def one(item: Any) -> RequestTiming:
            arrival = t0 + item.offset
            p = item.request.params
            body = {
                "prompt": item.text,
                "temperature": 0,
                "max_tokens": p.max_new_tokens,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if model is not None:
                body["model"] = model
            await sleep_until(arrival)
            timing = RequestTiming(arrival)
            if sent is not None:
                sent[item.request.request_id] = time.monotonic()
            async with client.stream("POST", "/v1/completions", json=body) as resp:
                stamps, count = await _read_stream(resp)
            if count is None or count != p.max_new_tokens or not stamps:
                raise RuntimeError(
                    f"bench serve: request {item.request.request_id} got {count} tokens through "
                    f"HTTP, expected {p.max_new_tokens}"
                )
            timing.tokens = (
                (stamps + [stamps[-1]] * count)[:count] if len(stamps) < count else stamps[: count - 1] + [stamps[-1]]
            )
            return timing

        return list(await asyncio.gather(*(one(i) for i in items)))


async def _read_stream(resp: Any) -> tuple[list[float], int | None]:
    """The arrival time of every token chunk of one streamed answer, and the usage's completion tokens."""
    if resp.status_code != 200:
        raise RuntimeError(f"bench serve: HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
    stamps: list[float] = []
    count = None
    async for line in resp.aiter_lines():
        if not line.startswith("data: {"):
            continue
        now = time.monotonic()
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(f"bench serve: HTTP stream error: {chunk['error']}")
        if chunk.get("usage"):
            count = chunk["usage"]["completion_tokens"]
        elif chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
            stamps.append(now)
    return stamps, count
