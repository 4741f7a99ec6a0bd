"""Simulator tests: hand-checkable cases with a stub cost model (stage times linear in tokens)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pytest

from hexgen.errors import ConfigError
from hexgen.planner.simulator import SimConfig, SimResult, max_rate_under_slo, percentile, request_stream, \
    saturated_rate, simulate


# -- stubs shaped like hexgen.planner.search's Plan / ReplicaPlan / StagePlan / Cluster / CostModel ------------
@dataclass(frozen=True)
class Dev:
    name: str
    per_token: float  # seconds per token per layer
    fixed: float = 0.0  # seconds per layer per step


@dataclass(frozen=True)
class Gpu:
    node: str
    index: int
    device: Dev


@dataclass(frozen=True)
class Link:
    bandwidth: float = 1e12
    latency: float = 0.0


@dataclass(frozen=True)
class Stage:
    gpus: tuple
    layers: int
    kv_tokens: int = 1 << 20

    @property
    def tp(self) -> int:
        return len(self.gpus)


@dataclass(frozen=True)
class Replica:
    stages: tuple
    max_batch: int = 64


@dataclass(frozen=True)
class Plan:
    replicas: tuple


@dataclass(frozen=True)
class Slo:
    latency_s: float = 0.0


@dataclass(frozen=True)
class Workload:
    prompt_len: int = 16
    output_len: int = 8


class StubCluster:
    def __init__(self, inter: Link = Link(), intra: Link = Link()) -> None:
        self.inter, self.intra = inter, intra

    def link(self, a: Gpu, b: Gpu) -> Link:
        return self.intra if a.node == b.node else self.inter


class StubCost:
    """stage_time = layers * (fixed + per_token * tokens); transfer = hop_s per hop."""

    def __init__(self, hop_s: float = 0.0) -> None:
        self.hop_s = hop_s
        self.calls = 0

    def stage_time(self, dev, tp, layers, link, tokens, context, first, last) -> float:
        self.calls += 1
        return layers * (dev.fixed + dev.per_token * tokens)

    def transfer_time(self, link, tokens) -> float:
        return self.hop_s


def make_plan(*replicas) -> Plan:
    """replicas: lists of (Dev, layers[, kv_tokens]) per stage, each stage on its own node."""
    out = []
    for r, stages in enumerate(replicas):
        out.append(Replica(tuple(Stage((Gpu(f"r{r}s{i}", 0, s[0]),), s[1], *s[2:]) for i, s in enumerate(stages))))
    return Plan(tuple(out))


def stage_t(dev: Dev, layers: int, tokens: int) -> float:
    return layers * (dev.fixed + dev.per_token * tokens)


FAST = Dev("fast", per_token=1e-4, fixed=1e-3)
SLOW = Dev("slow", per_token=3e-4, fixed=2e-3)
LINEAR = Dev("linear", per_token=1e-3)


# -- one request alone ---------------------------------------------------------------------------------------------
def test_single_request_hand_checked():
    plan = make_plan([(FAST, 4), (SLOW, 2)])
    cluster = StubCluster(inter=Link(latency=5e-4))
    cost = StubCost(hop_s=2e-4)
    res = simulate(plan, cost, cluster, rate=math.inf, num_requests=1, workload=Workload(100, 5), slo=Slo(10))
    prefill = stage_t(FAST, 4, 100) + 2e-4 + stage_t(SLOW, 2, 100)
    decode = stage_t(FAST, 4, 1) + 2e-4 + stage_t(SLOW, 2, 1)
    # the first token leaves the last stage after the prefill; each further token needs the previous one's ids
    # back at stage 0 (return latency) and a decode through the pipeline
    assert res.completed == 1
    assert res.ttft_p50 == pytest.approx(prefill)
    assert res.tpot_p50 == pytest.approx(decode + 5e-4)
    assert res.latency_p50 == pytest.approx(prefill + 4 * (decode + 5e-4))
    assert res.slo_attainment == 1.0
    assert res.steps == 5


def test_chunked_prefill_sends_one_chunk_at_a_time():
    plan = make_plan([(LINEAR, 1), (LINEAR, 1)])
    res = simulate(plan, StubCost(), StubCluster(), rate=math.inf, num_requests=1, workload=Workload(5000, 1),
                   slo=Slo(), config=SimConfig(max_num_batched_tokens=2048))
    # chunks 2048, 2048, 904 each cross both stages before the next is scheduled
    assert res.steps == 3
    assert res.ttft_p50 == pytest.approx(2 * 1e-3 * 5000)
    assert res.tpot_p50 == 0.0  # one output token: no TPOT sample


def test_slo_attainment_counts_misses():
    plan = make_plan([(FAST, 4)])
    lone = simulate(plan, StubCost(), StubCluster(), rate=math.inf, num_requests=1, workload=Workload(), slo=Slo())
    res = simulate(plan, StubCost(), StubCluster(), rate=math.inf, num_requests=1, workload=Workload(),
                   slo=Slo(lone.latency_p50 * 0.99))
    assert res.completed == 1 and res.slo_attainment == 0.0


# -- pipelining ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stages", [2, 4])
def test_micro_batches_give_p_times_throughput_under_saturation(stages):
    plan = make_plan([(LINEAR, 2)] * stages)
    kw = dict(rate=math.inf, num_requests=128, workload=Workload(8, 64), slo=Slo())
    piped = simulate(plan, StubCost(), StubCluster(), micro_batches=True, **kw)
    single = simulate(plan, StubCost(), StubCluster(), micro_batches=False, **kw)
    assert piped.completed == single.completed == 128
    ratio = piped.output_tok_s / single.output_tok_s
    assert 0.85 * stages <= ratio <= 1.01 * stages


def test_throughput_never_beats_the_bottleneck_stage():
    # each token (prefill or decode) must cross the slow stage: tokens/s <= 1 / (layers * per_token)
    plan = make_plan([(FAST, 4), (SLOW, 4), (FAST, 4)])
    for rate in (5.0, 50.0, math.inf):
        res = simulate(plan, StubCost(), StubCluster(), rate=rate, num_requests=300, workload=Workload(64, 32),
                       slo=Slo())
        tokens = res.throughput_rps * (64 + 32 - 1)
        step_bound = 1 / (4 * SLOW.fixed)
        assert tokens <= 1 / (4 * SLOW.per_token) * 1.0001
        assert res.steps / res.duration_s <= step_bound * 1.0001
        assert res.bottleneck_util <= 1.0
    assert res.bottleneck_util > 0.9  # saturated: the slow stage is nearly always busy


def test_single_stage_has_one_micro_batch_in_flight():
    plan = make_plan([(LINEAR, 1)])
    a = simulate(plan, StubCost(), StubCluster(), rate=math.inf, num_requests=20, workload=Workload(4, 4),
                 slo=Slo(), micro_batches=True)
    b = simulate(plan, StubCost(), StubCluster(), rate=math.inf, num_requests=20, workload=Workload(4, 4),
                 slo=Slo(), micro_batches=False)
    assert a == b


# -- capacity bounds -------------------------------------------------------------------------------------------
def test_kv_capacity_bounds_concurrency():
    const = Dev("const", per_token=0.0, fixed=0.01)
    # 64 KV tokens = 4 blocks of 16; a 31-token prompt + 1 output token needs 2 blocks -> 2 at a time
    plan = make_plan([(const, 1, 64), (const, 1, 1024)])  # capacity = min over stages
    kw = dict(rate=math.inf, num_requests=8, workload=Workload(31, 1), slo=Slo())
    res = simulate(plan, StubCost(), StubCluster(), micro_batches=False, **kw)
    assert res.peak_running == 2
    assert res.completed == 8
    assert res.duration_s == pytest.approx(4 * 2 * 0.01)  # 4 rounds, each through 2 stages
    # with 2 micro-batches the scheduler gives each at most ceil(sequences / 2): the last two requests go in
    # separate micro-batches 0.01 s apart, as hexgen/engine/scheduler.py does
    res = simulate(plan, StubCost(), StubCluster(), micro_batches=True, **kw)
    assert res.peak_running == 2 and res.steps == 5
    assert res.duration_s == pytest.approx(0.09)


def test_max_num_seqs_bounds_concurrency():
    plan = make_plan([(LINEAR, 1)])
    res = simulate(plan, StubCost(), StubCluster(), rate=math.inf, num_requests=50, workload=Workload(8, 8),
                   slo=Slo(), config=SimConfig(max_num_seqs=5))
    assert res.peak_running == 5 and res.completed == 50


def test_plan_max_batch_is_the_default_max_num_seqs():
    plan = Plan((Replica((Stage((Gpu("n", 0, LINEAR),), 1),), max_batch=3),))
    res = simulate(plan, StubCost(), StubCluster(), rate=math.inf, num_requests=10, workload=Workload(8, 8),
                   slo=Slo())
    assert res.peak_running == 3


def test_small_kv_preempts_and_still_finishes():
    plan = make_plan([(FAST, 2, 256)])
    res = simulate(plan, StubCost(), StubCluster(), rate=math.inf, num_requests=12, workload=Workload(40, 60),
                   slo=Slo())
    assert res.preemptions > 0
    assert res.completed == 12


def test_replicas_drive_the_engine_scheduler():
    """Each replica's micro-batches are the engine's own Scheduler plans over its BlockManager: every block
    comes back when the requests are done, and a rejected request (reported to the scheduler's last stage
    with no forward pass) costs no micro-batch."""
    from hexgen.engine.scheduler import Scheduler
    from hexgen.planner.simulator import _build_replicas, _run

    plan = make_plan([(FAST, 2, 64)])
    seqs, (rep,), _ = _run(plan, StubCost(), StubCluster(), math.inf, 4, [(100, 4), (8, 4)], 0, True, SimConfig())
    assert isinstance(rep.scheduler, Scheduler) and rep.scheduler.idle
    assert rep.scheduler.blocks.num_free == rep.scheduler.blocks.num_blocks == 4
    assert rep.steps == rep.scheduler.stats.steps == 4  # the rejections' notices ride with the first plan
    assert [s.rejected for s in seqs] == [True, False, True, False]
    _, (alone,), _ = _run(plan, StubCost(), StubCluster(), math.inf, 2, [(8, 4)], 0, True, SimConfig())
    assert alone.steps == rep.steps
    assert _build_replicas(plan, StubCost(), StubCluster(), SimConfig(), True)[0].scheduler.max_len == 64


def test_prompt_longer_than_cache_is_rejected():
    plan = make_plan([(FAST, 2, 64)])
    res = simulate(plan, StubCost(), StubCluster(), rate=math.inf, num_requests=4,
                   workload=[(100, 4), (8, 4)], slo=Slo(100))
    assert res.rejected == 2 and res.completed == 2 and res.slo_attainment == 0.5


def test_output_is_capped_to_the_context():
    plan = make_plan([(LINEAR, 1, 64)])
    res = simulate(plan, StubCost(), StubCluster(), rate=math.inf, num_requests=1, workload=Workload(60, 100),
                   slo=Slo())
    assert res.completed == 1 and res.output_tok_s * res.duration_s == pytest.approx(4)


# -- streams, determinism, queueing sanity -----------------------------------------------------------------------
def test_poisson_stream_rate_and_scaling():
    s1 = request_stream(10.0, 4000, Workload(), seed=3)
    s2 = request_stream(20.0, 4000, Workload(), seed=3)
    assert s1[-1][0] / 3999 == pytest.approx(0.1, rel=0.05)
    assert all(a[0] == pytest.approx(2 * b[0]) for a, b in zip(s1, s2))
    assert all(t == 0.0 for t, _, _ in request_stream(math.inf, 5, Workload()))
    assert [(p, o) for _, p, o in request_stream(1.0, 3, [(1, 2), (3, 4)])] == [(1, 2), (3, 4), (1, 2)]


def test_deterministic_by_seed():
    plan = make_plan([(FAST, 4), (SLOW, 2)], [(SLOW, 3), (FAST, 3)])
    kw = dict(rate=40.0, num_requests=300, workload=Workload(50, 20), slo=Slo(1.0))
    a = simulate(plan, StubCost(), StubCluster(), seed=7, **kw)
    b = simulate(plan, StubCost(), StubCluster(), seed=7, **kw)
    c = simulate(plan, StubCost(), StubCluster(), seed=8, **kw)
    assert a == b
    assert a != c


def test_littles_law_and_throughput_matches_offered_load():
    plan = make_plan([(FAST, 4), (FAST, 4)])
    rate = 20.0
    res = simulate(plan, StubCost(), StubCluster(), rate=rate, num_requests=2000, workload=Workload(32, 16),
                   slo=Slo(), seed=1)
    assert res.completed == 2000
    # L from the simulator's own queues vs lambda * W from request timestamps (they differ only by the
    # return trip of the last token's ids)
    assert res.mean_in_system == pytest.approx(res.throughput_rps * res.latency_mean, rel=0.02)
    assert res.throughput_rps == pytest.approx(rate, rel=0.1)  # below capacity: departures track arrivals


def test_two_replicas_double_saturated_throughput():
    one = make_plan([(LINEAR, 2), (LINEAR, 2)])
    two = make_plan([(LINEAR, 2), (LINEAR, 2)], [(LINEAR, 2), (LINEAR, 2)])
    kw = dict(rate=math.inf, num_requests=256, workload=Workload(8, 32), slo=Slo())
    r1 = simulate(one, StubCost(), StubCluster(), **kw)
    r2 = simulate(two, StubCost(), StubCluster(), **kw)
    assert r2.output_tok_s / r1.output_tok_s == pytest.approx(2.0, rel=0.1)


def test_latency_grows_with_load():
    plan = make_plan([(FAST, 4), (SLOW, 4)])
    lat = [simulate(plan, StubCost(), StubCluster(), rate=r, num_requests=400, workload=Workload(64, 32),
                    slo=Slo()).latency_p99 for r in (1.0, 10.0, 40.0)]
    assert lat[0] < lat[1] < lat[2]


@pytest.mark.perf
def test_2000_requests_is_fast():
    plan = make_plan([(FAST, 8), (SLOW, 4)], [(FAST, 6), (FAST, 6)], [(SLOW, 12)])
    t0 = time.perf_counter()
    res = simulate(plan, StubCost(), StubCluster(), rate=100.0, num_requests=2000, workload=Workload(256, 128),
                   slo=Slo(5.0))
    assert res.completed == 2000
    assert time.perf_counter() - t0 < 3.0


# -- max_rate_under_slo -------------------------------------------------------------------------------------------
def test_max_rate_under_slo():
    plan = make_plan([(FAST, 4), (SLOW, 4)])
    kw = dict(num_requests=200, seed=0)
    sat = saturated_rate(plan, StubCost(), StubCluster(), Workload(64, 32))
    lone = simulate(plan, StubCost(), StubCluster(), rate=math.inf, num_requests=1, workload=Workload(64, 32),
                    slo=Slo()).latency_p50
    tight = max_rate_under_slo(plan, StubCost(), StubCluster(), Workload(64, 32), Slo(lone * 1.5), **kw)
    loose = max_rate_under_slo(plan, StubCost(), StubCluster(), Workload(64, 32), Slo(lone * 4), **kw)
    assert 0 < tight < loose <= sat
    res = simulate(plan, StubCost(), StubCluster(), rate=tight, workload=Workload(64, 32), slo=Slo(lone * 1.5),
                   **kw)
    assert res.slo_attainment >= 0.9
    assert max_rate_under_slo(plan, StubCost(), StubCluster(), Workload(64, 32), Slo(lone * 0.5), **kw) == 0.0
    assert max_rate_under_slo(plan, StubCost(), StubCluster(), Workload(64, 32), Slo(1e9), **kw) == sat


def test_saturated_rate_meets_the_bottleneck_bound():
    # equal linear stages: the bottleneck stage works layers * 1e-3 s per token, prompt + output - 1 tokens each
    # (decode-heavy, so micro-batches are of similar size; prefill chunks next to decode-only micro-batches
    # leave bubbles, as with the engine's scheduler)
    plan = make_plan([(LINEAR, 2)] * 3)
    bound = 1 / (2 * 1e-3 * (1 + 64 - 1))
    sat = saturated_rate(plan, StubCost(), StubCluster(), Workload(1, 64))
    assert 0.9 * bound <= sat <= bound * 1.0001
    single = saturated_rate(plan, StubCost(), StubCluster(), Workload(1, 64), micro_batches=False)
    assert single == pytest.approx(sat / 3, rel=0.1)
    prefill_heavy = saturated_rate(plan, StubCost(), StubCluster(), Workload(512, 32))
    assert prefill_heavy <= 1 / (2 * 1e-3 * (512 + 32 - 1)) * 1.0001


# -- validation ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    (dict(rate=0.0), "rate"), (dict(rate=-1.0), "rate"), (dict(num_requests=0), "num_requests"),
    (dict(workload=[]), "workload"), (dict(workload=[(0, 4)]), "workload[0]"),
    (dict(workload=[(4, 4, 4)]), "workload[0]"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    args = dict(rate=1.0, num_requests=1, workload=Workload(), slo=Slo())
    args.update(kwargs)
    with pytest.raises(ConfigError, match=field.replace("[", r"\[")):
        simulate(make_plan([(FAST, 1)]), StubCost(), StubCluster(), **args)


def test_bad_config_and_plan():
    with pytest.raises(ConfigError, match="block_size"):
        SimConfig(block_size=0)
    with pytest.raises(ConfigError, match="max_num_seqs"):
        SimConfig(max_num_seqs=0)
    with pytest.raises(ConfigError, match="slo_attainment"):
        SimResult(1, 1.0, 1.0, 0, 0, 0, 0, 0, 0, 1.5)
    with pytest.raises(ConfigError, match="KV capacity"):
        simulate(make_plan([(FAST, 1, 8)]), StubCost(), StubCluster(), rate=1.0, num_requests=1,
                 workload=Workload(), slo=Slo())
    with pytest.raises(ConfigError, match="replicas"):
        simulate(Plan(()), StubCost(), StubCluster(), rate=1.0, num_requests=1, workload=Workload(), slo=Slo())
    with pytest.raises(ConfigError, match="attainment"):
        max_rate_under_slo(make_plan([(FAST, 1)]), StubCost(), StubCluster(), Workload(), Slo(), attainment=0)


def test_percentile():
    assert percentile([], 50) == 0.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 99) == pytest.approx(1.99)


# -- bin/hexgen simulate -----------------------------------------------------------------------------------------
def test_cli_explicit_layout_json(capsys):
    import json

    from hexgen.cli.simulate import main
    rc = main(["--preset", "tiny", "--hetero-config", "1", "1", "--gpu", "H100", "--num-requests", "40",
               "--rate", "50", "--prompt-len", "32:256", "--output-len", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["plan"]["replicas"][0]["hetero_config"] == [1, 1]
    assert out["result"]["completed"] == 40 and 0 <= out["result"]["slo_attainment"] <= 1


def test_cli_cluster_table(tmp_path, capsys):
    from hexgen.cli.simulate import main
    path = tmp_path / "c.toml"
    path.write_text('[[nodes]]\nname = "a"\ngpu = "A6000"\ncount = 2\n')
    rc = main(["--preset", "tiny", "--cluster", str(path), "--num-requests", "30", "--time-budget", "1",
               "--max-rate"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "SLO attainment" in out or "within the latency bound" in out
    assert "max rate" in out


@pytest.mark.parametrize("argv, field", [
    (["--preset", "tiny", "--hetero-config", "1", "1"], "--gpu"),
    (["--preset", "tiny", "--hetero-config", "1", "--gpu", "H100", "--cluster", "x.toml"], "--cluster"),
    (["--preset", "tiny", "--hetero-config", "1", "--gpu", "H100", "--rate", "0"], "rate"),
])
def test_cli_errors(argv, field, capsys):
    from hexgen.cli.simulate import main
    assert main(argv) == 2
    assert field in capsys.readouterr().err
