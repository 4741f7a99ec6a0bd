"""The head: validation, tokenizing, dedupe, back-pressure, reclaim and health, on fakeredis and real Redis."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import time

import pytest

from hexgen.wire import keys as C
from hexgen.head.service import Head, run_head
from hexgen.wire.protocol import ErrorEvent, TokenEvent, decode_work_item, parse_event, token_event
from hexgen.wire.settings import LimitSettings, ModelSettings, RedisSettings, Settings, async_redis

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_settings(url: str = "redis://localhost:6379/0", **limits) -> Settings:
    limits.setdefault("block_ms", 50)
    return Settings(model=ModelSettings(preset="tiny"), redis=RedisSettings(url), limits=LimitSettings(**limits))


@pytest.fixture
def make_head(fake, tiny_tokenizer):
    async def make(max_model_len: int = 256, tokenizer=None, **limits) -> Head:
        head = Head(make_settings(**limits), tokenizer or tiny_tokenizer, max_model_len, redis=fake,
                    consumer="head-test")
        await head.setup()
        return head
    return make


async def submit(r, **fields) -> str:
    eid = await r.xadd(C.REQUESTS_STREAM, fields)
    return eid.decode()


async def deliver(r, consumer: str = "head-test") -> list[tuple[str, dict]]:
    reply = await r.xreadgroup(C.HEADS_GROUP, consumer, {C.REQUESTS_STREAM: ">"}, count=100)
    return [(eid.decode(), f) for _, entries in reply for eid, f in entries]


async def work_items(r, model: str = "tiny"):
    return [decode_work_item(f) for _, f in await r.xrange(C.work_stream(model))]


async def events(r, request_id: str):
    return [parse_event(f) for _, f in await r.xrange(C.result_stream(request_id))]


async def heads_pending(r) -> int:
    return (await r.xpending(C.REQUESTS_STREAM, C.HEADS_GROUP))["pending"]


async def handle_all(head: Head) -> list[str]:
    return [await head.handle_entry(eid, f) for eid, f in await deliver(head.redis)]


async def test_setup_is_idempotent(make_head, fake):
    head = await make_head()
    await head.setup()
    names = {g["name"] for g in await fake.xinfo_groups(C.REQUESTS_STREAM)}
    assert names == {b"heads"}
    assert {g["name"] for g in await fake.xinfo_groups("hexgen:work:tiny")} == {b"pipelines"}


async def test_prompt_becomes_work_item(make_head, fake, tiny_tokenizer):
    head = await make_head()
    eid = await submit(fake, prompt="hello world", max_new_tokens="5", temperature="0.5", seed="7", id="r1")
    assert await handle_all(head) == ["queued"]
    [(req, model)] = await work_items(fake)
    assert model == "tiny" and req.request_id == "r1"
    assert req.prompt_ids == tiny_tokenizer("hello world")["input_ids"] and req.prompt_ids[0] == 0  # BOS
    assert (req.params.max_new_tokens, req.params.temperature, req.params.seed) == (5, 0.5, 7)
    assert req.meta["request_entry"] == eid and req.meta["head"] == "head-test"
    assert await heads_pending(fake) == 0
    assert await fake.exists(C.result_stream("r1")) == 0


async def test_default_id_is_entry_id(make_head, fake):
    head = await make_head()
    eid = await submit(fake, prompt="hi")
    await handle_all(head)
    [(req, _)] = await work_items(fake)
    assert req.request_id == eid


async def test_messages_use_chat_template(make_head, fake, tiny_tokenizer):
    head = await make_head()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is the capital?"}]
    await submit(fake, messages=json.dumps(msgs), id="chat")
    assert await handle_all(head) == ["queued"]
    [(req, _)] = await work_items(fake)
    text = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nWhat is the capital?<|im_end|>\n" \
           "<|im_start|>assistant\n"
    assert req.prompt_ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(req.prompt_ids) == text


async def test_invalid_request_gets_error_event_with_expiry(make_head, fake):
    head = await make_head()
    await submit(fake, prompt="hi", max_tokens="5", id="bad1")
    assert await handle_all(head) == ["invalid_request"]
    [ev] = await events(fake, "bad1")
    assert isinstance(ev, ErrorEvent) and ev.code == "invalid_request" and "max_tokens: unknown field" in ev.message
    assert 0 < await fake.ttl(C.result_stream("bad1")) <= C.RESULT_TTL_S
    assert await work_items(fake) == [] and await heads_pending(fake) == 0


async def test_invalid_id_reports_on_entry_id_stream(make_head, fake):
    head = await make_head()
    eid = await submit(fake, prompt="hi", id="no spaces allowed")
    assert await handle_all(head) == ["invalid_request"]
    [ev] = await events(fake, eid)
    assert ev.code == "invalid_request" and ev.message.startswith("id: ")


async def test_unknown_model_is_not_found(make_head, fake):
    head = await make_head()
    await submit(fake, prompt="hi", model="llama-9000", id="m1")
    assert await handle_all(head) == ["not_found"]
    [ev] = await events(fake, "m1")
    assert ev.code == "not_found" and "llama-9000" in ev.message and "tiny" in ev.message
    await submit(fake, prompt="hi", model="tiny", id="m2")
    assert await handle_all(head) == ["queued"]


async def test_context_overflow_names_both_fields(make_head, fake, tiny_tokenizer):
    head = await make_head(max_model_len=20)
    n = len(tiny_tokenizer("hello world")["input_ids"])
    await submit(fake, prompt="hello world", max_new_tokens=str(21 - n), id="long")
    await submit(fake, prompt="hello world", max_new_tokens=str(20 - n), id="fits")
    assert await handle_all(head) == ["invalid_request", "queued"]
    [ev] = await events(fake, "long")
    assert f"prompt of {n} tokens + max_new_tokens {21 - n} = 21 exceeds the model's context of 20" in ev.message


async def test_tokenizer_without_chat_template(make_head, fake):
    from tests.tiny_tokenizer import build_tiny_tokenizer

    head = await make_head(tokenizer=build_tiny_tokenizer(chat_template=False))
    await submit(fake, messages='[{"role": "user", "content": "hi"}]', id="c1")
    assert await handle_all(head) == ["invalid_request"]
    assert "no chat template" in (await events(fake, "c1"))[0].message


async def test_chat_template_refusal_is_invalid_request(make_head, fake):
    from tests.tiny_tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be "
                         "from the user') }}{% endif %}{{ messages[0]['content'] }}")
    head = await make_head(tokenizer=tok)
    await submit(fake, messages='[{"role": "assistant", "content": "hi"}]', id="t1")
    await submit(fake, messages='[{"role": "user", "content": "hi"}]', id="t2")
    assert await handle_all(head) == ["invalid_request", "queued"]
    [ev] = await events(fake, "t1")
    assert ev.message == "messages: the model's chat template rejected them: first message must be from the user"


async def test_duplicate_id_dropped_and_original_stream_untouched(make_head, fake):
    head = await make_head()
    await submit(fake, prompt="first", id="dup")
    assert await handle_all(head) == ["queued"]
    await fake.xadd(C.result_stream("dup"), token_event(0, [5], "x"))  # the original's progress
    await submit(fake, prompt="second", id="dup")
    await submit(fake, prompt="hi", max_tokens="1", id="dup")  # even an invalid duplicate writes nothing
    assert await handle_all(head) == ["duplicate", "duplicate"]
    assert await events(fake, "dup") == [TokenEvent(0, (5,), "x")]
    assert len(await work_items(fake)) == 1 and await heads_pending(fake) == 0


async def test_redelivered_entry_is_not_a_duplicate_of_itself(make_head, fake):
    head = await make_head()
    await submit(fake, prompt="hi", id="again")
    [(eid, fields)] = await deliver(fake)
    await fake.set(C.dedupe_key("again"), eid)  # a head reserved the id, then died before queueing
    assert await head.handle_entry(eid, fields) == "queued"
    assert [r.request_id for r, _ in await work_items(fake)] == ["again"]


async def test_overloaded_counts_queued_and_pending(make_head, fake):
    head = await make_head(max_queue_depth=3)
    for i in range(3):
        await submit(fake, prompt="hi", id=f"ok{i}")
    assert await handle_all(head) == ["queued"] * 3
    # a pipeline takes two (now pending), one stays queued: depth is still 3
    await fake.xreadgroup(C.PIPELINES_GROUP, "pipeline-p0", {"hexgen:work:tiny": ">"}, count=2)
    assert await head.queue_depth() == 3
    await submit(fake, prompt="hi", id="over")
    assert await handle_all(head) == ["overloaded"]
    [ev] = await events(fake, "over")
    assert ev.code == "overloaded" and "holds 3 requests (limit 3)" in ev.message
    # the pipeline finishes one: room again
    first = (await fake.xrange("hexgen:work:tiny", count=1))[0][0]
    await fake.xack("hexgen:work:tiny", C.PIPELINES_GROUP, first)
    await submit(fake, prompt="hi", id="room")
    assert await handle_all(head) == ["queued"]


async def test_run_loop_serves_and_stops_promptly(fake, tiny_tokenizer):
    head = Head(make_settings(block_ms=5000), tiny_tokenizer, 256, redis=fake, consumer="head-run")
    task = asyncio.create_task(head.run())
    for i in range(5):  # the head reads its group from the stream's start: no need to wait for it
        await submit(fake, prompt=f"hello {i}", id=f"run{i}")
    deadline = time.monotonic() + 5
    while len(await fake.xrange("hexgen:work:tiny")) < 5 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert [r.request_id for r, _ in await work_items(fake)] == [f"run{i}" for i in range(5)]
    head.stop()
    await asyncio.wait_for(task, 2)  # did not wait out the 5 s BLOCK
    consumers = [c["name"] for c in await fake.xinfo_consumers(C.REQUESTS_STREAM, C.HEADS_GROUP)]
    assert b"head-run" not in consumers  # left the group with nothing pending


async def test_reclaims_entries_of_a_dead_head(make_head, fake):
    head = await make_head(lease_s=0.05)
    await submit(fake, prompt="hi", id="orphan")
    await deliver(fake, consumer="head-dead")  # delivered to a head that then died
    await asyncio.sleep(0.1)  # the test is that time passes: the entry idles past the 0.05 s lease
    assert await head.reclaim() == 1
    assert [r.request_id for r, _ in await work_items(fake)] == ["orphan"]
    assert await heads_pending(fake) == 0


async def test_poison_entry_goes_to_dead_letter(make_head, fake):
    head = await make_head(lease_s=0.01, max_deliveries=2)
    eid = await submit(fake, prompt="hi", id="poison")
    await deliver(fake, consumer="head-dead")
    for _ in range(2):  # two more heads claim it and die too, each after the 0.01 s lease
        await asyncio.sleep(0.02)
        await fake.xautoclaim(C.REQUESTS_STREAM, C.HEADS_GROUP, "head-dead", 0, start_id="0-0")
    await asyncio.sleep(0.02)  # past the lease again
    assert await head.reclaim() == 1
    [(_, dl)] = await fake.xrange(C.DEADLETTER_STREAM)
    assert dl[b"entry"] == eid.encode() and dl[b"id"] == b"poison" and b"failed 2 times" in dl[b"reason"]
    [ev] = await events(fake, "poison")
    assert ev.code == "internal"
    assert await work_items(fake) == [] and await heads_pending(fake) == 0


async def register(r, wid: str, pipeline: str, stage: int, rank: int, beat: bool = True):
    await r.hset(C.worker_key(wid), mapping={"pipeline": pipeline, "stage": stage, "tp_rank": rank,
                                             "host": "h1", "device": f"cuda:{rank}", "memory": 2**30,
                                             "pid": 100 + rank, "version": "0.1.0", "model": "tiny"})
    if beat:
        await r.set(C.heartbeat_key(wid), str(time.time() - 1.0), ex=C.HEARTBEAT_TTL_S)


async def test_health_watch_logs_dead_workers(make_head, fake, caplog):
    head = await make_head()
    await register(fake, "w0", "p0", 0, 0)
    await register(fake, "w1", "p0", 1, 0)
    await fake.hset(C.pipeline_key("p0"), mapping={"state": "ready", "layout": "hetero-config 1 1",
                                                   "rendezvous": "10.0.0.1:29500"})
    report = await head.check_health()
    assert [w.alive for w in report.workers] == [True, True]
    assert 0.5 < report.workers[0].heartbeat_age_s < 5
    [p] = report.pipelines
    assert (p.id, p.state, p.workers, p.alive_workers) == ("p0", "ready", 2, 2)
    await fake.delete(C.heartbeat_key("w1"))
    with caplog.at_level(logging.WARNING, logger="hexgen.head.service"):
        report = await head.check_health()
    assert [w.alive for w in report.workers] == [True, False]
    [p] = report.pipelines
    assert (p.id, p.state, p.workers, p.alive_workers) == ("p0", "ready", 2, 1)
    warned = [r.args for r in caplog.records if r.levelno == logging.WARNING]
    assert [a[0] for a in warned] == ["w1", "p0"]  # the dead worker, then its pipeline


# ---- real redis-server -------------------------------------------------------------------------------------

async def test_run_head_on_real_redis_stops_on_sigterm(redis_server, tiny_tokenizer):
    settings = make_settings(redis_server, block_ms=2000)
    task = asyncio.create_task(run_head(settings, tokenizer=tiny_tokenizer))
    r = async_redis(redis_server)
    try:
        await r.xadd(C.REQUESTS_STREAM, {"prompt": "hello", "id": "real1"})
        deadline = time.monotonic() + 10
        while not await r.xlen("hexgen:work:tiny") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        [(req, _)] = await work_items(r)
        assert req.request_id == "real1"
        os.kill(os.getpid(), signal.SIGTERM)  # run_head's handler stops the head
        await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
        await r.aclose()


def test_bin_head_subprocess(redis_server, tiny_tokenizer_dir):
    """bin/head as deployed: flags → serve → SIGTERM → exit 0."""
    import redis

    proc = subprocess.Popen([os.path.join(REPO, "bin", "head"), "--redis-url", redis_server,
                             "--preset", "tiny", "--tokenizer", tiny_tokenizer_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    r = redis.Redis.from_url(redis_server)
    try:
        r.xadd(C.REQUESTS_STREAM, {"prompt": "hello", "id": "sub1", "max_new_tokens": "4"})
        r.xadd(C.REQUESTS_STREAM, {"prompt": "hello", "id": "sub2", "temperature": "nan"})
        deadline = time.monotonic() + 60  # transformers import is slow on a small machine
        while not (r.xlen("hexgen:work:tiny") and r.exists("hexgen:result:sub2")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        [(_, fields)] = r.xrange("hexgen:work:tiny")
        req, model = decode_work_item(fields)
        assert (req.request_id, model, req.params.max_new_tokens) == ("sub1", "tiny", 4)
        [(_, err)] = r.xrange("hexgen:result:sub2")
        assert err[b"code"] == b"invalid_request" and b"temperature" in err[b"message"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        r.close()
        output = proc.stdout.read()
        proc.stdout.close()
    assert "stopped" in output


# ---- latency: what the head does per entry -------------------------------------------------------------------

async def test_short_prompt_is_tokenized_on_the_loop_long_one_in_a_thread(make_head, fake, monkeypatch):
    from hexgen.head import service as head_mod

    threaded = []
    real = asyncio.to_thread

    async def spy(fn, *args, **kwargs):
        threaded.append(fn)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(head_mod.asyncio, "to_thread", spy)
    head = await make_head(max_model_len=1 << 20)
    await submit(fake, prompt="hello world", id="short")
    await submit(fake, prompt="a " * head_mod.INLINE_TOKENIZE_CHARS, id="long")
    assert await handle_all(head) == ["queued", "queued"]
    assert threaded == [head_mod.tokenize]  # only the long prompt went to a thread
    assert [r.request_id for r, _ in await work_items(fake)] == ["short", "long"]


async def test_dedupe_and_depth_on_real_redis(redis_server, tiny_tokenizer):
    """Dedupe, redelivery and back-pressure hold on a real redis-server (reservation of an invalid request's id
    in a MULTI, of a valid one's in the submit script)."""
    r = async_redis(redis_server)
    try:
        head = Head(make_settings(redis_server, max_queue_depth=2), tiny_tokenizer, 256, redis=r,
                    consumer="head-test")
        await r.xgroup_create(C.REQUESTS_STREAM, C.HEADS_GROUP, id="0", mkstream=True)
        await r.xadd(C.REQUESTS_STREAM, {"prompt": "hi", "id": "early"})
        [(eid, fields)] = await deliver(r)
        assert await head._reserve("early", eid) == eid
        assert await head._reserve("early", "1-1") == eid  # another entry: the id stays the first's
        await head.setup()
        assert await head.handle_entry(eid, fields) == "queued"  # its own reservation is no duplicate
        await submit(r, prompt="again", id="early")
        await submit(r, prompt="hi", id="second")
        await submit(r, prompt="hi", id="full")
        assert await handle_all(head) == ["duplicate", "queued", "overloaded"]  # limit 2
        assert [type(e).__name__ for e in await events(r, "full")] == ["ErrorEvent"]
        assert await r.ttl(C.dedupe_key("early")) > 0
    finally:
        await r.aclose()


async def test_trace_stamps_ride_in_the_work_item_only_when_tracing_is_on(make_head, fake, monkeypatch):
    from hexgen.wire import trace

    head = await make_head()
    await submit(fake, prompt="hi", id="plain")
    assert await handle_all(head) == ["queued"]
    monkeypatch.setattr(trace, "ENABLED", True)
    await submit(fake, prompt="hi", id="traced")
    assert await handle_all(head) == ["queued"]
    plain, traced = [r for r, _ in await work_items(fake)]
    assert "trace" not in plain.meta
    t = traced.meta["trace"]
    assert t["head_read"] <= t["head_tok"] <= t["head_send"]


async def test_valid_request_is_one_script_call_invalid_one_a_reservation_on_real_redis(redis_server, tiny_tokenizer):
    """After tokenizing, a valid request costs one round trip (the submit script: no MULTI); an invalid one
    reserves its id (MULTI) and writes its error (MULTI), so a duplicate of it is still dropped."""
    r = async_redis(redis_server)

    async def calls() -> dict[str, int]:
        stats = await r.info("commandstats")
        return {k: int(stats.get(f"cmdstat_{k}", {}).get("calls", 0)) for k in ("multi", "evalsha", "eval")}

    try:
        head = Head(make_settings(redis_server), tiny_tokenizer, 256, redis=r, consumer="head-test")
        await head.setup()
        await submit(r, prompt="warm", id="warm")  # loads the script
        assert await handle_all(head) == ["queued"]
        await submit(r, prompt="hello world", id="one")
        before = await calls()
        [(eid, fields)] = await deliver(r)
        assert await head.handle_entry(eid, fields) == "queued"
        after = await calls()
        assert {k: after[k] - before[k] for k in after} == {"multi": 0, "evalsha": 1, "eval": 0}
        await submit(r, prompt="hi", max_tokens="1", id="bad")
        await submit(r, prompt="hi", max_tokens="1", id="bad")
        before = await calls()
        assert await handle_all(head) == ["invalid_request", "duplicate"]
        after = await calls()
        assert {k: after[k] - before[k] for k in after} == {"multi": 3, "evalsha": 0, "eval": 0}
        assert len(await events(r, "bad")) == 1 and await heads_pending(r) == 0
    finally:
        await r.aclose()


async def test_an_unexpected_failure_is_answered_internal_and_the_head_carries_on(make_head, fake, tiny_tokenizer):
    class Broken:
        """A tokenizer with a bug for one prompt."""

        def __getattr__(self, name):
            return getattr(tiny_tokenizer, name)

        def __call__(self, text, **kw):
            if "boom" in text:
                raise AssertionError("a bug")
            return tiny_tokenizer(text, **kw)

    head = await make_head(tokenizer=Broken())
    await submit(fake, prompt="boom", id="b1")
    await submit(fake, prompt="fine", id="b2")
    assert await handle_all(head) == ["internal", "queued"]
    [ev] = await events(fake, "b1")
    assert isinstance(ev, ErrorEvent) and "AssertionError" in ev.message and await heads_pending(fake) == 0


async def test_handled_request_entries_are_deleted(make_head, fake):
    head = await make_head()
    await submit(fake, prompt="hi", id="d1")  # queued
    await submit(fake, prompt="hi", max_tokens="1", id="d2")  # refused
    await submit(fake, prompt="again", id="d1")  # duplicate
    assert await handle_all(head) == ["queued", "invalid_request", "duplicate"]
    assert await fake.xlen(C.REQUESTS_STREAM) == 0 and await heads_pending(fake) == 0
    assert len(await work_items(fake)) == 1
