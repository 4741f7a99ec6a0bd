"""Planner search: validity, memory fit, no worse than symmetric, the HexGen case study, errors."""
from __future__ import annotations

import os
import random

import pytest

from hexgen.config import PRESETS, ModelConfig, valid_tp_degrees
from hexgen.errors import ConfigError
from hexgen.planner.cluster import cluster_from_dict, load_cluster
from hexgen.planner.costmodel import GPU_RUNTIME_BYTES, CostModel
from hexgen.planner.planbuild import plan_score_of
from hexgen.planner.replica import MAX_TOKENS, MEMORY_FRACTION, Evaluator
from hexgen.planner.search import (Plan, PlannerError, Slo, Workload, best_symmetric, evaluate_replica,
                                   plan_cluster, symmetric_options)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE_STUDY = {  # config/clusters/hexgen-case-study.toml
    "network": {"bandwidth_gbps": 9, "latency_us": 50},
    "nodes": [
        {"name": "a6000-box", "gpu": "A6000", "count": 4, "link_bandwidth_gbs": 25, "link_latency_us": 10},
        {"name": "a5000-box", "gpu": "A5000", "count": 2, "link_bandwidth_gbs": 25, "link_latency_us": 10},
        {"name": "a4000-box", "gpu": "A4000", "count": 2, "link_bandwidth_gbs": 25, "link_latency_us": 10},
    ],
}
GPU_TYPES = ("H100", "A100-40GB", "A100-80GB", "A6000", "A5000", "A4000", "L40S", "L4", "RTX4090", "T4", "V100")
SMALL_MODELS = {
    "llama-2-7b": PRESETS["llama-2-7b"],
    "llama-2-13b": PRESETS["llama-2-13b"],
    "gqa-3b": ModelConfig(vocab_size=32000, hidden_size=3072, intermediate_size=8192, num_layers=26,
                          num_heads=24, num_kv_heads=8),
}


def check_plan(plan: Plan, cluster, cost: CostModel, workload: Workload) -> None:
    """Structure (TP groups in one node and type, disjoint GPUs, layers cover the model, valid TP) and fit."""
    valid = valid_tp_degrees(cost.model, 1 << 16)
    seen = set(plan.unused)
    assert len(seen) == len(plan.unused)
    for r in plan.replicas:
        start = 0
        for i, s in enumerate(r.stages):
            assert len({g.node for g in s.gpus}) == 1 and len({g.device for g in s.gpus}) == 1
            assert s.tp in valid
            assert s.layer_start == start and s.layers >= 1
            start += s.layers
            for g in s.gpus:
                assert g not in seen
                seen.add(g)
                assert 0 <= g.index < cluster.node(g.node).count
            first, last = i == 0, i == len(r.stages) - 1
            dev = s.gpus[0].device
            # what the engine allocates (weights + workspace + the whole KV cache) fits the device ...
            alloc = cost.stage_memory(s.tp, s.layers, s.kv_tokens, first, last, MAX_TOKENS, workload.max_batch)
            assert s.memory_bytes == alloc
            assert alloc + GPU_RUNTIME_BYTES <= dev.memory_bytes * MEMORY_FRACTION
            assert alloc <= dev.memory_bytes
            # ... and the KV cache holds the batch the plan relies on
            assert s.kv_tokens >= r.max_batch * workload.seq_len
        assert start == cost.model.num_layers
        assert r.max_batch >= 1 and r.rate > 0 and r.latency_s > 0
    assert seen == set(cluster.gpus())
    assert plan.rate == pytest.approx(sum(r.rate for r in plan.replicas))


@pytest.fixture
def case_study():
    return cluster_from_dict(CASE_STUDY), CostModel(PRESETS["llama-2-70b"])


def test_case_study_symmetric_pure_layouts_do_not_fit(case_study):
    cluster, cost = case_study
    opts = {o.name: o for o in symmetric_options(cluster, cost, Workload(), Slo())}
    assert opts["pure TP"].plan is None and "span" in opts["pure TP"].reason
    assert opts["pure PP"].plan is None and "does not fit" in opts["pure PP"].reason
    assert "A4000" in opts["pure PP"].reason


def test_case_study_plan_vs_best_symmetric(case_study):
    cluster, cost = case_study
    workload, slo = Workload(), Slo()
    plan = plan_cluster(cluster, cost, workload, slo, seed=0)
    check_plan(plan, cluster, cost, workload)
    sym = best_symmetric(cluster, cost, workload, slo)
    assert sym is not None and sym.name.startswith("TP 4 x PP 1")
    assert plan.rate >= sym.rate
    # KV-bound (long outputs, no latency bound): the slower cards join the A6000 pipeline and pay off
    workload, slo = Workload(1024, 1024), Slo(0.0)
    plan = plan_cluster(cluster, cost, workload, slo, seed=0)
    check_plan(plan, cluster, cost, workload)
    sym = best_symmetric(cluster, cost, workload, slo)
    assert plan.num_gpus >= 6 and plan.rate > 1.1 * sym.rate


def test_case_study_original_stage_sequence_gets_original_split(case_study):
    """TP 4 (A6000) -> TP 2 (A5000) -> TP 2 (A4000): the layer split comes out near HexGen's 48/20/12."""
    cluster, cost = case_study
    ev = Evaluator(cluster, cost, Workload(), 30.0)
    e = ev.best(((0, 4), (1, 2), (2, 2)))
    assert e is not None and sum(e.layers) == 80
    assert all(abs(a - b) <= 6 for a, b in zip(e.layers, (48, 20, 12)))


def random_cluster(rng: random.Random) -> dict:
    nodes = []
    for i in range(rng.randint(1, 4)):
        nodes.append({"name": f"n{i}", "gpu": rng.choice(GPU_TYPES), "count": rng.choice((1, 2, 3, 4, 8))})
    return {"network": {"bandwidth_gbps": rng.choice((10, 100, 400))}, "nodes": nodes}


@pytest.mark.parametrize("case", range(30))
def test_random_clusters_valid_fit_and_no_worse_than_symmetric(case):
    rng = random.Random(1000 + case)
    cluster = cluster_from_dict(random_cluster(rng))
    cost = CostModel(SMALL_MODELS[rng.choice(sorted(SMALL_MODELS))])
    workload = Workload(rng.choice((128, 512, 1024)), rng.choice((32, 128, 256)))
    slo = Slo(rng.choice((0.0, 10.0, 30.0)))
    sym = best_symmetric(cluster, cost, workload, slo)
    try:
        plan = plan_cluster(cluster, cost, workload, slo, seed=case, max_iters=300)
    except PlannerError as e:
        assert sym is None
        assert "GiB" in str(e) or "SLO" in str(e)
        return
    check_plan(plan, cluster, cost, workload)
    if sym is not None:
        check_plan(sym, cluster, cost, workload)
        ev = Evaluator(cluster, cost, workload, slo.latency_s)
        assert plan_score_of(plan, ev, slo) >= plan_score_of(sym, ev, slo) - 1e-9
        assert plan.rate >= sym.rate - 1e-9


def test_same_seed_same_plan(case_study):
    cluster, cost = case_study
    a = plan_cluster(cluster, cost, Workload(), Slo(), seed=3, max_iters=500)
    b = plan_cluster(cluster, cost, Workload(), Slo(), seed=3, max_iters=500)
    assert [(r.stages, r.max_batch) for r in a.replicas] == [(r.stages, r.max_batch) for r in b.replicas]


def test_rate_objective_lowest_latency_at_a_rate(case_study):
    cluster, cost = case_study
    plan = plan_cluster(cluster, cost, Workload(), Slo(latency_s=60.0, rate=1.0), max_iters=800)
    check_plan(plan, cluster, cost, Workload())
    assert plan.rate >= 1.0
    assert 0 < plan.latency_s <= max(r.latency_s for r in plan.replicas)


def test_nothing_fits_names_weights_and_memory():
    cluster = cluster_from_dict({"nodes": [{"name": "small", "gpu": "A4000", "count": 2}]})
    cost = CostModel(PRESETS["llama-2-70b"])
    with pytest.raises(PlannerError, match=r"weights are 12[0-9]\.\d GiB.*32\.0 GiB on 2 GPUs"):
        plan_cluster(cluster, cost, Workload(), Slo(), max_iters=100)
    assert best_symmetric(cluster, cost, Workload(), Slo()) is None


def test_unreachable_slo_is_a_planner_error(case_study):
    cluster, cost = case_study
    with pytest.raises(PlannerError, match="latency SLO of 0.01 s"):
        plan_cluster(cluster, cost, Workload(), Slo(latency_s=0.01), max_iters=100)


def test_evaluate_replica(case_study):
    cluster, cost = case_study
    g = cluster.gpus()
    rp = evaluate_replica([(tuple(g[0:4]), 48), (tuple(g[4:6]), 20), (tuple(g[6:8]), 12)], cluster, cost,
                          Workload(), Slo())
    assert rp is not None and rp.hetero_config == (4, 2, 2) and rp.pp_partition == (48, 20, 12)
    assert [s.gpus for s in rp.stages] == [tuple(g[0:4]), tuple(g[4:6]), tuple(g[6:8])]
    assert evaluate_replica([(tuple(g[6:8]), 80)], cluster, cost, Workload(), Slo()) is None  # 2x A4000
    with pytest.raises(ConfigError, match="one node"):
        evaluate_replica([(tuple(g[3:5]), 80)], cluster, cost, Workload(), Slo())
    with pytest.raises(ConfigError, match="sum to 79"):
        evaluate_replica([(tuple(g[0:4]), 79)], cluster, cost, Workload(), Slo())
    with pytest.raises(ConfigError, match="TP degree 3"):
        evaluate_replica([(tuple(g[0:3]), 80)], cluster, cost, Workload(), Slo())


def test_max_batch_caps_every_replica(case_study):
    """Workload.max_batch is the workers' --max-num-seqs: no replica plans more requests in flight."""
    cluster, cost = case_study
    workload, slo = Workload(1024, 1024, max_batch=8), Slo(0.0)
    plan = plan_cluster(cluster, cost, workload, slo, seed=0)
    check_plan(plan, cluster, cost, workload)
    assert all(1 <= r.max_batch <= 8 for r in plan.replicas)
    wide = plan_cluster(cluster, cost, Workload(1024, 1024), slo, seed=0)
    assert max(r.max_batch for r in wide.replicas) > 8


def test_bad_inputs_name_the_field(case_study):
    cluster, cost = case_study
    with pytest.raises(ConfigError, match="workload.prompt_len"):
        Workload(prompt_len=0)
    with pytest.raises(ConfigError, match="workload.max_batch"):
        Workload(max_batch=0)
    with pytest.raises(ConfigError, match="slo.latency_s"):
        Slo(latency_s=-1)
    with pytest.raises(ConfigError, match="time_budget_s"):
        plan_cluster(cluster, cost, Workload(), Slo(), time_budget_s=0)


def test_mixed_64_gpus_returns_a_valid_plan():
    path = os.path.join(ROOT, "config", "clusters", "mixed-64.toml")
    if not os.path.exists(path):
        pytest.skip("config/clusters/mixed-64.toml is not there")
    cluster = load_cluster(path)
    cost = CostModel(PRESETS["llama-2-70b"])
    plan = plan_cluster(cluster, cost, Workload(), Slo(), time_budget_s=30.0)
    check_plan(plan, cluster, cost, Workload())
    sym = best_symmetric(cluster, cost, Workload(), Slo())
    assert sym is not None and plan.rate >= sym.rate
