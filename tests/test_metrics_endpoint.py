"""``/metrics``, ``/api/cluster`` and the dashboard's files on a Starlette app over fakeredis (fast; the real
cluster is in tests/test_metrics.py and tests/test_dashboard.py)."""
from __future__ import annotations

import time
from types import SimpleNamespace

import fakeredis
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.testclient import TestClient

from hexgen.engine.gauges import StageGauges
from hexgen.head.http import dashboard, metrics
from hexgen.head.http.cluster import RecentWindow
from hexgen.head.http.context import HttpContext, RequestRecord
from hexgen.wire import figures as F
from hexgen.wire import keys as C
from workers.metrics import FiguresPublisher


def _families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(fam, **labels) -> float:
    for s in fam.samples:
        if all(s.labels.get(k) == v for k, v in labels.items()) and not s.name.endswith(("_created",)):
            return s.value
    raise KeyError(labels)


@pytest.fixture
def cluster(server):
    """Two stages of pipeline p0 publishing figures, its worker records and heartbeats, one head error."""
    sync = fakeredis.FakeRedis(server=server)
    for stage, tp, blocks in ((0, 3, 64), (1, 1, 64)):
        for tp_rank in range(tp):
            rank = stage * 3 + tp_rank
            wid = f"p0:{rank}"
            sync.hset(C.worker_key(wid), mapping={
                "pipeline": "p0", "stage": stage, "tp_rank": tp_rank, "host": "127.0.0.1", "device": "cpu",
                "memory": 0, "pid": 1, "version": "0", "model": "tiny", "rank": rank, "layout": "x"})
            sync.set(C.heartbeat_key(wid), str(time.time()), ex=10)
        sync.hset(C.pipeline_key("p0"), mapping={"state": "ready", "layout": "hetero-config 3 1 / pp-partition 20 10",
                                                 "rendezvous": "tcp://127.0.0.1:1", "generation": 1})
        g = StageGauges(kv_blocks_total=blocks, kv_blocks_fit=blocks + stage * 10)
        g.timer.steps, g.timer.seconds = 10, 0.5
        tally = F.Tally()
        if stage == 0:
            stats = SimpleNamespace(preemptions=0, prefix_queries=100, prefix_hits=64)
            kv = SimpleNamespace(num_blocks=blocks, num_free=blocks - 6, num_cached=5, evictions=2)
            g.observe_scheduler(SimpleNamespace(running=[1], waiting=[], stats=stats, blocks=kv), 1)
        else:
            tally.add("success:stop", 2)
            tally.add("generation_tokens", 9)
            tally.observe(F.TTFT, 0.05)
            tally.observe(F.TTFT, 0.07)
        FiguresPublisher(lambda _t: sync, "p0", stage, "tiny", g, tally, interval_s=5).publish()
    sync.hincrby(F.ERRORS_KEY, "invalid_request", 1)
    sync.xadd(C.DEADLETTER_STREAM, {"id": "x"})
    ctx = HttpContext(settings=SimpleNamespace(limits=SimpleNamespace(heartbeat_ttl_s=10)),
                      redis=fakeredis.FakeAsyncRedis(server=server), models=("tiny",))
    app = Starlette()
    metrics.install(app, ctx)
    dashboard.install(app, ctx)
    return ctx, app, sync


def test_metrics_exports_the_cluster_and_the_heads_figures(cluster):
    ctx, app, _ = cluster
    ctx.counters.record(RequestRecord("chat", "tiny", True, 200, "stop", "", 3, 4, 0.0, 0.1, 0.2))
    with TestClient(app) as client:
        resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    fams = _families(resp.text)
    assert _value(fams["hexgen_request_success"], pipeline="p0", finish_reason="stop", model_name="tiny") == 2
    assert _value(fams["hexgen_generation_tokens"], pipeline="p0") == 9
    ttft = fams["hexgen_time_to_first_token_seconds"]
    assert _value(ttft, pipeline="p0") is not None
    count = [s for s in ttft.samples if s.name.endswith("_count")][0]
    assert count.value == 2
    assert [s.value for s in ttft.samples if s.labels.get("le") == "0.06"] == [1.0]
    for stage in ("0", "1"):
        assert _value(fams["hexgen_kv_blocks_total"], pipeline="p0", stage=stage) == 64
        assert _value(fams["hexgen_kv_blocks_used"], pipeline="p0", stage=stage) == 6
        assert _value(fams["hexgen_stage_step_time_seconds"], pipeline="p0", stage=stage) == pytest.approx(0.05)
    assert _value(fams["hexgen_kv_blocks_fit"], pipeline="p0", stage="1") == 74
    for stage in ("0", "1"):  # stage 0 decides prefix reuse for every stage
        assert _value(fams["hexgen_prefix_cache_queries"], pipeline="p0", stage=stage) == 100
        assert _value(fams["hexgen_prefix_cache_hits"], pipeline="p0", stage=stage) == 64
        assert _value(fams["hexgen_prefix_cache_blocks"], pipeline="p0", stage=stage) == 5
    assert _value(fams["hexgen_prefix_cache_evictions"], pipeline="p0", model_name="tiny") == 2
    assert _value(fams["hexgen_num_requests_running"], pipeline="p0") == 1
    assert _value(fams["hexgen_micro_batches_in_flight"], pipeline="p0") == 1
    ages = fams["hexgen_worker_heartbeat_age_seconds"].samples
    assert all(0 <= s.value < 10 for s in ages)
    assert sorted(s.labels["rank"] for s in ages) == ["0", "1", "2", "3"]
    assert _value(fams["hexgen_request_errors"], code="invalid_request") == 1
    assert _value(fams["hexgen_dead_letters"]) == 1
    assert _value(fams["hexgen_http_requests"], endpoint="chat", outcome="stop") == 1
    assert _value(fams["hexgen_redis_up"]) == 1
    assert "process_cpu_seconds" in fams or "process_cpu_seconds_total" in resp.text


def test_api_cluster_draws_each_stage_with_its_layers_ranks_and_kv(cluster):
    _, app, _ = cluster
    with TestClient(app) as client:
        view = client.get("/api/cluster").json()
        page = client.get("/")
        js = client.get("/static/app.js")
    (p,) = view["pipelines"]
    assert p["id"] == "p0" and p["state"] == "ready" and p["running"] == 1
    assert p["prefix_cache_hit_rate"] == pytest.approx(0.64)
    s0, s1 = p["stages"]
    assert (s0["tp"], s0["layers"], s0["first_layer"], s0["last_layer"]) == (3, 20, 0, 19)
    assert (s1["tp"], s1["layers"], s1["first_layer"], s1["last_layer"]) == (1, 10, 20, 29)
    assert [r["tp_rank"] for r in s0["ranks"]] == [0, 1, 2] and s1["ranks"][0]["host"] == "127.0.0.1"
    assert s0["kv_blocks_used"] == 6 and s0["kv_blocks_total"] == 64 and s1["step_time_s"] == pytest.approx(0.05)
    assert view["model"] == "tiny" and view["dead_letters"] == 1
    assert page.status_code == 200 and "static/app.js" in page.text
    assert js.status_code == 200 and "api/cluster" in js.text and "prefix_cache_hit_rate" in js.text


def test_recent_window_rates_over_the_last_minute():
    def snap(t, tokens, ttfts):
        h = F.Histogram(F.TTFT_BUCKETS)
        for v in ttfts:
            h.observe(v)
        p = F.PipelineFigures("p", counters={"generation_tokens": tokens}, hists={F.TTFT: h})
        return SimpleNamespace(time=t, pipelines={"p": p})

    w = RecentWindow(60.0)
    w.add(snap(0.0, 0, []))
    assert w.summary()["tokens_per_s"] is None
    w.add(snap(30.0, 300, [0.03] * 10))
    w.add(snap(90.0, 900, [0.03] * 10 + [0.5] * 10))
    s = w.summary()  # the 0 s sample has aged out: 30 s .. 90 s
    assert s["window_s"] == 60.0 and s["tokens_per_s"] == pytest.approx(10.0)
    assert s["requests"] == 10 and 0.25 < s["ttft_p50_s"] <= 0.5
