"""Unit tests of the figures path: histograms and deltas (hexgen/wire/figures.py), per-request timing and
the publisher (workers/metrics.py) on fakeredis, and the step timer (hexgen/engine/gauges.py)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import fakeredis
import pytest
import torch

from hexgen.engine.gauges import StageGauges, StepTimer
from hexgen.engine.types import StepOutput
from hexgen.wire import figures as F
from workers.metrics import FiguresPublisher, MeteredSink, MeteredSource, RequestTimer


def test_histogram_buckets_are_vllms_and_observations_land_in_the_right_bucket():
    assert F.TTFT_BUCKETS[:3] == (0.001, 0.005, 0.01) and F.TTFT_BUCKETS[-1] == 2560.0
    assert F.ITL_BUCKETS[0] == 0.01 and F.ITL_BUCKETS[-1] == 80.0
    assert F.REQUEST_LATENCY_BUCKETS[0] == 0.3 and F.REQUEST_LATENCY_BUCKETS[-1] == 7680.0
    h = F.Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0, -1.0):  # a bound belongs to its bucket (le); negatives clamp to 0
        h.observe(v)
    assert h.counts == [3, 1, 1] and h.count == 5
    assert h.cumulative() == [(0.1, 3), (1.0, 4), (math.inf, 5)]
    assert h.sum == pytest.approx(0.05 + 0.1 + 0.5 + 3.0)


def test_quantile_interpolates_inside_the_bucket_like_histogram_quantile():
    h = F.Histogram((1.0, 2.0, 4.0))
    assert h.quantile(0.5) is None
    for v in (0.5, 1.5, 1.5, 3.0):
        h.observe(v)
    assert h.quantile(0.5) == pytest.approx(1.5)  # rank 2 of 4: halfway through (1, 2]
    assert h.quantile(1.0) == pytest.approx(4.0)
    h.observe(100.0)  # in +Inf: answered with the last finite bound
    assert h.quantile(1.0) == 4.0


def test_counter_deltas_round_trip_through_redis_fields():
    t = F.Tally()
    t.add("generation_tokens", 5)
    t.observe(F.TTFT, 0.03)
    first = t.snapshot()
    ints, floats = F.counter_deltas(first, F.Tally())
    assert ints["generation_tokens"] == 5 and ints[f"h:{F.TTFT}:count"] == 1
    t.add("generation_tokens", 2)
    t.observe(F.TTFT, 0.5)
    ints, floats = F.counter_deltas(t.snapshot(), first)
    assert ints["generation_tokens"] == 2 and ints[f"h:{F.TTFT}:count"] == 1
    assert floats[f"h:{F.TTFT}:sum"] == pytest.approx(0.5)
    raw = {b"model": b"m", b"success:stop": b"3", b"prompt_tokens": b"7", b"stage:1:steps": b"9",
           b"stage:1:step_seconds": b"0.25", f"h:{F.TTFT}:3".encode(): b"2", f"h:{F.TTFT}:count".encode(): b"2",
           f"h:{F.TTFT}:sum".encode(): b"0.04", b"h:bogus:1": b"1", b"stage:x:steps": b"1"}
    p = F.parse_pipeline_figures("p0", raw)
    assert p.model == "m" and p.success == {"stop": 3} and p.counters["prompt_tokens"] == 7
    assert p.stage_steps == {1: 9} and p.stage_step_seconds == {1: 0.25}
    assert p.hists[F.TTFT].counts[3] == 2 and p.hists[F.TTFT].count == 2
    assert F.split_stage_key("hexgen:metrics:stage:a:b:2") == ("a:b", 2)
    assert F.split_stage_key("hexgen:metrics:stage:nostage") is None


def _out(rid, seq, ids, finish=None, meta=None, prompt=4):
    return StepOutput(rid, seq, ids, "x", finish, prompt, seq + len(ids), meta if meta is not None else {})


def test_request_timer_measures_ttft_itl_e2e_and_queue_from_the_stamps():
    now = [100.0]
    t = F.Tally()
    timer = RequestTimer(t, clock=lambda: now[0])
    meta = {"received_at": 99.5, "taken_at": 99.7}
    timer.observe([_out("a", 0, [5], meta=meta)])
    now[0] = 100.2
    timer.observe([_out("a", 1, [6], meta=meta)])
    now[0] = 100.5
    timer.observe([_out("a", 2, [7], "stop", meta=meta)])
    s = t.snapshot()
    assert s.ints == {"generation_tokens": 3, "success:stop": 1, "prompt_tokens": 4}
    assert s.hists[F.TTFT].count == 1 and s.hists[F.TTFT].sum == pytest.approx(0.5)
    assert s.hists[F.ITL].count == 2 and s.hists[F.ITL].sum == pytest.approx(0.5)
    assert s.hists[F.E2E].sum == pytest.approx(1.0) and s.hists[F.QUEUE].sum == pytest.approx(0.2)
    # a request resumed at seq 3 (another pipeline posted 0..2) has no first token here: no TTFT
    timer.observe([_out("b", 3, [1], meta={"received_at": 90.0})])
    timer.observe([_out("c", 0, [], "cancelled", meta={})])  # no stamps: counted, not timed
    s = t.snapshot()
    assert s.hists[F.TTFT].count == 1 and s.ints["success:cancelled"] == 1


def test_metered_wrappers_stamp_and_delegate():
    class Src:
        takeovers = 2

        def poll(self, n, timeout):
            return [SimpleNamespace(meta={"entry": "1-0"})]

    src = MeteredSource(Src(), clock=lambda: 42.0)
    assert src.poll(1, 0)[0].meta == {"entry": "1-0", "taken_at": 42.0}
    assert src.takeovers == 2  # other attributes reach the wrapped source

    emitted = []

    class Sink:
        def emit(self, outputs):
            emitted.extend(outputs)

        def lost(self):
            return ["z"]

    t = F.Tally()
    sink = MeteredSink(Sink(), RequestTimer(t))
    sink.emit([_out("a", 0, [1], meta={"received_at": "not a number"})])
    assert len(emitted) == 1 and sink.lost() == ["z"] and t.snapshot().ints["generation_tokens"] == 1
    assert not hasattr(MeteredSink(SimpleNamespace(emit=None), RequestTimer(t)), "lost")


def test_publisher_writes_deltas_and_gauges_and_retries_after_a_failure(server):
    client = fakeredis.FakeRedis(server=server)
    gauges = StageGauges(kv_blocks_total=64, kv_blocks_fit=80)
    scheduler = SimpleNamespace(running=[1, 2], waiting=[3],
                                blocks=SimpleNamespace(num_blocks=64, num_free=60, num_cached=7, evictions=3),
                                stats=SimpleNamespace(preemptions=1, prefix_queries=50, prefix_hits=32))
    gauges.observe_scheduler(scheduler, in_flight=2)
    tally = F.Tally()
    tally.add("generation_tokens", 10)
    pub = FiguresPublisher(lambda _t: client, "p0", 0, "tiny", gauges, tally, interval_s=1.0,
                           source=lambda: SimpleNamespace(takeovers=3))
    pub.publish()
    key = F.pipeline_figures_key("p0")
    assert client.hget(key, "generation_tokens") == b"10" and client.hget(key, "preemptions") == b"1"
    assert client.hget(key, "takeovers") == b"3" and client.ttl(key) > 0
    assert client.hget(key, "prefix_cache_queries") == b"50" and client.hget(key, "prefix_cache_hits") == b"32"
    assert client.hget(key, "prefix_cache_evictions") == b"3"
    stage = client.hgetall(F.stage_figures_key("p0", 0))
    assert stage[b"kv_blocks_used"] == b"4" and stage[b"running"] == b"2" and stage[b"in_flight"] == b"2"
    assert stage[b"prefix_cache_blocks"] == b"7"
    assert 0 < client.pttl(F.stage_figures_key("p0", 0)) <= 4000
    assert client.smembers(F.PIPELINES_INDEX_KEY) == {b"p0"} and client.smembers(F.STAGES_INDEX_KEY) == {b"p0:0"}

    tally.add("generation_tokens", 5)

    class Down:
        def pipeline(self, transaction=True):
            raise ConnectionError("down")

    pub._r = Down()
    with pytest.raises(ConnectionError):
        pub.publish()
    tally.add("generation_tokens", 1)
    pub._r = client
    pub.publish()  # the failed write's change goes out with the next one, once
    assert client.hget(key, "generation_tokens") == b"16"
    pub.publish(final=True)
    assert not client.exists(F.stage_figures_key("p0", 0))


def test_step_timer_counts_host_time_on_cpu():
    timer = StepTimer()
    fn = timer.wrap(lambda plan, x: x + 1)
    assert fn(None, torch.zeros(2)).tolist() == [1.0, 1.0]
    fn(None, torch.zeros(2))
    assert timer.steps == 2 and timer.seconds > 0


def test_the_rank_module_imports_no_torch():
    """A rank process imports workers.rank before it blocks SIGTERM; torch's import starts threads that would
    take the signal and kill the rank instead of draining it, so the figures code must not pull torch in."""
    import subprocess
    import sys

    code = "import sys, workers.rank; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
