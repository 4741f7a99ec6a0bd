"""Layout search: partition a cluster's GPUs into replicas and stages, choose TP degrees and layer splits.

Three levels (docs/planner.md, "Search", explains them):

1. per replica (``replica.best_split``): for an ordered sequence of TP groups, the layer split that minimises
   the bottleneck stage's work while every stage holds its weights plus a KV reserve, tried for several
   reserves; the replica's operating point (largest batch within KV and the SLO, its rate and latency);
2. per plan: the sum of replica rates (or, with ``Slo.rate``, the latency at that rate);
3. over plans (``partition.anneal``): seeded simulated annealing over TP groupings, replica membership and stage
   order, from greedy starts and from the best symmetric layout, within an iteration cap and a time budget.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from hexgen.config import valid_tp_degrees
from hexgen.errors import ConfigError
from hexgen.planner.cluster import Cluster, Gpu
from hexgen.planner.costmodel import CostModel
from hexgen.planner.partition import State, anneal, greedy_states
from hexgen.planner.planbuild import (
    assemble,
    model_weight_bytes,
    plan_score,
    plan_score_of,
)
from hexgen.planner.plans import (
    Plan,
    PlannerError,
    ReplicaPlan,
    Slo,
    StagePlan,
    Workload,
)
from hexgen.planner.refine import refine_splits
from hexgen.planner.replica import Eval, Evaluator, Key, rank_budget
from hexgen.planner.symmetric import best_symmetric, symmetric_options, symmetric_states

__all__ = [
    "Plan",
    "PlannerError",
    "ReplicaPlan",
    "Slo",
    "StagePlan",
    "Workload",
    "best_symmetric",
    "evaluate_replica",
    "plan_cluster",
    "symmetric_options",
]

GiB = float(1 << 30)


def node_degrees(cluster: Cluster, cost: CostModel) -> list[list[int]]:
    """TP degrees each node can host: valid for the model and at most the node's GPU count."""
    valid = valid_tp_degrees(cost.model, 1 << 16)
    return [[d for d in valid if d <= n.count] for n in cluster.nodes]


def _state_replicas(ev: Evaluator, state: State) -> list[tuple[Key, Eval]]:
    out = []
    for key in state:
        e = ev.best(key)
        if e is not None:
            out.append((key, e))
    # the most capable replicas first, so their GPUs get the lowest indices
    return sorted(out, key=lambda ke: (-ke[1].rate, ke[0]))


def _nothing_fits(cluster: Cluster, cost: CostModel, ev: Evaluator, starts: Sequence[State]) -> PlannerError:
    weights = model_weight_bytes(cost)
    total = sum(n.count * n.device.memory_bytes for n in cluster.nodes)
    usable = sum(n.count * rank_budget(n.device) for n in cluster.nodes)
    per_param = f"{cost.dtype_bytes} bytes per parameter"
    if cost.model.quantization == "fp8":
        per_param = f"1 byte per linear-layer parameter (fp8), {cost.dtype_bytes} for the rest"
    msg = (
        f"nothing fits: the model's weights are {weights / GiB:.1f} GiB at {per_param}; "
        f"the cluster has {total / GiB:.1f} GiB on {cluster.num_gpus} GPUs "
        f"({usable / GiB:.1f} GiB usable at the engine's memory fraction)"
    )
    if ev.slo_latency > 0:
        loose = Evaluator(cluster, cost, ev.costs.workload, 0.0)
        lats = [e.latency_fn(1) for s in starts for e in (loose.best(k) for k in s) if e is not None]
        if lats:
            msg = (
                f"no layout meets the latency SLO of {ev.slo_latency:g} s: the fastest pipeline found needs "
                f"{min(lats):.2f} s for one request of {ev.costs.workload.prompt_len}+"
                f"{ev.costs.workload.output_len} tokens; relax --slo-latency or shorten the workload"
            )
    return PlannerError(msg)


def plan_cluster(
    cluster: Cluster,
    cost: CostModel,
    workload: Workload,
    slo: Slo,
    *,
    time_budget_s: float = 30.0,
    seed: int = 0,
    max_iters: int | None = None,
) -> Plan:
    """The best plan the search finds for ``cluster``; PlannerError when nothing fits.

    Deterministic for a given ``seed`` as long as ``max_iters`` (default: scaled with the cluster size) or the
    patience limit stops the search before ``time_budget_s``. The result is never worse, under the cost model,
    than ``best_symmetric``.
    """
    if not isinstance(time_budget_s, (int, float)) or isinstance(time_budget_s, bool) or time_budget_s <= 0:
        raise ConfigError(f"time_budget_s: {time_budget_s!r} must be a number > 0")
    t_start = time.monotonic()
    ev = Evaluator(cluster, cost, workload, slo.latency_s)
    counts = [n.count for n in cluster.nodes]
    degrees = node_degrees(cluster, cost)
    weights = model_weight_bytes(cost)

    def group_mem(stage: tuple[int, int]) -> float:
        return stage[1] * float(cluster.nodes[stage[0]].device.memory_bytes)

    def score(state: State) -> float:
        return plan_score([ev.best(k) for k in state], slo)

    starts = greedy_states(counts, degrees, group_mem, weights) + symmetric_states(ev, slo)
    n_gpus = cluster.num_gpus
    iters = max_iters if max_iters is not None else 3000 + 150 * n_gpus
    best, best_v, _ = anneal(
        starts,
        score,
        random.Random(seed),
        counts,
        degrees,
        cost.model.num_layers,
        max_iters=iters,
        deadline=t_start + time_budget_s,
        patience=max(1500, iters // 3),
    )
    replicas = _state_replicas(ev, best)
    if not replicas:
        raise _nothing_fits(cluster, cost, ev, starts)
    replicas = refine_splits(ev, replicas, slo, deadline=t_start + time_budget_s)
    plan = assemble(ev, replicas, slo, 0.0)
    sym = best_symmetric(cluster, cost, workload, slo, evaluator=ev)
    if sym is not None and plan_score_of(sym, ev, slo) > plan_score_of(plan, ev, slo):
        plan = sym
    return Plan(plan.replicas, plan.unused, plan.rate, time.monotonic() - t_start, plan.latency_s, plan.name)


def evaluate_replica(
    stages: Sequence[tuple[tuple[Gpu, ...], int]], cluster: Cluster, cost: CostModel, workload: Workload, slo: Slo
) -> ReplicaPlan | None:
    """Predict one fully specified replica: ``stages`` are (TP group, layer count) in pipeline order. None when
    it does not fit in memory or cannot meet the SLO; ConfigError for an invalid layout."""
    if not stages:
        raise ConfigError("stages: a replica needs at least one stage")
    index = {n.name: i for i, n in enumerate(cluster.nodes)}
    valid = valid_tp_degrees(cost.model, 1 << 16)
    key, layers = [], []
    for i, (gpus, n) in enumerate(stages):
        if not gpus or len({g.node for g in gpus}) != 1 or gpus[0].node not in index:
            raise ConfigError(f"stages[{i}].gpus: a TP group needs GPUs of one node of the cluster")
        if len(set(gpus)) != len(gpus) or len(gpus) not in valid:
            raise ConfigError(
                f"stages[{i}].gpus: TP degree {len(gpus)} (distinct GPUs) must be one of {', '.join(map(str, valid))}"
            )
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"stages[{i}].layers: {n!r} must be an integer ≥ 1")
        key.append((index[gpus[0].node], len(gpus)))
        layers.append(n)
    if sum(layers) != cost.model.num_layers:
        raise ConfigError(f"stages: layer counts sum to {sum(layers)} but the model has {cost.model.num_layers}")
    ev = Evaluator(cluster, cost, workload, slo.latency_s)
    e = ev.fixed(tuple(key), tuple(layers))
    if e is None:
        return None
    rp = assemble(ev, [(tuple(key), e)], Slo(slo.latency_s), 0.0).replicas[0]
    fixed = tuple(
        StagePlan(tuple(g), s.layers, s.layer_start, s.memory_bytes, s.kv_tokens)
        for (g, _), s in zip(stages, rp.stages)
    )
    return ReplicaPlan(fixed, rp.max_batch, rp.rate, rp.latency_s, rp.decode_step_s)
