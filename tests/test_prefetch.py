"""The stage-0 work prefetcher (workers/intake.py): delivery, its bound, claims, drain and close on
fakeredis; wake-up, close and a dying worker's prefetched entries on a real redis-server."""
from __future__ import annotations

import asyncio
import threading
import time

import fakeredis
import pytest
import redis

from hexgen.client import HexGenClient, InvalidRequest
from hexgen.engine.types import Request, SamplingParams
from hexgen.wire import keys as C
from hexgen.wire import trace
from hexgen.wire.protocol import (
    ErrorEvent,
    decode_work_item,
    encode_work_item,
    parse_event,
    token_event,
)
from hexgen.wire.text import as_text
from tests.waiting import wait_until
from workers.intake import Prefetcher, RedisSource
from workers.io_config import IOConfig

pytestmark = pytest.mark.timeout(60)
WORK = C.work_stream("tiny")


def add_work(r, rid: str, max_new_tokens: int = 8) -> str:
    req = Request(rid, [1, 2, 3], SamplingParams(max_new_tokens=max_new_tokens), meta={"head": "h"})
    return as_text(r.xadd(WORK, encode_work_item(req, "tiny")))


def pending(r) -> dict[str, str]:
    rows = r.xpending_range(WORK, C.PIPELINES_GROUP, "-", "+", 100)
    return {as_text(row["message_id"]): as_text(row["consumer"]) for row in rows}


def take_until(p, n: int, want: int = 8, timeout_s: float = 5.0) -> list[Request]:
    out: list[Request] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        out += p.take(want - len(out), 0.05)
    return out


class Admitted:
    """A minimal admit callback: decodes entries, records (request id, entry, resumed, deliveries)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bool, int]] = []
        self.owned: set[str] = set()

    def __call__(self, entries, resumed: bool) -> list[Request]:
        out = []
        for eid, fields, deliveries in entries:
            req, _ = decode_work_item(fields)
            req.meta = {**req.meta, "entry": eid}
            self.calls.append((req.request_id, eid, resumed, deliveries))
            self.owned.add(eid)
            out.append(req)
        return out


# ---- fakeredis ---------------------------------------------------------------------------------------------

def config(pipeline_id: str = "p0", **kw) -> IOConfig:
    kw.setdefault("lease_s", 30.0)
    kw.setdefault("block_ms", 2000)
    kw.setdefault("control_block_ms", 200)
    return IOConfig("redis://fake", "tiny", pipeline_id, **kw)


@pytest.fixture
def make_prefetcher(server):
    made = []

    def make(pipeline_id: str = "p0", admit: Admitted | None = None, **kw) -> tuple[Prefetcher, Admitted]:
        admit = admit or Admitted()
        p = Prefetcher(fakeredis.FakeRedis(server=server), config(pipeline_id, **kw), admit,
                       lambda: set(admit.owned)).start()
        made.append(p)
        return p, admit

    yield make
    for p in made:
        p.close()


@pytest.fixture
def make_source(server):
    made = []

    def make(pipeline_id: str = "p0", factory=None, **kw) -> RedisSource:
        src = RedisSource(config(pipeline_id, **kw),
                          client_factory=factory or (lambda _t: fakeredis.FakeRedis(server=server))).start()
        made.append(src)
        return src

    yield make
    for s in made:
        s.close()


def test_delivers_entries_in_order(make_prefetcher, r):
    p, admit = make_prefetcher()
    assert p.take(4, 0.3) == []  # the group does not exist yet: the thread creates it, nothing comes
    entries = [add_work(r, f"a{i}") for i in range(3)]
    got = take_until(p, 3, want=4)
    assert [q.request_id for q in got] == ["a0", "a1", "a2"]
    assert [q.meta["entry"] for q in got] == entries
    assert all(resumed is False and n == 1 for _, _, resumed, n in admit.calls)


@pytest.mark.perf
def test_an_idle_take_wakes_on_new_work(make_prefetcher, r):
    p, _ = make_prefetcher()
    assert p.take(4, 0.3) == []
    t_add = []
    threading.Timer(0.3, lambda: t_add.append(add_work(r, "late"))).start()
    t0 = time.monotonic()
    (late,) = p.take(4, 3.0)  # an idle engine waits on the queue, not on a poll interval
    assert late.request_id == "late" and 0.25 < time.monotonic() - t0 < 1.5


def test_holds_no_more_than_the_engine_can_take(make_prefetcher, r):
    p, _ = make_prefetcher()
    for i in range(6):
        add_work(r, f"b{i}")
    assert p.take(0, 0.0) == [] and p.take(2, 0.0) == []  # the engine has room for two
    wait_until(lambda: p.held == 2)
    time.sleep(0.3)  # the test is that nothing more happens meanwhile
    assert p.held == 2 and len(pending(r)) == 2  # the other four stay in the stream for other pipelines
    got = p.take(1, 0.0)  # room for one only now: take one; what it took leaves room for none
    assert [q.request_id for q in got] == ["b0"]
    time.sleep(0.3)  # nothing more is read meanwhile
    assert p.held == 1 and len(pending(r)) == 2
    got = p.take(5, 0.0)  # a request finished: room for five
    assert [q.request_id for q in got] == ["b1"]
    wait_until(lambda: p.held == 4)
    time.sleep(0.3)  # nothing more is read meanwhile
    assert p.held == 4 and len(pending(r)) == 6


def test_a_full_pipeline_leaves_work_to_the_others(make_prefetcher, r):
    full, _ = make_prefetcher("full")
    free, _ = make_prefetcher("free")
    assert full.take(1, 0.0) == []
    wait_until(lambda: full.held == 0)
    for i in range(4):
        add_work(r, f"c{i}")
    got_full = take_until(full, 1, want=1)
    got_free = take_until(free, 3, want=8)
    assert len(got_full) == 1 and len(got_free) == 3
    assert {q.request_id for q in got_full + got_free} == {"c0", "c1", "c2", "c3"}
    assert full.take(0, 0.0) == []  # full now
    add_work(r, "c4")
    assert [q.request_id for q in take_until(free, 1)] == ["c4"]


def test_claims_a_dead_pipelines_entries_but_never_its_own(make_prefetcher, r):
    r.xgroup_create(WORK, C.PIPELINES_GROUP, id="0", mkstream=True)
    dead = add_work(r, "orphan")
    r.xreadgroup(C.PIPELINES_GROUP, "pipeline-dead", {WORK: ">"}, count=1)
    p, admit = make_prefetcher("alive", lease_s=0.4)
    mine = add_work(r, "mine")
    assert [q.request_id for q in take_until(p, 1, want=1)] == ["mine"]
    got = take_until(p, 1, want=4, timeout_s=5.0)  # after a lease: the dead pipeline's entry, as a resume
    assert [q.request_id for q in got] == ["orphan"]
    assert ("orphan", dead, True, 2) in admit.calls
    time.sleep(1.0)  # "mine" is idle for more than two leases (no keeper here) but owned: never claimed back
    assert [c for c in admit.calls if c[1] == mine] == [("mine", mine, False, 1)]


def test_pause_stops_reading_and_queued_requests_are_still_taken(make_prefetcher, r):
    p, _ = make_prefetcher()
    for i in range(2):
        add_work(r, f"d{i}")
    p.take(2, 0.0)
    wait_until(lambda: p.held == 2)
    p.pause()
    add_work(r, "after")
    assert not p.exhausted()
    assert [q.request_id for q in p.take(8, 0.0)] == ["d0", "d1"]
    wait_until(p.exhausted)
    time.sleep(0.3)  # the test is that nothing is read meanwhile
    assert p.take(8, 0.2) == []
    assert len(pending(r)) == 2  # "after" was not read


@pytest.mark.perf
def test_close_returns_promptly_while_the_read_blocks(make_prefetcher, r):
    p, _ = make_prefetcher(block_ms=30_000, control_block_ms=300)
    assert p.take(4, 0.5) == []  # the thread now sits in XREADGROUP
    t0 = time.monotonic()
    p.close()
    assert time.monotonic() - t0 < 2.0 and not p._thread.is_alive()


class CountingRedis(fakeredis.FakeRedis):
    """Records the thread of every command (to check that the engine thread makes none to take work)."""

    threads: list[str] = []

    def execute_command(self, *args, **kw):
        CountingRedis.threads.append(threading.current_thread().name)
        return super().execute_command(*args, **kw)


def test_the_engine_thread_makes_no_redis_call_to_take_work(make_source, r, server):
    CountingRedis.threads = []
    src = make_source(factory=lambda _t: CountingRedis(server=server))
    me = threading.current_thread().name
    for i in range(5):
        add_work(r, f"e{i}")
    got: list[Request] = []
    deadline = time.monotonic() + 5
    while len(got) < 5 and time.monotonic() < deadline:
        got += src.poll(8, 0.0)  # a busy engine: every step takes what is queued
        got += src.poll(8, 0.05)  # an idle one waits
    assert len(got) == 5
    assert me not in CountingRedis.threads and "work-prefetch" in CountingRedis.threads


def test_a_cancel_before_the_engine_took_the_request_waits_for_it(make_source, r):
    src = make_source()
    src.poll(1, 0.0)
    add_work(r, "x")
    wait_until(lambda: src._prefetch.held == 1)  # admitted and queued, not taken
    r.xadd(C.CANCEL_STREAM, {"id": "x"})
    wait_until(lambda: bool(src._cancel_new))
    assert src.poll_cancelled() == []  # the engine does not know it yet: cancelling now would be lost
    (req,) = src.poll(1, 0.0)
    assert req.request_id == "x"
    assert src.poll_cancelled() == ["x"]
    assert src.poll_cancelled() == []


def test_the_source_drains_what_was_read_before_the_drain(make_source, r):
    src = make_source()
    src.poll(2, 0.0)
    add_work(r, "q0")
    add_work(r, "q1")
    wait_until(lambda: src._prefetch.held == 2)
    src.drain()
    assert not src.exhausted()
    assert [q.request_id for q in src.poll(2, 0.0)] == ["q0", "q1"]
    wait_until(src.exhausted)


# ---- real redis-server -------------------------------------------------------------------------------------

@pytest.fixture
def real(redis_server):
    made: list = []

    def client(timeout: float = 10.0) -> redis.Redis:
        c = redis.Redis.from_url(redis_server, socket_timeout=timeout)
        made.append(c)
        return c

    def source(pipeline_id: str, **kw) -> RedisSource:
        cfg = IOConfig(redis_server, "tiny", pipeline_id, **{"lease_s": 1.0, "block_ms": 5000,
                                                             "control_block_ms": 1000, **kw})
        src = RedisSource(cfg).start()
        made.append(src)
        return src

    yield client, source
    for m in made:
        m.close()


@pytest.mark.perf
def test_real_redis_an_idle_read_wakes_on_new_work_and_close_is_prompt(real):
    client, source = real
    r = client()
    src = source("p0", lease_s=60.0, block_ms=20_000, control_block_ms=1000)  # claims due every 6 s
    assert src.poll(4, 0.2) == []
    wait_until(lambda: any(c.get("cmd") == "xreadgroup" for c in r.client_list()),
               what="the prefetch thread blocks in XREADGROUP")
    t0 = time.monotonic()
    add_work(r, "wake")
    got = []
    while not got and time.monotonic() - t0 < 5:
        got = src.poll(4, 0.5)
    assert [q.request_id for q in got] == ["wake"] and time.monotonic() - t0 < 1.0
    assert src.poll(4, 0.2) == []
    t0 = time.monotonic()
    src.close()
    assert time.monotonic() - t0 < 2.5 and not src._prefetch._thread.is_alive()


def test_real_redis_a_dead_workers_prefetched_entries_are_served_by_another(real):
    client, source = real
    r = client()
    a = source("a")
    a.poll(3, 0.0)  # the engine has room for three; it dies before taking them
    for i in range(3):
        add_work(r, f"g{i}", max_new_tokens=4)
    r.xadd(C.result_stream("g1"), token_event(0, [42], "x"), id="1-0")  # a's engine had posted one token of g1
    wait_until(lambda: a._prefetch.held == 3)
    assert set(pending(r).values()) == {"pipeline-a"}
    a._stop.set()  # dies: lease keeper and reader stop
    a._prefetch.close()
    b = source("b")
    got: dict[str, Request] = {}
    deadline = time.monotonic() + 15
    while len(got) < 3 and time.monotonic() < deadline:
        got.update((q.request_id, q) for q in b.poll(8, 0.1))
    assert sorted(got) == ["g0", "g1", "g2"]
    assert got["g1"].output_ids == [42] and got["g0"].output_ids == []
    assert set(pending(r).values()) == {"pipeline-b"}


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_requests_flow_head_to_worker_to_client_through_the_prefetcher(tmp_path, monkeypatch):
    """A real deployment (redis-server, head, a one-stage worker) with latency stamps on: every request's
    first token went through the prefetch thread (src_read) and the engine loop's take (src_take); bad input
    still gets its error, from the head (a bad field) and from the worker's admission (a corrupt work item)."""
    from tests.serving_harness import PipelineSpec, start_deployment
    from tests.test_serving_integration import offline_reference

    monkeypatch.setenv(trace.ENV, "1")  # the head and the worker inherit it
    pipeline = PipelineSpec("p0", (1,), (4,))
    prompts = ["hello world", "What is the capital of France?", "Once upon a time", "the tiny model"]
    dep = start_deployment(str(tmp_path), [pipeline])
    r = dep.client()
    try:
        async with HexGenClient(dep.url, block_ms=200, timeout_s=90) as client:
            results = await asyncio.gather(*[client.generate(p, request_id=f"e2e{i}", max_new_tokens=6,
                                                             ignore_eos=True) for i, p in enumerate(prompts)])
            with pytest.raises(InvalidRequest, match="temperature"):
                await client.generate("hi", temperature=-1)
        ref = offline_reference(dep.model_dir, pipeline, [(p, False) for p in prompts], 6)
        assert [res.token_ids for res in results] == [want.token_ids for want in ref]

        stamps = {}
        for _eid, fields in r.xrange(C.TRACE_STREAM):
            f = {k.decode(): v.decode() for k, v in fields.items()}
            stamps[f["id"]] = {k: float(f[k]) for k in ("head_send", "src_read", "src_take", "emit", "picked")
                               if k in f}
        for res in results:
            t = stamps[res.id]
            assert len(t) == 5, (res.id, t)
            assert t["head_send"] <= t["src_read"] <= t["src_take"] <= t["emit"] <= t["picked"], (res.id, t)

        r.xadd(C.work_stream("tiny"), {"id": "corrupt-1", "model": "tiny", "data": b"\xc1not msgpack"})
        reply = r.xread({C.result_stream("corrupt-1"): "0-0"}, block=20_000)
        ev = parse_event(reply[0][1][0][1])
        assert isinstance(ev, ErrorEvent) and ev.code == "internal" and "corrupt" in ev.message
        wait_until(lambda: r.xpending(C.work_stream("tiny"), C.PIPELINES_GROUP)["pending"] == 0)
    finally:
        r.close()
        dep.stop()
