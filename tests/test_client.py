"""The async client: events to results, typed errors, cancel; end to end with a head on real Redis."""
from __future__ import annotations

import asyncio
import time

import pytest
from redis.exceptions import ResponseError

from hexgen.client import (GenerationTimeout, HexGenClient, HexGenRequestError, InternalError, InvalidRequest,
                           NotFound, Overloaded, Result, TokenEvent)
from hexgen.wire import keys as C
from hexgen.head.service import run_head
from hexgen.wire.protocol import decode_work_item, done_event, error_event, parse_cancel, token_event
from hexgen.wire.settings import LimitSettings, ModelSettings, RedisSettings, Settings, async_redis


@pytest.fixture
async def client(fake):
    async with HexGenClient(redis=fake, block_ms=50) as c:
        yield c


async def post(r, request_id: str, *events, delay: float = 0.0):
    for ev in events:
        if delay:
            await asyncio.sleep(delay)
        await r.xadd(C.result_stream(request_id), ev)


async def test_generate_collects_tokens_and_sends_fields(client, fake):
    await post(fake, "g1", token_event(0, [1, 2], "Hel"), token_event(2, [3], "lo"), done_event("eos", 4, 3))
    res = await client.generate("Hi", request_id="g1", max_new_tokens=8, temperature=0.0, stop=["\n"])
    assert res == Result(id="g1", text="Hello", token_ids=[1, 2, 3], finish_reason="eos", prompt_tokens=4,
                         completion_tokens=3)
    [(_, fields)] = await fake.xrange(C.REQUESTS_STREAM)
    assert fields == {b"prompt": b"Hi", b"id": b"g1", b"max_new_tokens": b"8", b"temperature": b"0.0",
                      b"stop": b'["\\n"]'}


async def test_stream_yields_deltas_as_they_arrive(client, fake):
    s = client.stream(messages=[{"role": "user", "content": "hi"}], request_id="s1", model="tiny")
    writer = asyncio.create_task(post(fake, "s1", token_event(0, [7], "a"), token_event(1, [8], "b"),
                                      done_event("length", 2, 2), delay=0.03))
    got = [ev async for ev in s]
    await writer
    assert got == [TokenEvent(0, (7,), "a"), TokenEvent(1, (8,), "b")]
    assert s.done.finish_reason == "length" and s.id == "s1"
    [(_, fields)] = await fake.xrange(C.REQUESTS_STREAM)
    assert fields[b"model"] == b"tiny" and fields[b"messages"] == b'[{"role": "user", "content": "hi"}]'
    with pytest.raises(RuntimeError, match="only once"):
        s.__aiter__()


async def test_duplicate_token_events_are_skipped(client, fake):
    await post(fake, "d1", token_event(0, [1], "a"), token_event(1, [2], "b"), token_event(1, [2], "b"),
               token_event(2, [3], "c"), done_event("eos", 1, 3))
    res = await client.generate("x", request_id="d1")
    assert res.token_ids == [1, 2, 3] and res.text == "abc"


@pytest.mark.parametrize("code,cls", [("invalid_request", InvalidRequest), ("overloaded", Overloaded),
                                      ("not_found", NotFound), ("internal", InternalError)])
async def test_error_events_raise_typed_errors(client, fake, code, cls):
    await post(fake, "e1", error_event(code, "temperature: bad"))
    with pytest.raises(cls) as info:
        await client.generate("x", request_id="e1")
    assert isinstance(info.value, HexGenRequestError)
    assert info.value.code == code and info.value.message == "temperature: bad"


async def test_error_after_tokens_raises(client, fake):
    await post(fake, "e2", token_event(0, [1], "a"), error_event("internal", "pipeline died"))
    s = client.stream("x", request_id="e2")
    seen = []
    with pytest.raises(InternalError, match="pipeline died"):
        async for ev in s:
            seen.append(ev)
    assert seen == [TokenEvent(0, (1,), "a")]


@pytest.mark.perf
async def test_timeout(fake):
    async with HexGenClient(redis=fake, block_ms=1000, timeout_s=0.2) as c:
        t0 = time.monotonic()
        with pytest.raises(GenerationTimeout, match="no result within 0.2s"):
            await c.generate("x")
        assert time.monotonic() - t0 < 1.0


async def test_cancel_writes_cancel_stream(client, fake):
    await client.cancel("abc")
    s = client.stream("x", request_id="zz")
    await s.cancel()
    assert [parse_cancel(f) for _, f in await fake.xrange(C.CANCEL_STREAM)] == ["abc", "zz"]


async def test_unknown_parameter_is_refused_locally(client, fake):
    with pytest.raises(InvalidRequest, match="max_tokens"):
        client.stream("x", max_tokens=5)
    assert await fake.xlen(C.REQUESTS_STREAM) == 0


def test_bad_url_is_config_error():
    from hexgen.errors import ConfigError

    with pytest.raises(ConfigError, match="redis.url"):
        HexGenClient("http://localhost")


# ---- end to end on real Redis: client -> head -> fake pipeline -> client ---------------------------------

async def fake_pipeline(url: str, tokenizer, stop: asyncio.Event):
    """Stands in for a pipeline: echoes each prompt's last tokens back, one event per token; honours cancel."""
    r = async_redis(url, socket_timeout=5)
    work = C.work_stream("tiny")
    cancelled: set[str] = set()
    cancel_from = "0-0"  # a fresh Redis per test: every cancel counts
    try:
        try:  # a real pipeline creates its group too: it may start before any head
            await r.xgroup_create(work, C.PIPELINES_GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        while not stop.is_set():
            reply = await r.xreadgroup(C.PIPELINES_GROUP, "pipeline-p0", {work: ">"}, count=8, block=50)
            for entry_id, fields in [e for _, entries in reply or [] for e in entries]:
                req, _ = decode_work_item(fields)
                stream = C.result_stream(req.request_id)
                ids = req.prompt_ids[-req.params.max_new_tokens:]
                reason = "length"
                for seq, tid in enumerate(ids):
                    got = await r.xread({C.CANCEL_STREAM: cancel_from}, count=100)
                    for _, entries in got or []:
                        for cid, cf in entries:
                            cancel_from = cid
                            cancelled.add(parse_cancel(cf))
                    if req.request_id in cancelled:
                        reason = "cancelled"
                        ids = ids[:seq]
                        break
                    await r.xadd(stream, token_event(seq, [tid], tokenizer.decode([tid])))
                    await asyncio.sleep(0.03)
                await r.xadd(stream, done_event(reason, len(req.prompt_ids), len(ids)))
                await r.expire(stream, 60)
                await r.xack(work, C.PIPELINES_GROUP, entry_id)
    finally:
        await r.aclose()


async def serve_and_run(url: str, tokenizer, body, max_queue_depth: int = 64):
    settings = Settings(model=ModelSettings(preset="tiny"), redis=RedisSettings(url),
                        limits=LimitSettings(block_ms=100, max_queue_depth=max_queue_depth))
    stop = asyncio.Event()
    head = asyncio.create_task(run_head(settings, tokenizer=tokenizer, install_signals=False))
    pipe = asyncio.create_task(fake_pipeline(url, tokenizer, stop))
    try:
        async with HexGenClient(url, block_ms=200, timeout_s=20) as client:
            return await body(client)
    finally:
        stop.set()
        head.cancel()
        await asyncio.gather(head, pipe, return_exceptions=True)


async def test_end_to_end_real_redis(redis_server, tiny_tokenizer):
    async def body(client):
        res = await client.generate("the capital of France is Paris", max_new_tokens=3)
        n = len(tiny_tokenizer("the capital of France is Paris")["input_ids"])
        assert res.finish_reason == "length" and res.completion_tokens == 3 and res.prompt_tokens == n
        assert res.token_ids == tiny_tokenizer("the capital of France is Paris")["input_ids"][-3:]
        assert res.text == tiny_tokenizer.decode(res.token_ids)
        many = await asyncio.gather(*(client.generate(f"hello world {i}", max_new_tokens=2) for i in range(8)))
        assert all(r.completion_tokens == 2 for r in many) and len({r.id for r in many}) == 8
        with pytest.raises(InvalidRequest, match=r"top_p: 2 is out of range; allowed: 0 < top_p ≤ 1"):
            await client.generate("x", top_p=2.0)
        with pytest.raises(NotFound, match="llama-9000"):
            await client.generate("x", model="llama-9000")
        s = client.stream("Once upon a time there was a tiny model that served tokens", max_new_tokens=12)
        async for ev in s:
            if ev.seq == 1:
                await s.cancel()
        assert s.done.finish_reason == "cancelled" and s.done.completion_tokens < 12
    await serve_and_run(redis_server, tiny_tokenizer, body)


def test_client_under_uvloop(redis_server, tiny_tokenizer):
    uvloop = pytest.importorskip("uvloop")

    async def body(client):
        return await client.generate("hello world", max_new_tokens=2)

    async def main():
        assert "uvloop" in type(asyncio.get_running_loop()).__module__
        return await serve_and_run(redis_server, tiny_tokenizer, body)

    res = uvloop.run(main())
    assert res.completion_tokens == 2 and res.finish_reason == "length"


async def test_more_concurrent_streams_than_redis_py_pools_by_default(redis_server):
    """Each stream being read holds a connection while its XREAD blocks: 150 at once (redis-py's async pool
    stops at 100 unless told otherwise) all finish."""
    n = 150
    async with HexGenClient(redis_server, block_ms=2000, timeout_s=30) as client:
        tasks = [asyncio.create_task(client.generate("hi", request_id=f"many{i}")) for i in range(n)]
        r = async_redis(redis_server)
        try:
            deadline = time.monotonic() + 20
            while await r.xlen(C.REQUESTS_STREAM) < n and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            for i in range(n):
                await post(r, f"many{i}", token_event(0, [5], "x"), done_event("length", 1, 1))
        finally:
            await r.aclose()
        results = await asyncio.gather(*tasks)
    assert [res.token_ids for res in results] == [[5]] * n
