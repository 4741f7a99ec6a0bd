"""RedisSource and RedisSink logic on fakeredis: capacity-bounded reads, leases and claims, resume from posted
tokens, dead letters, cancels, drain, exactly-once posting and ack after done."""
from __future__ import annotations

import time

import fakeredis
import pytest

from hexgen.engine.types import Request, SamplingParams, StepOutput
from hexgen.wire import keys as C
from hexgen.wire.protocol import (
    DoneEvent,
    ErrorEvent,
    TokenEvent,
    encode_work_item,
    parse_event,
    token_event,
)
from tests.waiting import wait_until
from workers.intake import RedisSource, read_posted
from workers.io_config import IOConfig
from workers.sink import RedisSink

pytestmark = pytest.mark.timeout(30)
WORK = C.work_stream("tiny")


@pytest.fixture
def lua():
    """fakeredis runs the posting script only with lupa installed (real Redis always can)."""
    pytest.importorskip("lupa", reason="fakeredis needs lupa for Lua scripts (pip install lupa)")


@pytest.fixture
def make_source(server):
    made = []

    def make(pipeline_id: str = "p0", **kw) -> RedisSource:
        kw.setdefault("lease_s", 0.3)
        kw.setdefault("block_ms", 100)
        kw.setdefault("control_block_ms", 50)
        cfg = IOConfig("redis://fake", "tiny", pipeline_id, **kw)
        src = RedisSource(cfg, client_factory=lambda _t: fakeredis.FakeRedis(server=server)).start()
        made.append(src)
        return src

    yield make
    for s in made:
        s.close()


@pytest.fixture
def make_sink(server):
    made = []

    def make(pipeline_id: str = "p0", **kw) -> RedisSink:
        cfg = IOConfig("redis://fake", "tiny", pipeline_id, **kw)
        sink = RedisSink(cfg, client_factory=lambda _t: fakeredis.FakeRedis(server=server)).start()
        made.append(sink)
        return sink

    yield make
    for s in made:
        s.close()


def add_work(r, rid: str, max_new_tokens: int = 8, prompt=(1, 2, 3)) -> str:
    req = Request(rid, list(prompt), SamplingParams(max_new_tokens=max_new_tokens), meta={"head": "h"})
    return r.xadd(WORK, encode_work_item(req, "tiny")).decode()


def events(r, rid: str) -> list[tuple[str, object]]:
    return [(eid.decode(), parse_event(f)) for eid, f in r.xrange(C.result_stream(rid))]


def pending(r) -> dict[str, str]:
    rows = r.xpending_range(WORK, C.PIPELINES_GROUP, "-", "+", 100)
    return {row["message_id"].decode(): row["consumer"].decode() for row in rows}


def poll_until(src, n: int, timeout_s: float = 3.0, max_requests: int = 8) -> list[Request]:
    out: list[Request] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        out += src.poll(max_requests - len(out), 0.05)
    return out


def die(src: RedisSource) -> None:
    """As if the pipeline's process died: its lease keeper and its work reader stop, its connections stay."""
    src._stop.set()
    src._prefetch.close()


def test_reads_only_as_many_as_there_is_room_for(make_source, r):
    src = make_source()
    src.poll(1, 0)  # creates the group
    entries = [add_work(r, f"req-{i}") for i in range(5)]
    got = src.poll(2, 0.05)
    assert [q.request_id for q in got] == ["req-0", "req-1"]
    assert got[0].meta == {"head": "h", "entry": entries[0]}
    assert got[0].prompt_ids == [1, 2, 3] and got[0].output_ids == []
    assert pending(r) == {entries[0]: "pipeline-p0", entries[1]: "pipeline-p0"}
    assert src.poll(0, 0.05) == []
    assert len(pending(r)) == 2
    assert [q.request_id for q in poll_until(src, 3)] == ["req-2", "req-3", "req-4"]


@pytest.mark.perf
def test_blocking_poll_wakes_up_on_new_work(make_source, r):
    src = make_source(block_ms=2000, lease_s=30)
    src.poll(1, 0)
    t0 = time.monotonic()
    assert src.poll(4, 0.2) == []
    assert 0.1 < time.monotonic() - t0 < 1.0
    add_work(r, "late")
    assert [q.request_id for q in poll_until(src, 1)] == ["late"]


def test_in_flight_leases_stay_fresh_and_a_dead_pipelines_entries_resume(make_source, r):
    a = make_source("a")
    a.poll(1, 0)
    entry = add_work(r, "job", max_new_tokens=8)
    assert [q.request_id for q in poll_until(a, 1)] == ["job"]
    for seq, tok in enumerate((11, 12, 13)):  # a posted three tokens
        r.xadd(C.result_stream("job"), token_event(seq, [tok], f"t{tok}"), id=f"{seq + 1}-0")
    b = make_source("b")
    time.sleep(1.0)  # the test is that time passes: > 3 leases, and only a's keeper keeps the entry
    assert b.poll(4, 0.05) == []
    assert pending(r) == {entry: "pipeline-a"}
    die(a)  # pipeline a dies: its keeper and its reader stop
    resumed = poll_until(b, 1)
    assert len(resumed) == 1
    req = resumed[0]
    assert req.request_id == "job" and req.output_ids == [11, 12, 13] and req.meta["entry"] == entry
    assert pending(r) == {entry: "pipeline-b"}


def test_a_restarted_pipeline_takes_back_its_own_entries_after_half_a_lease(make_source, r):
    old = make_source("p0", lease_s=30)
    old.poll(1, 0)
    entry = add_work(r, "mine")
    assert len(poll_until(old, 1)) == 1
    die(old)
    new = make_source("p0", lease_s=0.4)  # same pipeline id, a new generation
    assert new.poll(4, 0.0) == []  # idle only a moment: might still be served by a live twin
    got = poll_until(new, 1)
    assert [q.request_id for q in got] == ["mine"] and got[0].meta["entry"] == entry


def test_claimed_entry_that_already_finished_is_only_acked(make_source, r):
    a = make_source("a")
    a.poll(1, 0)
    add_work(r, "fin")
    assert len(poll_until(a, 1)) == 1
    stream = C.result_stream("fin")
    r.xadd(stream, token_event(0, [5], "x"), id="1-0")
    r.xadd(stream, {"event": "done", "finish_reason": "length", "prompt_tokens": "3", "completion_tokens": "1"},
           id="2-0")
    die(a)
    b = make_source("b")
    wait_until(lambda: not b.poll(4, 0.05) and not pending(r))
    assert b.in_flight == {}


def test_entries_delivered_too_often_are_dead_lettered(make_source, r):
    r.xgroup_create(WORK, C.PIPELINES_GROUP, id="0", mkstream=True)
    entry = add_work(r, "poison")
    for i in range(3):  # three pipelines died holding it
        r.xreadgroup(C.PIPELINES_GROUP, f"dead-{i}", {WORK: ">" if i == 0 else "0"}, count=1)
        if i:
            r.xclaim(WORK, C.PIPELINES_GROUP, f"dead-{i}", 0, [entry])
    src = make_source("b", max_deliveries=3)
    polled: list = []
    wait_until(lambda: polled.extend(src.poll(4, 0.05)) or not pending(r),
               what="the claim took the entry and dead-lettered it")
    assert polled == []  # never handed to the engine
    dl = r.xrange(C.DEADLETTER_STREAM)
    assert len(dl) == 1 and dl[0][1][b"id"] == b"poison" and dl[0][1][b"deliveries"] == b"4"
    (_, ev), = events(r, "poison")
    assert isinstance(ev, ErrorEvent) and ev.code == "internal" and "deadletter" in ev.message


def test_corrupt_work_item_is_dead_lettered(make_source, r):
    src = make_source()
    src.poll(1, 0)
    r.xadd(WORK, {"id": "bad", "model": "tiny", "data": b"\xc1not msgpack"})
    assert poll_until(src, 1, timeout_s=0.5) == []
    assert pending(r) == {}
    assert b"corrupt work item" in r.xrange(C.DEADLETTER_STREAM)[0][1][b"reason"]
    assert isinstance(events(r, "bad")[0][1], ErrorEvent)


def test_cancel_before_admission_finishes_the_request(make_source, r, lua):
    src = make_source()
    src.poll(1, 0)
    r.xadd(C.CANCEL_STREAM, {"id": "early"})
    wait_until(lambda: "early" in src._cancelled, what="the cancel reader has seen it")
    entry = add_work(r, "early")
    assert poll_until(src, 1, timeout_s=0.5) == []
    [(eid, ev)] = events(r, "early")
    assert eid == "1-0" and ev == DoneEvent("cancelled", 3, 0)
    assert entry not in pending(r)


def test_cancel_in_flight_reaches_the_engine(make_source, r):
    src = make_source()
    src.poll(1, 0)
    add_work(r, "a")
    add_work(r, "b")
    assert len(poll_until(src, 2)) == 2
    assert src.poll_cancelled() == []
    r.xadd(C.CANCEL_STREAM, {"id": "b"})
    r.xadd(C.CANCEL_STREAM, {"id": "unknown"})
    got: list[str] = []
    wait_until(lambda: got.extend(src.poll_cancelled()) or got == ["b"])
    src.finished("a")
    assert set(src.in_flight) == {"b"}


def test_a_new_source_honours_recent_cancels(make_source, r, lua):
    r.xadd(C.CANCEL_STREAM, {"id": "gone"})
    src = make_source()
    src.poll(1, 0)
    wait_until(lambda: "gone" in src._cancelled, what="the new source has read the recent cancels")
    add_work(r, "gone")
    assert poll_until(src, 1, timeout_s=0.5) == []
    assert events(r, "gone")[0][1].finish_reason == "cancelled"


def test_drain_flag_exhausts_the_source(make_source, r):
    src = make_source()
    src.poll(1, 0)
    assert not src.exhausted()
    r.hset(C.pipeline_key("p0"), mapping={"drain": "1"})
    wait_until(src.exhausted)
    add_work(r, "after-drain")
    assert src.poll(4, 0.05) == []


def test_redis_outage_does_not_raise(make_source, r, server):
    src = make_source()
    src.poll(1, 0)
    server.connected = False
    for _ in range(3):
        assert src.poll(4, 0.05) == []
    server.connected = True
    add_work(r, "back")
    assert [q.request_id for q in poll_until(src, 1, timeout_s=8)] == ["back"]


def out(rid, seq, tok, text, finish=None, entry=None, n_prompt=3):
    return StepOutput(rid, seq, [tok] if tok is not None else [], text, finish, n_prompt,
                      seq + (1 if tok is not None else 0), meta={"entry": entry} if entry else {})


def test_sink_posts_events_with_explicit_ids_and_acks_after_done(make_source, make_sink, r, lua):
    src = make_source()
    src.poll(1, 0)
    entry = add_work(r, "s")
    assert len(poll_until(src, 1)) == 1
    sink = make_sink(result_ttl_s=100)
    sink.emit([out("s", 0, 7, "Hel", entry=entry)])
    sink.emit([out("s", 1, 8, "lo", "length", entry=entry)])
    assert sink.flush(5)
    evs = events(r, "s")
    assert evs == [("1-0", TokenEvent(0, (7,), "Hel")), ("2-0", TokenEvent(1, (8,), "lo")),
                   ("3-0", DoneEvent("length", 3, 2))]
    assert 0 < r.ttl(C.result_stream("s")) <= 100
    assert pending(r) == {}
    assert read_posted(r, "s") == ([7, 8], True)


@pytest.mark.perf
def test_sink_emit_never_waits_for_redis(make_sink, r, lua, server):
    sink = make_sink()
    server.connected = False
    t0 = time.perf_counter()
    sink.emit([out("o", 0, 1, "a")])
    sink.emit([out("o", 1, 2, "b", "length")])
    assert time.perf_counter() - t0 < 0.05
    server.connected = True
    assert sink.flush(5)


def test_sink_stops_posting_a_request_another_pipeline_already_posts(make_sink, r, lua):
    r.xgroup_create(WORK, C.PIPELINES_GROUP, id="0", mkstream=True)
    entry = add_work(r, "dup")
    r.xreadgroup(C.PIPELINES_GROUP, "pipeline-other", {WORK: ">"})
    r.xadd(C.result_stream("dup"), token_event(0, [9], "other"), id="1-0")  # the other pipeline was first
    sink = make_sink()
    sink.emit([out("dup", 0, 7, "mine", entry=entry)])
    sink.emit([out("dup", 1, 8, "x", "length", entry=entry)])
    assert sink.flush(5)
    assert [e for _, e in events(r, "dup")] == [TokenEvent(0, (9,), "other")]
    assert pending(r) == {entry: "pipeline-other"}  # not acked by the loser
    assert sink.lost() == ["dup"]  # handed to the engine once, so stage 0 stops generating it
    assert sink.lost() == []


def test_sink_retry_of_its_own_write_is_not_a_conflict(make_sink, r, lua):
    sink = make_sink()
    o = out("re", 0, 4, "a")
    sink.emit([o])
    assert sink.flush(5)
    sink.emit([o, out("re", 1, 5, "b", "length")])  # as if the first reply was lost and the write resent
    assert sink.flush(5)
    assert [e for _, e in events(r, "re")] == [TokenEvent(0, (4,), "a"), TokenEvent(1, (5,), "b"),
                                               DoneEvent("length", 3, 2)]


def test_sink_keeps_events_through_an_outage_and_close_flushes(make_sink, r, lua, server):
    sink = make_sink()
    server.connected = False
    sink.emit([out("o", 0, 1, "a")])
    sink.emit([out("o", 1, 2, "b")])
    time.sleep(0.3)  # the test is that time passes: the writer retries through an outage
    server.connected = True
    sink.emit([out("o", 2, None, "", "cancelled")])
    sink.close()
    assert [e for _, e in events(r, "o")] == [TokenEvent(0, (1,), "a"), TokenEvent(1, (2,), "b"),
                                              DoneEvent("cancelled", 3, 2)]


def test_sink_appends_only_right_after_the_last_posted_position(make_sink, r, lua):
    stream = C.result_stream("seq")
    for seq in range(2):  # posted by a pipeline that died
        r.xadd(stream, token_event(seq, [seq], str(seq)), id=f"{seq + 1}-0")
    sink = make_sink()
    sink.emit([out("seq", 2, 2, "2")])  # the resumed request continues at seq 2
    sink.emit([out("gap", 3, 3, "3")])  # a position with nothing before it is refused
    assert sink.flush(5)
    assert [e.seq for _, e in events(r, "seq")] == [0, 1, 2]
    assert events(r, "gap") == []
    r.xadd(stream, {"event": "error", "code": "internal", "message": "dead-lettered"})
    sink.emit([out("seq", 3, 3, "late", "length")])  # nothing may follow an error
    assert sink.flush(5)
    assert isinstance(events(r, "seq")[-1][1], ErrorEvent)


def test_trace_stamps_reach_the_trace_stream_only_when_tracing_is_on(make_source, make_sink, r, lua, monkeypatch):
    from hexgen.wire import trace

    src = make_source()
    src.poll(1, 0)
    sink = make_sink()
    entry = add_work(r, "off")
    [req] = poll_until(src, 1)
    assert "trace" not in req.meta
    sink.emit([StepOutput("off", 0, [7], "a", None, 3, 1, req.meta)])
    assert sink.flush(5) and r.xlen(C.TRACE_STREAM) == 0

    monkeypatch.setattr(trace, "ENABLED", True)
    entry = add_work(r, "on")
    [req] = poll_until(src, 1)
    assert set(req.meta["trace"]) == {"src_read", "src_take"} and req.meta["entry"] == entry
    sink.emit([StepOutput("on", 0, [7], "a", None, 3, 1, req.meta)])
    sink.emit([StepOutput("on", 1, [8], "b", None, 3, 2, req.meta)])  # not the first token: no stamps
    assert sink.flush(5)
    [(_, fields)] = r.xrange(C.TRACE_STREAM)
    fields = {k.decode(): v.decode() for k, v in fields.items()}
    assert fields.pop("id") == "on"
    t = {k: float(v) for k, v in fields.items()}
    assert t["src_read"] <= t["src_take"] <= t["emit"] <= t["picked"] <= t["posted"]
    assert [e for _, e in events(r, "on")] == [TokenEvent(0, (7,), "a"), TokenEvent(1, (8,), "b")]
