"""``GET /metrics`` of a real deployment: redis-server, a head serving HTTP, a two-stage pipeline of worker
processes on a tiny random Llama. Scraped and parsed with prometheus-client's own parser."""
from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hexgen.client import HexGenClient
from hexgen.wire import keys as C
from tests.http_harness import start_http_deployment
from tests.serving_harness import PipelineSpec
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
PIPE = "m2"


def scrape(base_url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of ``/metrics`` as {(sample name, labels): value}."""
    resp = httpx.get(base_url + "/metrics", timeout=10)
    assert resp.status_code == 200
    out = {}
    for fam in text_string_to_metric_families(resp.text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def wait_for(base_url: str, ok, timeout_s: float = 30.0) -> dict:
    """Scrape until ``ok(samples)`` holds (the stage leaders publish every heartbeat interval)."""

    def scraped() -> dict | None:
        samples = scrape(base_url)
        return samples if ok(samples) else None

    return wait_until(scraped, timeout_s, interval=0.2, what=getattr(ok, "__name__", "a /metrics condition"))


async def _redis_requests(url: str, n: int) -> list:
    async with HexGenClient(url, block_ms=500, timeout_s=60) as client:
        results = await asyncio.gather(*(client.generate(prompt=f"count {i}", max_new_tokens=4 + i, temperature=0)
                                         for i in range(n)))
    return list(results)


def _bad_request(dep) -> None:
    """One request the head refuses (max_new_tokens 0), written raw: the client would refuse it itself."""
    r = dep.client()
    try:
        r.xadd(C.REQUESTS_STREAM, {"prompt": "x", "max_new_tokens": "0", "id": "bad-1"})
        reply = r.xread({C.result_stream("bad-1"): "0"}, block=20000)
        assert reply and reply[0][1][0][1][b"code"] == b"invalid_request"
    finally:
        r.close()


def test_metrics_count_exactly_the_requests_made(tmp_path):
    dep = start_http_deployment(str(tmp_path), [PipelineSpec(PIPE, (1, 1), (2, 2))])
    try:
        base = dep.base_url
        # both stages publish their KV gauges once they are up (used: once stage 0's scheduler loop runs)
        def kv_gauges(s: dict) -> bool:
            return all(value(s, "hexgen_kv_blocks_total", pipeline=PIPE, stage=st) > 0 and
                       ("hexgen_kv_blocks_used", frozenset({("model_name", "tiny"), ("pipeline", PIPE), ("stage", st)})) in s
                       for st in ("0", "1"))

        before = wait_for(base, kv_gauges)
        for st in ("0", "1"):
            assert value(before, "hexgen_kv_blocks_used", pipeline=PIPE, stage=st) == 0
        assert value(before, "hexgen_request_success_total", pipeline=PIPE) == 0
        ages = {dict(ls)["rank"]: v for (n, ls), v in before.items() if n == "hexgen_worker_heartbeat_age_seconds"}
        assert sorted(ages) == ["0", "1"] and all(0 <= a < 2 for a in ages.values())

        results = asyncio.run(_redis_requests(dep.url, 3))
        _bad_request(dep)
        chat = httpx.post(base + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0})
        assert chat.status_code == 200, chat.text
        usage = chat.json()["usage"]
        n = len(results) + 1
        prompt = sum(r.prompt_tokens for r in results) + usage["prompt_tokens"]
        generated = sum(r.completion_tokens for r in results) + usage["completion_tokens"]

        after = wait_for(base, lambda s: value(s, "hexgen_request_success_total", pipeline=PIPE) >= n)
        assert value(after, "hexgen_request_success_total", pipeline=PIPE) == n
        reasons = {dict(ls)["finish_reason"]: v for (name, ls), v in after.items()
                   if name == "hexgen_request_success_total"}
        assert sum(reasons.values()) == n and set(reasons) <= {"length", "stop"}
        assert value(after, "hexgen_prompt_tokens_total", pipeline=PIPE, model_name="tiny") == prompt
        assert value(after, "hexgen_generation_tokens_total", pipeline=PIPE) == generated
        for hist in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
            assert value(after, f"hexgen_{hist}_seconds_count", pipeline=PIPE) == n, hist
            assert value(after, f"hexgen_{hist}_seconds_bucket", pipeline=PIPE, le="+Inf") == n, hist
            assert value(after, f"hexgen_{hist}_seconds_sum", pipeline=PIPE) > 0, hist
        itl = value(after, "hexgen_inter_token_latency_seconds_count", pipeline=PIPE)
        assert itl == generated - n  # one gap between each two consecutive tokens of a request
        assert value(after, "hexgen_request_errors_total", code="invalid_request") == 1
        assert value(after, "hexgen_http_requests_total", endpoint="chat") == 1
        for st in ("0", "1"):
            assert value(after, "hexgen_stage_steps_total", pipeline=PIPE, stage=st) > 0
            assert value(after, "hexgen_stage_step_seconds_total", pipeline=PIPE, stage=st) > 0
        assert value(after, "hexgen_pipeline_state", pipeline=PIPE, state="ready") == 1
        # stage 0's gauges catch up within an interval: nothing running, every KV block free again
        wait_for(base, lambda s: value(s, "hexgen_num_requests_running", pipeline=PIPE) == 0
                 and all(value(s, "hexgen_kv_blocks_used", pipeline=PIPE, stage=st) == 0 for st in ("0", "1")))
    finally:
        dep.stop()
