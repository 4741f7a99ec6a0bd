"""The OpenAI-compatible HTTP front end to end: the official ``openai`` package (sync and async) against
``bin/head --http-port`` serving a real deployment (redis-server, head, one worker, a tiny random Llama).

Greedy answers through HTTP must equal the Redis path's (:class:`hexgen.client.HexGenClient`) for the same
request; streaming and non-streaming answers must agree; the SSE framing is checked on the raw bytes.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from hexgen.client import HexGenClient
from tests.http_harness import start_http_deployment

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story."}]
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    d = start_http_deployment(str(tmp_path_factory.mktemp("http-api")))
    try:
        yield d
    finally:
        d.stop()


def redis_path(dep, **kw):
    async def go():
        async with HexGenClient(dep.url, block_ms=500, timeout_s=120) as c:
            return await c.generate(**kw)
    return asyncio.run(go())


def sync_client(dep):
    return openai.OpenAI(base_url=dep.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_matches_the_redis_path(dep):
    want = redis_path(dep, messages=MESSAGES, temperature=0, max_new_tokens=12)
    got = sync_client(dep).chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=12)
    assert got.object == "chat.completion" and got.model == "tiny" and got.id.startswith("chatcmpl-")
    [choice] = got.choices
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == {"eos": "stop", "stop": "stop"}.get(want.finish_reason, want.finish_reason)
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    assert got.usage.total_tokens == want.prompt_tokens + want.completion_tokens


def test_chat_stream_equals_the_answer_and_ends_with_usage(dep):
    client = sync_client(dep)
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_completion_tokens=10)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0,
                                                 max_completion_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == full.choices[0].finish_reason and not any(reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_async_completions_stream_and_not_match_the_redis_path(dep):
    want = redis_path(dep, prompt=PROMPT, temperature=0, max_new_tokens=9)

    async def go():
        client = openai.AsyncOpenAI(base_url=dep.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            full = await client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=9)
            stream = await client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=9,
                                                     stream=True)
            parts = [c async for c in stream]
            return full, parts
        finally:
            await client.close()

    full, parts = asyncio.run(go())
    assert full.object == "text_completion" and full.choices[0].text == want.text
    assert full.usage.completion_tokens == want.completion_tokens
    assert "".join(p.choices[0].text for p in parts) == want.text
    assert parts[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(p.usage is None for p in parts)  # no include_usage: no usage chunk


def test_async_chat_stream(dep):
    async def go():
        client = openai.AsyncOpenAI(base_url=dep.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            stream = await client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0,
                                                          max_tokens=8, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream])
        finally:
            await client.close()

    assert asyncio.run(go()) == redis_path(dep, messages=MESSAGES, temperature=0, max_new_tokens=8).text


def test_stop_string_ends_with_stop(dep):
    base = redis_path(dep, prompt=PROMPT, temperature=0, max_new_tokens=16, ignore_eos=True).text
    stop = base[len(base) // 2:len(base) // 2 + 2]
    assert len(stop) == 2
    want = redis_path(dep, prompt=PROMPT, temperature=0, max_new_tokens=16, stop=[stop], ignore_eos=True)
    got = sync_client(dep).completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=16,
                                              stop=stop, extra_body={"ignore_eos": True})
    assert want.finish_reason == "stop"
    assert got.choices[0].finish_reason == "stop" and got.choices[0].text == want.text


def test_seeded_sampling_is_repeatable(dep):
    client = sync_client(dep)
    a, b = (client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0.9, top_p=0.9, seed=7,
                                           max_tokens=8, extra_body={"top_k": 20}) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content


def test_models_list(dep):
    assert [m.id for m in sync_client(dep).models.list()] == ["tiny"]

    async def go():
        client = openai.AsyncOpenAI(base_url=dep.base_url + "/v1", api_key="unused", max_retries=0)
        try:
            return [m.id async for m in client.models.list()], (await client.models.retrieve("tiny")).owned_by
        finally:
            await client.close()

    assert asyncio.run(go()) == (["tiny"], "hexgen")


def test_raw_sse_framing(dep):
    body = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 5, "stream": True}
    with httpx.Client(base_url=dep.base_url, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for ev in events[:-2]:
        assert ev.startswith("data: ") and "\n" not in ev
        assert json.loads(ev[len("data: "):])["object"] == "chat.completion.chunk"


def test_probes(dep):
    with httpx.Client(base_url=dep.base_url, timeout=30) as c:
        assert c.get("/health").json() == {"status": "ok", "redis": "up"}
        ready = c.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert [p["id"] for p in ready.json()["pipelines"]] == ["p0"]


def test_cached_tokens_are_reported(dep):
    """A second chat with the same long system prompt reuses its blocks: ``usage.prompt_tokens_details.
    cached_tokens`` says how many prompt tokens, in the answer, in the include_usage chunk and on the Redis
    path's result."""
    system = {"role": "system", "content": "You answer in one short sentence and never use lists. " * 6}
    client = sync_client(dep)

    def ask(question: str, **kw):
        return client.chat.completions.create(model="tiny", messages=[system, {"role": "user", "content": question}],
                                              temperature=0, max_tokens=4, **kw)

    first = ask("What is a cat?")
    second = ask("What is a dog?")
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 16 <= cached < second.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens <= cached
    chunks = list(ask("What is a hen?", stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    res = redis_path(dep, messages=[system, {"role": "user", "content": "What is a pig?"}], temperature=0,
                     max_new_tokens=4)
    assert res.cached_tokens == cached
