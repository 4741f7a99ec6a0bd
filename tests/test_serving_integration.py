"""Serving end to end on real Redis: head + an asymmetric multi-process pipeline (TP 1 then TP 2) on a tiny
random Llama, driven through the async client and plain redis commands."""
from __future__ import annotations

import asyncio
import time

import pytest

from hexgen.client import HexGenClient, InvalidRequest, Overloaded
from hexgen.wire import keys as C
from hexgen.wire.protocol import DoneEvent, TokenEvent, parse_event
from tests.serving_harness import PipelineSpec, start_deployment
from tests.waiting import async_wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
PIPELINE = PipelineSpec("p0", (1, 2), (2, 2))
RESULT_TTL_S = 4
QUEUE_DEPTH = 6
PROMPTS = ["hello world", "What is the capital of France?", "Once upon a time", "the tiny model"]


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    d = start_deployment(str(tmp_path_factory.mktemp("serving")), [PIPELINE], result_ttl_s=RESULT_TTL_S,
                         max_queue_depth=QUEUE_DEPTH)
    yield d
    d.stop()


@pytest.fixture
async def client(dep):
    async with HexGenClient(dep.url, block_ms=200, timeout_s=60) as c:
        yield c


def stream_events(dep, rid: str) -> list:
    r = dep.client()
    try:
        return [parse_event(f) for _, f in r.xrange(C.result_stream(rid))]
    finally:
        r.close()


def offline_reference(model_dir: str, pipeline: PipelineSpec, prompts: list[tuple[str, bool]],
                      max_new_tokens: int) -> list:
    """The engine's offline greedy result for ``(text, is_chat)`` prompts on the same layout (no Redis)."""
    from transformers import AutoTokenizer

    from hexgen.config import EngineConfig, Layout
    from hexgen.engine.offline import run_offline
    from hexgen.engine.runner import ModelSpec
    from hexgen.engine.types import Request, SamplingParams

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = ModelSpec(model_dir=model_dir)
    layout = Layout.build(model.config(), pipeline.hetero_config, pipeline.pp_partition)
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    reqs = []
    for i, (text, chat) in enumerate(prompts):
        if chat:  # as the head does it
            text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
        ids = tok(text, add_special_tokens=not chat)["input_ids"]
        reqs.append(Request(f"ref{i}", ids, params))
    res = run_offline(layout, model, EngineConfig(), reqs)
    return [res[f"ref{i}"] for i in range(len(prompts))]


async def test_concurrent_greedy_requests_match_the_offline_engine(dep, client):
    n = 10
    results = await asyncio.gather(
        *[client.generate(p, max_new_tokens=n, temperature=0, ignore_eos=True) for p in PROMPTS[:3]],
        client.generate(messages=[{"role": "user", "content": PROMPTS[3]}], max_new_tokens=n, ignore_eos=True))
    for got in results:
        evs = stream_events(dep, got.id)  # before they expire
        assert [e.seq for e in evs if isinstance(e, TokenEvent)] == list(range(n))
        assert evs[-1] == DoneEvent("length", got.prompt_tokens, n)
    ref = offline_reference(dep.model_dir, PIPELINE, [(p, False) for p in PROMPTS[:3]] + [(PROMPTS[3], True)], n)
    for got, want in zip(results, ref):
        assert got.finish_reason == "length" and got.completion_tokens == n
        assert got.token_ids == want.token_ids
        assert got.text == want.text


async def test_plain_redis_commands_work(dep):
    r = dep.client()
    try:
        r.xadd(C.REQUESTS_STREAM, {"prompt": "hello world", "max_new_tokens": "3", "temperature": "0",
                                   "id": "cli-1"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            entries = r.xrange(C.result_stream("cli-1"))
            if entries and entries[-1][1][b"event"] == b"done":
                break
            await asyncio.sleep(0.05)
        fields = [f for _, f in entries]
        assert [f[b"event"] for f in fields] == [b"token", b"token", b"token", b"done"]
        assert [f[b"seq"] for f in fields[:3]] == [b"0", b"1", b"2"]
        assert fields[-1][b"finish_reason"] in (b"length", b"eos")
    finally:
        r.close()


async def test_bad_input_is_refused_naming_the_field(dep, client):
    with pytest.raises(InvalidRequest, match="temperature"):
        await client.generate("hi", temperature=-1)
    r = dep.client()
    try:  # a typo of max_new_tokens must not silently run with the default
        r.xadd(C.REQUESTS_STREAM, {"prompt": "hi", "max_tokens": "3", "id": "typo-1"})
        reply = r.xread({C.result_stream("typo-1"): "0-0"}, block=20000)
        ev = parse_event(reply[0][1][0][1])
        assert ev.code == "invalid_request" and "max_tokens" in ev.message
    finally:
        r.close()


async def test_duplicate_ids_get_one_answer(dep, client):
    r = dep.client()
    try:
        for _ in range(2):
            r.xadd(C.REQUESTS_STREAM, {"prompt": "hello world", "max_new_tokens": "5", "id": "dup-1",
                                       "ignore_eos": "1"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(isinstance(e, DoneEvent) for e in stream_events(dep, "dup-1")):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the test is that nothing more comes: a second answer would have started by now
        evs = stream_events(dep, "dup-1")
        assert [e.seq for e in evs if isinstance(e, TokenEvent)] == [0, 1, 2, 3, 4]
        assert sum(isinstance(e, DoneEvent) for e in evs) == 1
    finally:
        r.close()


async def test_overload_is_refused_and_the_rest_complete(client):
    n = 24
    outcomes = await asyncio.gather(*[client.generate("hello world", max_new_tokens=n, ignore_eos=True)
                                      for _ in range(QUEUE_DEPTH + 6)], return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, Overloaded)]
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    assert refused and len(done) >= QUEUE_DEPTH - 1, outcomes
    assert len(refused) + len(done) == len(outcomes), outcomes
    assert all(d.completion_tokens == n for d in done)
    assert len({tuple(d.token_ids) for d in done}) == 1  # same prompt, greedy: same answer


async def test_cancel_stops_a_running_request(dep, client):
    s = client.stream("Once upon a time", max_new_tokens=400, ignore_eos=True)
    seen = 0
    async for _ev in s:
        seen += 1
        if seen == 3:
            await s.cancel()
    assert s.done is not None and s.done.finish_reason == "cancelled"
    assert 3 <= s.done.completion_tokens < 400
    r = dep.client()
    try:
        deadline = time.monotonic() + 10
        while r.xpending(C.work_stream("tiny"), C.PIPELINES_GROUP)["pending"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert r.xpending(C.work_stream("tiny"), C.PIPELINES_GROUP)["pending"] == 0  # its entry was acked
    finally:
        r.close()


async def test_result_streams_expire(dep, client):
    res = await client.generate("hello", max_new_tokens=2, ignore_eos=True)
    r = dep.client()
    try:
        key = C.result_stream(res.id)
        assert 0 < r.pttl(key) <= RESULT_TTL_S * 1000
        await async_wait_until(lambda: not r.exists(key), timeout=RESULT_TTL_S + 5, what="the result stream expired")
    finally:
        r.close()


async def _collect(it) -> list:
    return [ev async for ev in it]


async def test_sigterm_on_any_stage_drains_the_pipeline(dep, client):
    """Last test of the module: it shuts the pipeline down. The client keeps reading while the worker drains:
    the results expire RESULT_TTL_S after the last post, sooner than a loaded machine takes to stop a worker."""
    s = client.stream("hello world", max_new_tokens=60, ignore_eos=True)
    it = s.__aiter__()
    await it.__anext__()  # the request is in flight
    t0 = time.monotonic()
    reading = asyncio.ensure_future(_collect(it))
    code = await asyncio.to_thread(dep.terminate, "worker-p0-1", 60)
    rest = await reading
    assert code == 0
    assert s.done is not None and s.done.completion_tokens == 60 and len(rest) == 59
    assert await asyncio.to_thread(dep.procs["worker-p0-0"].wait, 30) == 0
    assert time.monotonic() - t0 < 30
    r = dep.client()
    try:
        assert r.keys(C.WORKER_KEY_PATTERN) == [] and r.keys(C.HEARTBEAT_KEY_PREFIX + "*") == []
        assert r.hget(C.pipeline_key("p0"), "state") == b"stopped"
    finally:
        r.close()
