"""The planner with uneven TP stages (hexgen/planner/uneven.py, uneven_plan.py): per-rank shapes as the layers
shard, ratios chosen from the devices' speeds, the plan printing its ratio, per-rank memory and step time
and why it won, the deployment file carrying tp_ratio, and the simulator predicting an uneven layout."""
from __future__ import annotations

import os

import pytest

from hexgen import shards
from hexgen.cli.plan import main as plan_main
from hexgen.cli.simulate import main as simulate_main
from hexgen.config import Layout, preset
from hexgen.planner.cluster import cluster_from_dict, load_cluster
from hexgen.planner.costmodel import CostModel
from hexgen.planner.devices import device_spec
from hexgen.planner.search import Slo, Workload, plan_cluster
from hexgen.planner.simulator import simulate
from hexgen.planner.uneven import best_option, ideal_shares, stage_options
from hexgen.planner.uneven_plan import evaluate_layout
from hexgen.wire.settings import load_settings

EMULATED = os.path.join(os.path.dirname(os.path.dirname(__file__)), "config", "clusters", "h200x2-emulated.toml")


def test_rank_shape_follows_the_shards():
    cost = CostModel(preset("llama-3.1-8b"))
    assert cost.rank_shape(2) == (16, 4, 7168)
    assert cost.rank_shape(2, (3, 1), 0) == (24, 6, shards.mlp_sizes(14336, 2, (3, 1))[0])
    assert cost.rank_shape(2, (3, 1), 1) == (8, 2, 3584)
    even = cost.shape_params(cost.rank_shape(2))
    assert cost.shape_params(cost.rank_shape(2, (1, 1), 0)) == even == cost.layer_params(2)


def _options(devs, layers=32):
    cost = CostModel(preset("llama-3.1-8b"))
    link = load_cluster(EMULATED).inter
    return cost, stage_options(cost, devs, link, layers, True, True, 64, 64 * 576, 512, 256)


def test_equal_gpus_keep_the_even_split():
    h100 = device_spec("H100")
    _, options = _options([h100, h100])
    best = best_option(options)
    assert best is not None and best.shares == ()
    assert {o.ratio for o in options} == {"even", "7:1", "3:1", "5:3", "3:5", "1:3", "1:7"}


def test_unequal_gpus_give_the_faster_one_the_larger_share():
    cluster = load_cluster(EMULATED)
    devs = [n.device for n in cluster.nodes]  # H200, H200 on 40 SMs with 80 GiB
    cost, options = _options(devs)
    best = best_option(options)
    even = next(o for o in options if not o.shares)
    assert best.shares and best.shares[0] > best.shares[1]
    assert best.decode_s < even.decode_s
    fast, slow = even.ranks
    assert slow.decode_s > fast.decode_s  # even shards wait on the cut-down card
    ideal = ideal_shares(cost, devs, 64, 64 * 576)
    assert ideal[0] > 0.5 and abs(sum(ideal) - 1) < 1e-9


def test_plan_picks_uneven_tp_where_the_model_needs_both_cards(tmp_path, capsys):
    """Llama-3.1-70B (bf16, 141 GB) fits neither card alone: the uneven TP group beats two stages."""
    out = str(tmp_path / "deploy.toml")
    assert plan_main(["--cluster", EMULATED, "--preset", "llama-3.1-70b", "--time-budget", "3", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "tp-ratio 3:1" in text
    assert "rank 0: gpu0:0 H200, share 3," in text and "rank 1: gpu1:0 H200-40SM, share 1," in text
    assert "decode step" in text and "beats even: decode step" in text
    assert "beats planned (separate stages)" in text
    settings = load_settings(out)
    assert settings.pipelines[0].tp_ratio == ((3, 1),)
    assert settings.pipelines[0].devices == ("cuda:0", "cuda:1")


def test_plan_keeps_separate_replicas_when_one_card_holds_the_model(capsys):
    assert plan_main(["--cluster", EMULATED, "--preset", "llama-3.1-8b", "--time-budget", "2"]) == 0
    text = capsys.readouterr().out
    assert "tp-ratio" not in text.split("uneven TP")[0]  # the plan itself is even
    assert "beats uneven TP 2 at" in text


def test_no_uneven_candidate_on_equal_gpus_or_over_a_network():
    cost = CostModel(preset("llama-3.1-70b"))
    equal = cluster_from_dict({"nodes": [{"name": "n", "gpu": "H100", "count": 2}]})
    plan = plan_cluster(equal, cost, Workload(), Slo(), time_budget_s=2)
    assert not plan.notes and all(not s.tp_ratio for r in plan.replicas for s in r.stages)
    apart = cluster_from_dict({"nodes": [{"name": "a", "gpu": "H200", "count": 1},
                                         {"name": "b", "gpu": "H100", "count": 1}]})  # 10 GbE between
    plan = plan_cluster(apart, cost, Workload(), Slo(), time_budget_s=2)
    assert not plan.notes


def test_simulator_predicts_an_uneven_layout(capsys):
    cluster = load_cluster(EMULATED)
    cost = CostModel(preset("llama-3.1-70b"))
    plan = plan_cluster(cluster, cost, Workload(), Slo(), time_budget_s=2)
    assert plan.replicas[0].stages[0].tp_ratio == (3, 1)
    res = simulate(plan, cost, cluster, rate=float("inf"), num_requests=50, workload=Workload(), slo=Slo())
    assert res.completed == 50 and res.throughput_rps > 0
    assert simulate_main(["--preset", "llama-3.1-8b", "--hetero-config", "2", "--tp-ratio", "3:1", "--gpu", "H100",
                          "--num-requests", "20"]) == 0
    out = capsys.readouterr().out
    assert "tp-ratio 3:1" in out and "20/20 completed" in out


def test_explicit_uneven_layout_on_equal_gpus_is_slower_than_even():
    cost = CostModel(preset("llama-3.1-8b"))
    cluster = cluster_from_dict({"nodes": [{"name": "n", "gpu": "H100", "count": 2}]})
    uneven = evaluate_layout(cluster, cost, Workload(), Slo(), Layout.build(cost.model, [2], None, ["3:1"]))
    even = evaluate_layout(cluster, cost, Workload(), Slo(), Layout.build(cost.model, [2]))
    assert uneven is not None and even is not None
    assert uneven.decode_step_s > even.decode_step_s
    assert len(uneven.stages[0].rank_memory_bytes) == 2
    assert uneven.stages[0].rank_memory_bytes[0] > uneven.stages[0].rank_memory_bytes[1]


@pytest.mark.parametrize("ratio", [(3, 1), (1, 3)])
def test_uneven_group_capacity_is_the_least_rank(ratio):
    from hexgen.planner.uneven import group_kv_tokens

    cost = CostModel(preset("llama-3.1-8b"))
    h100 = device_spec("H100")
    both = group_kv_tokens(cost, [h100, h100], ratio, 32, True, True, 256)
    even = group_kv_tokens(cost, [h100, h100], (), 32, True, True, 256)
    assert 0 < both < even  # the larger shard's rank holds fewer tokens than either even rank
