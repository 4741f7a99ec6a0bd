"""The HTTP front's error table over plain HTTP (httpx), against real processes: the API key on /v1/* only,
400s naming the parameter (ours and the head's), 404, 413, 429 with Retry-After, 500, 503, an error inside
a stream, and a client that disconnects mid-stream cancelling its request (done cancelled, entry acked).

The deployment allows one queued-or-running request (``max_queue_depth = 1``) so that one long request
makes the next one overloaded. The 500 and the in-stream error are produced by writing an ``internal``
error event into the request's real result stream while the pipeline is generating it, as a failing
pipeline would.
"""
from __future__ import annotations

import json
import time

import httpx
import pytest
import redis

from hexgen.wire import keys as C
from hexgen.wire.protocol import error_event, parse_event
from hexgen.wire import figures as F
from tests.http_harness import CONTEXT, start_http_deployment

pytestmark = pytest.mark.slow

KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
LONG = CONTEXT - 100  # tokens of a request that runs long enough to overlap another


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    d = start_http_deployment(str(tmp_path_factory.mktemp("http-errors")), api_key=KEY, max_queue_depth=1)
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def http(dep):
    with httpx.Client(base_url=dep.base_url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture
def r(dep):
    c = redis.Redis.from_url(dep.url, socket_timeout=10)
    yield c
    c.close()


def chat(**kw):
    return {"model": "tiny", "messages": MESSAGES, "temperature": 0, **kw}


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def wait_for(cond, timeout_s: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what} not met within {timeout_s}s")


def result_events(r, request_id: str) -> list:
    return [parse_event(f) for _, f in r.xrange(C.result_stream(request_id))]


def work_pending(r) -> int:
    return int(r.xpending(C.work_stream("tiny"), C.PIPELINES_GROUP)["pending"])


def kv_blocks_used(r) -> int | None:
    """Stage 0's KV blocks in use, as its leader last published them (every heartbeat interval)."""
    raw = r.hget(F.STAGE_FIGURES_PREFIX + "p0:0", "kv_blocks_used")
    return None if raw is None else int(float(raw))


def queue_drained(r) -> bool:
    for g in r.xinfo_groups(C.work_stream("tiny")):
        if g["name"] == C.PIPELINES_GROUP.encode():
            return int(g["pending"]) == 0 and int(g.get("lag") or 0) == 0
    return True


# ---- the API key -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_v1_needs_the_api_key(dep, headers):
    with httpx.Client(base_url=dep.base_url, timeout=30) as c:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")):
            resp = c.request(method, path, headers=headers, json=chat())
            e = error_of(resp, 401)
            assert e["code"] == "invalid_api_key" and resp.headers["www-authenticate"] == "Bearer"
            assert KEY not in resp.text


def test_probes_need_no_key(dep):
    with httpx.Client(base_url=dep.base_url, timeout=30) as c:
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200


def test_the_right_key_works_with_the_openai_client(dep):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=dep.base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=4)
    assert got.usage.completion_tokens >= 1
    bad = openai.OpenAI(base_url=dep.base_url + "/v1", api_key="nope", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---- 400, 404, 413 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,param,text", [
    (chat(temperature=250), "temperature", "allowed: [0, 100]"),
    (chat(top_p=2), "top_p", "0 < top_p ≤ 1"),
    (chat(max_tokens=0), "max_tokens", "allowed: [1, "),
    (chat(n=17), "n", "[1, 16]"),
    (chat(presence_penalty=3.0), "presence_penalty", "allowed: [-2, 2]"),
    (chat(logprobs=3), "logprobs", "true or false"),
    (chat(logprobs=True, top_logprobs=30), "top_logprobs", "[0, 20]"),
    (chat(stop=[""]), "stop", "non-empty"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role", "must be one of"),
    (chat(frobnicate=1), "frobnicate", "unknown parameter"),
])
def test_bad_parameters_are_400_naming_them(http, body, param, text):
    e = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert e["param"] == param and text in e["message"] and e["type"] == "invalid_request_error"


def test_the_heads_context_check_is_a_400(http):
    # the head tokenizes and finds prompt + max_tokens over the model's context
    e = error_of(http.post("/v1/completions", json={"model": "tiny", "prompt": "word " * 100,
                                                    "max_tokens": CONTEXT - 10}), 400)
    assert e["param"] == "max_tokens" and f"context of {CONTEXT} tokens" in e["message"]
    e = error_of(http.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": "word " * 100}],
                                                              max_tokens=CONTEXT - 10, stream=True)), 400)
    assert e["param"] == "max_tokens" and e["message"].startswith("messages, max_tokens:")


def test_invalid_json_and_too_large_bodies(http):
    e = error_of(http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}),
                 400)
    assert "not valid JSON" in e["message"]
    as_json = {"Content-Type": "application/json"}
    assert "NaN" in error_of(http.post("/v1/completions", content=b'{"prompt": "x", "temperature": NaN}',
                                       headers=as_json), 400)["message"]
    huge = json.dumps({"model": "tiny", "prompt": "x" * (5 << 20)})
    e = error_of(http.post("/v1/completions", content=huge, headers=as_json), 413)
    assert e["code"] == "request_too_large"


def test_unknown_model_and_route_are_404(http):
    e = error_of(http.post("/v1/chat/completions", json=chat(model="gpt-9")), 404)
    assert e["param"] == "model" and e["code"] == "model_not_found" and "tiny" in e["message"]
    assert error_of(http.get("/v1/models/gpt-9"), 404)["code"] == "model_not_found"
    assert error_of(http.get("/v1/nothing"), 404)["code"] == "not_found"
    assert error_of(http.get("/v1/chat/completions"), 405)["code"] == "method_not_allowed"


# ---- overload, disconnect, errors from the pipeline ------------------------------------------------------

def first_chunk_id(lines) -> str:
    for line in lines:
        if line.startswith("data: {"):
            return json.loads(line[len("data: "):])["id"]
    raise AssertionError("stream ended before a chunk")


def test_overload_is_429_and_a_disconnect_cancels(dep, http, r):
    wait_for(lambda: queue_drained(r), what="an empty work queue")
    body = chat(max_tokens=LONG, stream=True, ignore_eos=True)
    with httpx.Client(base_url=dep.base_url, headers=AUTH, timeout=60) as c1:
        with c1.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            request_id = first_chunk_id(lines).removeprefix("chatcmpl-")
            next(lines)
            assert work_pending(r) == 1  # the long request holds the only slot
            over = http.post("/v1/chat/completions", json=chat(max_tokens=4))
            e = error_of(over, 429)
            assert e["code"] == "overloaded" and over.headers["retry-after"] == "1"
            assert "limit 1" in e["message"]
            wait_for(lambda: (kv_blocks_used(r) or 0) > 0, timeout_s=10, what="KV in use")
        # the client went away mid-stream: the HTTP front cancels the request
    events = wait_for(lambda: [ev for ev in result_events(r, request_id) if hasattr(ev, "finish_reason")],
                      what="a done event")
    assert events[-1].finish_reason == "cancelled" and events[-1].completion_tokens < LONG
    wait_for(lambda: work_pending(r) == 0, what="the cancelled work item acked")
    wait_for(lambda: kv_blocks_used(r) == 0, timeout_s=10, what="the KV blocks freed")
    ok = http.post("/v1/chat/completions", json=chat(max_tokens=3))  # the slot is free again
    assert ok.status_code == 200, ok.text


def test_a_non_streaming_disconnect_cancels(dep, r):
    wait_for(lambda: queue_drained(r), what="an empty work queue")
    before = set(r.scan_iter(match=C.RESULT_STREAM_PREFIX + "*"))
    with httpx.Client(base_url=dep.base_url, headers=AUTH, timeout=0.5) as c:
        with pytest.raises(httpx.ReadTimeout):  # give up after half a second: the connection is closed
            c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": LONG, "ignore_eos": True})
    [key] = wait_for(lambda: set(r.scan_iter(match=C.RESULT_STREAM_PREFIX + "*")) - before, what="a result stream")
    request_id = key.decode()[len(C.RESULT_STREAM_PREFIX):]
    events = wait_for(lambda: [ev for ev in result_events(r, request_id) if hasattr(ev, "finish_reason")],
                      what="a done event")
    assert events[-1].finish_reason == "cancelled" and events[-1].completion_tokens < LONG
    wait_for(lambda: work_pending(r) == 0, what="the cancelled work item acked")


def inject_internal_error(r, request_id: str) -> None:
    wait_for(lambda: r.xlen(C.result_stream(request_id)) > 0, what="the first token")
    r.xadd(C.result_stream(request_id), error_event("internal", "stage 1 died (injected by the test)"))
    r.xadd(C.CANCEL_STREAM, {"id": request_id})  # let the pipeline stop early


def test_an_error_inside_a_stream_is_an_sse_error_then_done(dep, r):
    wait_for(lambda: queue_drained(r), what="an empty work queue")
    with httpx.Client(base_url=dep.base_url, headers=AUTH, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=chat(max_tokens=LONG, stream=True, ignore_eos=True)) as s:
            lines = s.iter_lines()
            request_id = first_chunk_id(lines).removeprefix("chatcmpl-")
            inject_internal_error(r, request_id)
            rest = [ln for ln in lines if ln]
    assert rest[-1] == "data: [DONE]"
    err = json.loads(rest[-2][len("data: "):])
    assert err["error"]["code"] == "internal_error" and "stage 1 died" in err["error"]["message"]
    assert all(json.loads(ln[6:]).get("object") == "chat.completion.chunk" for ln in rest[:-2])


def test_a_pipeline_error_before_the_answer_is_a_500(dep, r):
    import threading

    wait_for(lambda: queue_drained(r), what="an empty work queue")
    before = set(r.scan_iter(match=C.RESULT_STREAM_PREFIX + "*"))
    out: dict = {}

    def call():
        with httpx.Client(base_url=dep.base_url, headers=AUTH, timeout=60) as c:
            out["resp"] = c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": LONG,
                                                          "ignore_eos": True})
    t = threading.Thread(target=call)
    t.start()
    [key] = wait_for(lambda: set(r.scan_iter(match=C.RESULT_STREAM_PREFIX + "*")) - before, what="a result stream")
    inject_internal_error(r, key.decode()[len(C.RESULT_STREAM_PREFIX):])
    t.join(60)
    e = error_of(out["resp"], 500)
    assert e["type"] == "server_error" and "stage 1 died" in e["message"]


# ---- no pipeline, no Redis -------------------------------------------------------------------------------

def test_no_ready_pipeline_is_503_and_redis_down_fails_health(tmp_path):
    d = start_http_deployment(str(tmp_path), workers=False)
    try:
        with httpx.Client(base_url=d.base_url, timeout=30) as c:
            ready = c.get("/ready")
            assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
            resp = c.post("/v1/chat/completions", json=chat())
            e = error_of(resp, 503)
            assert e["code"] == "no_ready_pipeline" and resp.headers["retry-after"] == "1"
            assert c.get("/health").json() == {"status": "ok", "redis": "up"}
            d.server.stop()
            health = wait_for(lambda: (h := c.get("/health")).status_code == 503 and h, what="health 503")
            assert health.json()["redis"].startswith("down")
    finally:
        d.stop()
