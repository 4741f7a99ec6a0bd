"""The simulator re-ranking of layer splits (hexgen/planner/refine.py)."""
from __future__ import annotations

import random

import pytest

from hexgen.config import PRESETS
from hexgen.planner.cluster import cluster_from_dict
from hexgen.planner.costmodel import CostModel
from hexgen.planner.plans import Slo, Workload
from hexgen.planner.refine import _blend, candidates, prefill_split, refine_splits, simulated_rate
from hexgen.planner.replica import Evaluator

# Two H200s, one cut to a third of its compute and 80 GiB (config/clusters/h200x2-emulated.toml)
UNEQUAL = {
    "network": {"bandwidth_gbps": 2880, "latency_us": 5},
    "devices": {"H200-40SM": {"base": "H200", "memory_gib": 80, "peak_tflops": 300, "mem_bandwidth_gbs": 2900}},
    "nodes": [{"name": "gpu0", "gpu": "H200", "count": 1}, {"name": "gpu1", "gpu": "H200-40SM", "count": 1}],
}


@pytest.fixture
def unequal():
    cluster = cluster_from_dict(UNEQUAL)
    ev = Evaluator(cluster, CostModel(PRESETS["llama-2-70b"]), Workload(288, 144, 128), 0.0)
    return cluster, ev


@pytest.mark.parametrize("key", [((0, 1), (1, 1)), ((1, 1), (0, 1))])
def test_refined_split_is_no_worse_simulated_and_within_tolerance(unequal, key):
    _, ev = unequal
    searched = ev.best(key)
    (_, chosen), = refine_splits(ev, [(key, searched)], Slo(0.0))
    assert sum(chosen.layers) == 80 and min(chosen.layers) >= 1
    assert chosen.rate >= 0.95 * searched.rate
    assert simulated_rate(ev, key, chosen, Slo(0.0)) >= simulated_rate(ev, key, searched, Slo(0.0))
    # it is the best of its candidates by simulated rate
    best = max(simulated_rate(ev, key, c, Slo(0.0)) for c in candidates(ev, key, searched)
               if c.rate >= 0.95 * searched.rate)
    assert simulated_rate(ev, key, chosen, Slo(0.0)) == pytest.approx(best)


def test_prefill_split_gives_the_compute_weak_card_fewer_layers(unequal):
    _, ev = unequal
    weak_first = prefill_split(ev, ((1, 1), (0, 1)))
    strong_first = prefill_split(ev, ((0, 1), (1, 1)))
    assert weak_first[0] < 40 and strong_first[0] > 40
    assert sum(weak_first) == sum(strong_first) == 80


def test_fixed_rate_objective_is_left_alone(unequal):
    _, ev = unequal
    key = ((0, 1), (1, 1))
    searched = ev.best(key)
    assert refine_splits(ev, [(key, searched)], Slo(0.0, rate=1.0)) == [(key, searched)]


def test_single_stage_replicas_are_left_alone(unequal):
    _, ev = unequal
    key = ((0, 1),)
    e = ev.best(key)
    if e is not None:
        assert refine_splits(ev, [(key, e)], Slo(0.0)) == [(key, e)]


def test_blend_keeps_the_total_and_at_least_one_layer():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(2, 6)
        total = rng.randint(n, 120)

        def split():
            cuts = sorted(rng.sample(range(1, total), n - 1))
            return [b - a for a, b in zip([0] + cuts, cuts + [total])]
        x, y = split(), split()
        for t in (0.0, 0.25, 0.5, 0.75, 1.0):
            out = _blend(x, y, t, total)
            assert sum(out) == total and min(out) >= 1
        assert _blend(x, y, 0.0, total) == tuple(x) and _blend(x, y, 1.0, total) == tuple(y)
