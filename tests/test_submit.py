"""The head's submit script: reserve + depth + queue + ack in one call, on fakeredis and a real redis-server."""
from __future__ import annotations

import pytest

from hexgen.wire import keys as C
from hexgen.wire.settings import async_redis
from hexgen.head.status import queue_status
from hexgen.head.submit import DUPLICATE, OVER_LIMIT, QUEUED, Submitted, Submitter

WORK = "hexgen:work:tiny"


async def _setup(r) -> None:
    for stream, group in ((C.REQUESTS_STREAM, C.HEADS_GROUP), (WORK, C.PIPELINES_GROUP)):
        await r.xgroup_create(stream, group, id="0", mkstream=True)


async def _entry(r, request_id: str) -> str:
    await r.xadd(C.REQUESTS_STREAM, {"prompt": "hi", "id": request_id})
    reply = await r.xreadgroup(C.HEADS_GROUP, "head-test", {C.REQUESTS_STREAM: ">"}, count=1)
    return reply[0][1][0][0].decode()


async def _heads_pending(r) -> int:
    return (await r.xpending(C.REQUESTS_STREAM, C.HEADS_GROUP))["pending"]


async def _rules(r) -> None:
    await _setup(r)
    sub = Submitter(r, WORK, 60, max_queue_depth=2)
    first = await _entry(r, "a")
    assert await sub.submit("a", first, {"data": b"\x00\xffone"}) == Submitted(QUEUED, first, 0)
    assert [f for _, f in await r.xrange(WORK)] == [{b"data": b"\x00\xffone"}]  # binary-safe
    assert await _heads_pending(r) == 0 and await r.ttl(C.dedupe_key("a")) > 0
    dup = await _entry(r, "a")
    assert await sub.submit("a", dup, {"data": b"two"}) == Submitted(DUPLICATE, first, 0)
    assert await r.xlen(WORK) == 1 and await _heads_pending(r) == 0  # acked, nothing written
    again = await _entry(r, "b")
    await r.set(C.dedupe_key("b"), again)  # a head reserved it, then died before queueing: a redelivery
    assert (await sub.submit("b", again, {"data": b"b"})).status == QUEUED
    full = await _entry(r, "c")
    assert await sub.submit("c", full, {"data": b"c"}) == Submitted(OVER_LIMIT, full, 2)
    assert await r.xlen(WORK) == 2 and await _heads_pending(r) == 1  # the head writes the error and acks
    assert (await r.get(C.dedupe_key("c"))).decode() == full  # the id stays spent


async def test_submit_rules_on_fakeredis(fake):
    await _rules(fake)


async def test_submit_rules_on_real_redis(redis_server):
    r = async_redis(redis_server)
    try:
        await _rules(r)
    finally:
        await r.aclose()


async def _script_depth(r, n: int) -> int:
    """The depth the script sees (a limit of 0 refuses every request and writes nothing but the dedupe key)."""
    res = await Submitter(r, WORK, 60, max_queue_depth=0).submit(f"probe{n}", f"0-{n + 1}", {"data": b"x"})
    assert res.status == OVER_LIMIT
    return res.depth


@pytest.mark.parametrize("state", ["no stream", "queued", "pending", "acked", "deleted: lag unknown"])
async def test_script_depth_is_queue_status_depth_on_real_redis(redis_server, state):
    r = async_redis(redis_server)
    try:
        if state != "no stream":
            await r.xgroup_create(WORK, C.PIPELINES_GROUP, id="0", mkstream=True)
            ids = [await r.xadd(WORK, {"data": b"x"}) for _ in range(5)]
            if state != "queued":
                await r.xreadgroup(C.PIPELINES_GROUP, "pipeline-p0", {WORK: ">"}, count=3)
            if state in ("acked", "deleted: lag unknown"):
                await r.xack(WORK, C.PIPELINES_GROUP, ids[0])
            if state == "deleted: lag unknown":
                await r.xdel(WORK, ids[4])
                [g] = await r.xinfo_groups(WORK)
                assert g["lag"] is None
        expected = (await queue_status(r, WORK, C.PIPELINES_GROUP)).depth
        assert await _script_depth(r, 0) == expected
        assert expected == {"no stream": 0, "queued": 5, "pending": 5, "acked": 4, "deleted: lag unknown": 4}[state]
    finally:
        await r.aclose()
