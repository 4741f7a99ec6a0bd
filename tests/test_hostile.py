"""A hostile client and poisoned work items against a real head (HTTP front) and a real redis-server.

Each test plays one attack and checks the answer, that the head keeps answering a normal request while the
attack runs (``responsive``: /health within ``HEALTHY_S``), and that nothing is left behind (connections,
file descriptors, Redis keys). Deployment ``dep``: one one-stage CPU pipeline on the tiny model; ``bare``: a
head with no worker at all (no ready pipeline). The wall-clock bound on a request answered during a
64 MB header is the one timing assertion (``perf``).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import msgpack
import pytest
import redis

from hexgen.engine.types import Request, SamplingParams
from hexgen.wire import keys as C
from hexgen.wire.protocol import encode_work_item, request_fields
from tests.http_harness import ONE_STAGE, HttpDeployment, free_port, make_model, wait_http
from tests.serving_harness import Deployment, write_config
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

HEALTHY_S = 30.0  # a normal request must be answered within this while an attack runs (a stalled loop is not)
LEASE_S = 3.0
HTTP = dict(max_header_bytes=16_384, max_request_line_bytes=4096, read_timeout_s=2.0, keep_alive_s=2.0,
            max_connections=64, redis_pool=16, redis_pool_wait_s=20.0, redis_idle_s=1.0)
VOCAB = 320  # the tiny model's


def start(tmp: str, *, workers: bool, deadline_s: float = 600.0) -> HttpDeployment:
    from tests.redis_server import RedisServer, redis_server_binary

    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(binary)
    url = server.start()
    model_dir = make_model(os.path.join(tmp, "model"))
    limits = {"heartbeat_ttl_s": 2, "heartbeat_interval_s": 0.3, "lease_s": LEASE_S, "block_ms": 500,
              "request_deadline_s": deadline_s, "result_ttl_s": 600}
    config = write_config(os.path.join(tmp, "deploy.toml"), url, model_dir, ONE_STAGE, **limits)
    with open(config, "a", encoding="utf-8") as f:
        f.write("\n[http]\n" + "".join(f"{k} = {v!r}\n" for k, v in HTTP.items()))
    dep = Deployment(url, config, model_dir, tmp, server)
    base_url = f"http://127.0.0.1:{free_port()}"
    try:
        dep.spawn("head", "head", "--log-level", "INFO", "--http-port", base_url.rsplit(":", 1)[1])
        if workers:
            dep.start_worker("p0", 0)
            dep.wait_ready(["p0"])
            wait_http(dep, base_url, "/ready")
        else:
            wait_http(dep, base_url, "/health")
    except BaseException:
        dep.stop()
        raise
    return HttpDeployment(dep, base_url)


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    d = start(str(tmp_path_factory.mktemp("hostile")), workers=True)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    d = start(str(tmp_path_factory.mktemp("bare")), workers=False, deadline_s=2.0)
    yield d
    d.stop()


@pytest.fixture
def r(dep):
    c = redis.Redis.from_url(dep.url, socket_timeout=10)
    yield c
    c.close()


def responsive(d: HttpDeployment) -> float:
    """Seconds /health took; fails when it does not answer 200 within HEALTHY_S."""
    t = time.monotonic()
    resp = httpx.get(d.base_url + "/health", timeout=HEALTHY_S)
    assert resp.status_code == 200, resp.text
    return time.monotonic() - t


def completion(d: HttpDeployment, **extra) -> httpx.Response:
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": 2, "temperature": 0, **extra}
    return httpx.post(d.base_url + "/v1/completions", json=body, timeout=120)


def head_fds(d: HttpDeployment) -> int:
    return len(os.listdir(f"/proc/{d.procs['head'].pid}/fd"))


def events(r: redis.Redis, rid: str) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(C.result_stream(rid))]


def last_event(r: redis.Redis, rid: str) -> dict[str, str] | None:
    ev = events(r, rid)
    return ev[-1] if ev and ev[-1]["event"] in ("done", "error") else None


def raw(d: HttpDeployment, data: bytes, timeout: float = 30.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it (what it answered)."""
    host, port = d.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return out


# ---- 1. poisoned work items -----------------------------------------------------------------------------------

def _item(rid: str, prompt_ids, **params) -> dict[str, bytes]:
    p = {**SamplingParams(max_new_tokens=4).to_dict(), **params}
    payload = {"request_id": rid, "prompt_ids": prompt_ids, "params": p, "output_ids": [], "meta": {}, "model": "tiny"}
    return {"id": rid.encode(), "model": b"tiny", "data": msgpack.packb(payload, use_bin_type=True)}


def test_poisoned_work_items_are_refused_before_the_model(dep, r):
    pid, gen = dep.rank_pid("p0", 0), r.hget(C.pipeline_key("p0"), "generation")
    dead_before = r.xlen(C.DEADLETTER_STREAM) if r.exists(C.DEADLETTER_STREAM) else 0
    poisons = {
        "poison-vocab": _item("poison-vocab", [1, VOCAB + 5, 2]),
        "poison-negative": _item("poison-negative", [3, -7]),
        "poison-float": _item("poison-float", [1.5, 2]),
        "poison-str": _item("poison-str", ["a", 2]),
        "poison-empty": _item("poison-empty", []),
        "poison-top-p": _item("poison-top-p", [1, 2], top_p=7.0),
        "poison-length": _item("poison-length", [1] * 5000),
        "poison-output": encode_work_item(Request("poison-output", [1, 2], SamplingParams(max_new_tokens=4),
                                                  output_ids=[10**9]), "tiny"),
    }
    for fields in poisons.values():
        r.xadd(C.work_stream("tiny"), fields)
    for rid in poisons:
        ev = wait_until(lambda rid=rid: last_event(r, rid), timeout=60, what=f"the error event of {rid}")
        assert ev["event"] == "error" and ev["code"] in ("invalid_request", "internal"), ev
    invalid = {rid: last_event(r, rid) for rid in poisons}
    assert invalid["poison-vocab"]["code"] == "invalid_request"
    assert f"prompt_ids[1]: {VOCAB + 5} must be an integer token id in [0, {VOCAB - 1}]" in invalid["poison-vocab"][
        "message"]
    assert "output_ids[0]" in invalid["poison-output"]["message"]
    assert "top_p" in invalid["poison-top-p"]["message"]  # refused by the decoder's SamplingParams check
    assert r.xlen(C.DEADLETTER_STREAM) - dead_before == len(poisons)
    # the rank never crashed: same process, same generation (the supervisor's restart budget is untouched)
    assert dep.rank_pid("p0", 0) == pid and r.hget(C.pipeline_key("p0"), "generation") == gen
    assert "Traceback" not in dep.log(f"worker-p0-0", tail=200_000)
    responsive(dep)
    assert completion(dep).status_code == 200
    assert r.xlen(C.work_stream("tiny")) == 0  # every item acked and deleted


# ---- 2. deadlines -----------------------------------------------------------------------------------------------

def test_a_request_past_its_deadline_ends_with_timeout(dep, r):
    resp = completion(dep, max_tokens=1500, ignore_eos=True, deadline_s=1.0)
    assert resp.status_code == 503, resp.text
    err = resp.json()["error"]
    assert err["code"] == "timeout" and "deadline_s" in err["message"] and resp.headers["retry-after"]
    # streaming: an error chunk then [DONE] once tokens flowed; a 503 when the deadline passed before the first
    with httpx.stream("POST", dep.base_url + "/v1/completions", timeout=120,
                      json={"prompt": "hi", "max_tokens": 1500, "ignore_eos": True, "stream": True,
                            "deadline_s": 2.0}) as s:
        if s.status_code == 503:
            s.read()
            assert s.json()["error"]["code"] == "timeout"
        else:
            assert s.status_code == 200
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            assert json.loads(lines[-2][len("data: "):])["error"]["code"] == "timeout"
    assert completion(dep, deadline_s=0).status_code == 400
    wait_until(lambda: r.xlen(C.work_stream("tiny")) == 0, timeout=60, what="the cancelled requests released")
    responsive(dep)


def test_no_ready_pipeline_ends_queued_requests_at_their_deadline(bare):
    c = redis.Redis.from_url(bare.url, socket_timeout=10)
    try:
        t0 = time.monotonic()
        ids = [f"stranded-{i}" for i in range(3)]
        for i, rid in enumerate(ids):  # the Redis path: nothing checks readiness before queueing
            fields = request_fields("hello", request_id=rid, max_new_tokens=2, deadline_s=1.0 if i else None)
            c.xadd(C.REQUESTS_STREAM, fields)
        ends: dict[str, dict] = {}

        def all_ended() -> bool:
            for rid in ids:
                if rid not in ends and (ev := last_event(c, rid)) is not None:
                    ends[rid] = {**ev, "after_s": time.monotonic() - t0}
            return len(ends) == len(ids)

        wait_until(all_ended, timeout=60, interval=0.02, what="every stranded request ended at its deadline")
        for rid, ev in ends.items():
            assert ev["event"] == "error" and ev["code"] == "no_ready_pipeline", ev
            assert "no ready pipeline" in ev["message"]
        print(f"\nfigure: first error event with no pipeline after {min(e['after_s'] for e in ends.values()):.2f} s "
              f"(deadline_s 1), default deadline ({2.0} s) after {ends['stranded-0']['after_s']:.2f} s")
        assert completion(bare).status_code == 503  # the HTTP gate answers at once
        responsive(bare)
    finally:
        c.close()


# ---- 3. oversized headers and request lines --------------------------------------------------------------------

def test_oversized_headers_and_request_lines_are_refused_before_parsing(dep):
    big = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200_000 + b"\r\n\r\n"
    answer = raw(dep, big)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"headers_too_large" in answer and b"nosniff" in answer
    many = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(5000)) + b"\r\n"
    assert raw(dep, many).startswith(b"HTTP/1.1 431 ")
    long_line = b"GET /v1/models?" + b"q" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = raw(dep, long_line)
    assert answer.startswith(b"HTTP/1.1 414 "), answer[:200]
    assert httpx.get(dep.base_url + "/health", headers={"X-Ok": "a" * 8000}, timeout=30).status_code == 200
    responsive(dep)


@pytest.mark.perf
def test_a_64mb_header_does_not_stall_the_head(dep):
    host, port = dep.base_url.removeprefix("http://").split(":")
    sent = []

    def flood():
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
            chunk = b"b" * (1 << 20)
            try:
                for _ in range(64):
                    s.sendall(chunk)
                    sent.append(len(chunk))
            except (BrokenPipeError, ConnectionResetError):
                pass

    t = threading.Thread(target=flood)
    t.start()
    took = [responsive(dep) for _ in range(5)]
    t.join(60)
    print(f"\nfigure: /health during a 64 MB header: longest {max(took):.3f} s; server cut the header after "
          f"{sum(sent) / 2**20:.0f} MiB sent")
    assert max(took) < 5.0
    assert sum(sent) < 64 << 20  # the head closed the connection long before the header ended


# ---- 4. slow and idle connections ------------------------------------------------------------------------------

def test_half_sent_and_idle_connections_time_out(dep):
    fds = head_fds(dep)
    host, port = dep.base_url.removeprefix("http://").split(":")
    socks = []
    for i in range(40):
        s = socket.create_connection((host, int(port)), timeout=30)
        if i % 2:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")  # half a request head
        socks.append(s)
    responsive(dep)
    t0 = time.monotonic()
    answers = [s.recv(4096) for s in socks]  # the server answers 408 and closes each
    closed_after = time.monotonic() - t0
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), {a[:40] for a in answers}
    for s in socks:
        s.close()
    # an idle keep-alive connection is closed after keep_alive_s
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        t1 = time.monotonic()
        while s.recv(65536):
            pass
        idle_closed = time.monotonic() - t1
    print(f"\nfigure: 40 slow/idle connections closed within {closed_after:.2f} s (read_timeout_s "
          f"{HTTP['read_timeout_s']}); idle keep-alive closed after {idle_closed:.2f} s")
    wait_until(lambda: head_fds(dep) <= fds + 2, timeout=30, what="the head's file descriptors back to before")


def test_connections_past_the_cap_are_refused(dep):
    host, port = dep.base_url.removeprefix("http://").split(":")
    socks = [socket.create_connection((host, int(port)), timeout=30) for _ in range(HTTP["max_connections"] + 8)]
    try:
        refused = 0
        for s in socks[HTTP["max_connections"]:]:
            if s.recv(4096).startswith(b"HTTP/1.1 503 "):
                refused += 1
        assert refused >= 8
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: _health_ok(dep), timeout=30, what="/health answered once the connections are gone")


def _health_ok(d: HttpDeployment) -> bool:
    try:
        return httpx.get(d.base_url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


# ---- 5. a burst and the Redis pool -----------------------------------------------------------------------------

def test_a_burst_is_bounded_by_the_pool_and_the_pool_shrinks(dep, r):
    import asyncio

    before = len(r.client_list())
    peak = [0]
    stop = threading.Event()

    def watch():
        c = redis.Redis.from_url(dep.url, socket_timeout=10)
        while not stop.is_set():
            peak[0] = max(peak[0], len(c.client_list()))
            time.sleep(0.05)
        c.close()

    async def burst(n: int) -> list[int]:
        async with httpx.AsyncClient(base_url=dep.base_url, timeout=300,
                                     limits=httpx.Limits(max_connections=n)) as client:
            body = {"prompt": "hi", "max_tokens": 2, "temperature": 0}
            resps = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(n)))
            return [x.status_code for x in resps]

    t = threading.Thread(target=watch)
    t.start()
    try:
        codes = asyncio.run(burst(48))
    finally:
        stop.set()
        t.join()
    assert codes.count(200) == len(codes), sorted(set(codes))
    assert peak[0] <= before + HTTP["redis_pool"] + 2, (before, peak[0])
    after = wait_until(lambda: (n := len(r.client_list())) <= before + 1 and n, timeout=30,
                       what="the head's idle Redis connections released")
    assert not list(r.scan_iter(C.reader_key("*"))), "reader keys left behind"
    assert r.xlen(C.work_stream("tiny")) == 0
    print(f"\nfigure: Redis clients before {before}, peak during 48 concurrent requests {peak[0]} "
          f"(redis_pool {HTTP['redis_pool']}), after {after}")
    responsive(dep)


# ---- 6. deep JSON and lone surrogates --------------------------------------------------------------------------

def test_deep_json_and_lone_surrogates_are_400_naming_the_field(dep, r):
    deep = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    resp = httpx.post(dep.base_url + "/v1/completions", content=deep,
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert resp.status_code == 400 and "nested deeper than" in resp.json()["error"]["message"], resp.text
    body = b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}'
    resp = httpx.post(dep.base_url + "/v1/chat/completions", content=body,
                      headers={"Content-Type": "application/json"}, timeout=30)
    err = resp.json()["error"]
    assert resp.status_code == 400 and err["param"] == "messages[0].content" and "surrogate" in err["message"]
    # the Redis path: the same value inside the messages field
    r.xadd(C.REQUESTS_STREAM, {"id": "surrogate-1", "messages": '[{"role": "user", "content": "\\ud800"}]'})
    ev = wait_until(lambda: last_event(r, "surrogate-1"), timeout=60, what="the surrogate request's answer")
    assert ev["code"] == "invalid_request" and ev["message"].startswith("messages[0].content: ")
    assert "RecursionError" not in dep.log("head", tail=200_000)
    assert "UnicodeEncodeError" not in dep.log("head", tail=200_000)
    responsive(dep)


# ---- 7. cross-site requests -----------------------------------------------------------------------------------

def test_cross_site_simple_requests_are_refused_and_headers_set(dep):
    text = httpx.post(dep.base_url + "/v1/completions", content=b'{"prompt": "hi"}',
                      headers={"Content-Type": "text/plain"}, timeout=30)
    assert text.status_code == 415 and text.json()["error"]["code"] == "unsupported_media_type"
    form = httpx.post(dep.base_url + "/v1/chat/completions", data={"messages": "x"}, timeout=30)
    assert form.status_code == 415
    pre = httpx.options(dep.base_url + "/v1/completions", timeout=30,
                        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    for resp in (text, form, pre, httpx.get(dep.base_url + "/health", timeout=30),
                 httpx.get(dep.base_url + "/nothing", timeout=30), completion(dep)):
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in resp.headers["content-security-policy"]
    assert completion(dep, stream=False).status_code == 200


# ---- orphaned streams -----------------------------------------------------------------------------------------

def test_streams_orphaned_by_a_killed_head_are_cancelled(dep, r):
    lines = []

    def read():
        with httpx.stream("POST", dep.base_url + "/v1/completions", timeout=120,
                          json={"prompt": "hi", "max_tokens": 1800, "ignore_eos": True, "stream": True}) as s:
            try:
                for line in s.iter_lines():
                    if line.startswith("data: {"):
                        lines.append(line)
            except httpx.HTTPError:
                pass

    t = threading.Thread(target=read, daemon=True)
    t.start()
    wait_until(lambda: len(lines) >= 3, timeout=120, what="the stream's first tokens")
    readers = wait_until(lambda: [k.decode().removeprefix("hexgen:reader:") for k in r.scan_iter("hexgen:reader:*")],
                         timeout=30, what="the stream's reader key")
    assert len(readers) == 1, readers
    rid = readers[0]
    os.killpg(dep.procs["head"].pid, signal.SIGKILL)
    dep.procs["head"].wait(30)
    t0 = time.monotonic()
    ev = wait_until(lambda: last_event(r, rid), timeout=60, what="the orphaned request's end")
    took = time.monotonic() - t0
    assert ev["event"] == "done" and ev["finish_reason"] == "cancelled", ev
    assert int(ev["completion_tokens"]) < 1800
    print(f"\nfigure: orphaned stream cancelled {took:.2f} s after the head was killed (lease_s {LEASE_S})")
    assert not r.exists(C.reader_key(rid))
    # a new head serves again
    dep.spawn("head", "head", "--log-level", "INFO", "--http-port", dep.base_url.rsplit(":", 1)[1])
    wait_http(dep.dep, dep.base_url, "/ready")
    assert completion(dep).status_code == 200
