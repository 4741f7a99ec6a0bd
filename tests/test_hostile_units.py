"""Unit tests of the hostile-edge defences that need no deployment: a failed step dead-letters its requests
(once, not replayed into the same failure), an expired reader key cancels an orphaned request, the
settings that bound the HTTP front are validated, and the OpenAPI document names every route."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from hexgen.engine.leader import FirstLeader
from hexgen.errors import ConfigError
from hexgen.head.http.openapi import schema
from hexgen.wire import keys as C
from hexgen.wire.protocol import ErrorEvent
from hexgen.wire.settings import HttpSettings, LimitSettings
from tests.test_worker_io import add_work, events, make_source, pending, poll_until  # noqa: F401 - fixture
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


def _leader(error: BaseException, running: list[tuple[str, int]]):
    failed = []
    leader = FirstLeader.__new__(FirstLeader)
    leader.scheduler = SimpleNamespace(
        running=[SimpleNamespace(request=SimpleNamespace(request_id=rid), in_flight=n) for rid, n in running])
    leader.source = SimpleNamespace(failed=lambda ids, why: failed.append((ids, why)))

    def steps():
        raise error

    leader._steps = steps
    return leader, failed


def test_an_input_error_in_a_step_fails_the_steps_requests():
    leader, failed = _leader(IndexError("index out of range in self"), [("a", 3), ("b", 0), ("c", 1)])
    with pytest.raises(IndexError):
        leader._loop()
    assert [ids for ids, _ in failed] == [["a", "c"]]
    assert "IndexError: index out of range in self" in failed[0][1]


def test_a_lost_peer_blames_no_request():
    leader, failed = _leader(RuntimeError("connection closed by peer"), [("a", 3)])
    with pytest.raises(RuntimeError):
        leader._loop()
    assert failed == []


def test_failed_requests_are_dead_lettered_once(make_source, r):
    src = make_source()
    src.poll(1, 0)
    entry = add_work(r, "crashy")
    assert [q.request_id for q in poll_until(src, 1)] == ["crashy"]
    src.failed(["crashy", "unknown"], "the step failed on this pipeline (IndexError: boom)")
    (_, ev), = events(r, "crashy")
    assert isinstance(ev, ErrorEvent) and ev.code == "internal" and "IndexError: boom" in ev.message
    dead = r.xrange(C.DEADLETTER_STREAM)
    assert [f[b"entry"].decode() for _, f in dead] == [entry]
    assert pending(r) == {} and r.xlen(C.work_stream("tiny")) == 0
    assert "crashy" not in src.in_flight


def test_an_expired_reader_key_cancels_the_request(make_source, r):
    src = make_source(lease_s=0.3)
    src.poll(1, 0)
    r.set(C.reader_key("watched"), "1", px=800)
    add_work(r, "watched")
    add_work(r, "unwatched")  # a client that keeps no reader key is never cancelled this way
    assert sorted(q.request_id for q in poll_until(src, 2)) == ["unwatched", "watched"]
    got = wait_until(lambda: src.poll_cancelled(), timeout=10, what="the orphaned request cancelled")
    assert got == ["watched"]
    assert src.poll_cancelled() == []


@pytest.mark.parametrize("kw, field", [
    ({"max_header_bytes": 10}, "http.max_header_bytes"),
    ({"max_connections": 0}, "http.max_connections"),
    ({"read_timeout_s": 0}, "http.read_timeout_s"),
    ({"redis_pool": 20_000}, "http.redis_pool"),
    ({"keep_alive_s": float("inf")}, "http.keep_alive_s"),
])
def test_http_bounds_are_validated(kw, field):
    with pytest.raises(ConfigError, match=field):
        HttpSettings(**kw)


def test_deadline_settings():
    with pytest.raises(ConfigError, match="limits.request_deadline_s"):
        LimitSettings(request_deadline_s=100, max_request_deadline_s=50)
    lim = LimitSettings(result_ttl_s=60)
    assert lim.default_deadline_s == 60 and lim.request_limits().max_deadline_s == 60


def test_the_openapi_document_lists_every_route_and_error():
    doc = schema()
    assert set(doc["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model}",
                                 "/health", "/ready", "/openapi.json"}
    answers = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "413", "415", "429", "503"} <= set(answers)


async def test_deadlines_end_only_unfinished_requests():
    import fakeredis

    from hexgen.head.deadlines import Deadlines
    from hexgen.wire.protocol import done_event, parse_event

    r = fakeredis.FakeAsyncRedis()
    d = Deadlines(r, "tiny", heartbeat_ttl_s=2, result_ttl_s=600)
    ready = [True]

    async def is_ready(model):
        return ready[0]

    d.readiness.is_ready = is_ready
    await r.xadd(C.result_stream("finished"), done_event("length", 3, 2))
    for rid in ("finished", "running", "queued"):
        d.add(rid, 0.0)
    due = d.due()
    assert sorted(rid for rid, _ in due) == ["finished", "queued", "running"] and len(d) == 0
    assert await d.expire(due) == 2
    for rid in ("running", "queued"):
        (_, fields), = await r.xrange(C.result_stream(rid))
        ev = parse_event(fields)
        assert ev.code == "timeout" and ev.message.startswith("deadline_s: ")
        assert 0 < await r.ttl(C.result_stream(rid)) <= 600
    assert len(await r.xrange(C.result_stream("finished"))) == 1
    assert sorted(f[b"id"] for _, f in await r.xrange(C.CANCEL_STREAM)) == [b"queued", b"running"]
    ready[0] = False
    d.add("stranded", 0.0)
    assert await d.expire(d.due()) == 1
    (_, fields), = await r.xrange(C.result_stream("stranded"))
    assert parse_event(fields).code == "no_ready_pipeline"
    await r.aclose()
