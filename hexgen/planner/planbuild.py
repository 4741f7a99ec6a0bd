"""Turning evaluated replicas into a Plan, and scoring plans (shared by the search and the symmetric baseline)."""

from __future__ import annotations

from collections.abc import Sequence

from hexgen.planner.cluster import Gpu
from hexgen.planner.costmodel import CostModel
from hexgen.planner.plans import Plan, ReplicaPlan, Slo, StagePlan
from hexgen.planner.replica import Eval, Evaluator, Key


def model_weight_bytes(cost: CostModel) -> int:
    """Bytes of the whole model's weights at the cost model's dtype."""
    return cost.model.num_layers * cost.layer_weight_bytes(1) + cost.embed_bytes()


def plan_score(evals: Sequence[Eval | None], slo: Slo) -> float:
    """Higher is better. Max-rate mode: total rate. Rate mode: capacity short of ``slo.rate`` (negative), else
    1 / (mean latency at that rate)."""
    good = [e for e in evals if e is not None]
    cap = sum(e.rate for e in good)
    if slo.rate <= 0:
        return cap
    if cap < slo.rate:
        return cap - slo.rate
    return 1.0 / plan_latency(good, slo.rate)


def plan_latency(evals: Sequence[Eval], rate: float) -> float:
    """Request-weighted mean latency when ``rate`` is spread over the replicas in proportion to capacity."""
    cap = sum(e.rate for e in evals)
    if cap <= 0:
        return 0.0
    total = 0.0
    for e in evals:
        share = rate * e.rate / cap
        lat = e.latency_at(share) if share > 0 else e.latency_s
        total += share * (lat if lat is not None else e.latency_s)
    return total / rate if rate > 0 else 0.0


def assemble(
    ev: Evaluator, replicas: Sequence[tuple[Key, Eval]], slo: Slo, search_s: float, name: str = "planned"
) -> Plan:
    """A Plan from evaluated replica keys: GPU indices handed out node by node in replica order."""
    cluster = ev.cluster
    nxt = {n.name: 0 for n in cluster.nodes}
    out = []
    for key, e in replicas:
        stages, start = [], 0
        last = len(key) - 1
        for i, ((ni, tp), layers) in enumerate(zip(key, e.layers)):
            node = cluster.nodes[ni]
            gpus = tuple(Gpu(node.name, nxt[node.name] + j, node.device) for j in range(tp))
            nxt[node.name] += tp
            mem = ev.costs.memory(ev.slots(key)[i], layers, e.kv_tokens[i], i == 0, i == last)
            stages.append(StagePlan(gpus, layers, start, mem, e.kv_tokens[i]))
            start += layers
        out.append(ReplicaPlan(tuple(stages), e.max_batch, e.rate, e.latency_s, e.decode_step_s))
    unused = tuple(Gpu(n.name, i, n.device) for n in cluster.nodes for i in range(nxt[n.name], n.count))
    evals = [e for _, e in replicas]
    rate = sum(e.rate for e in evals)
    if slo.rate > 0:
        latency = plan_latency(evals, slo.rate) if rate >= slo.rate else 0.0
    else:
        latency = sum(e.rate * e.latency_s for e in evals) / rate if rate > 0 else 0.0
    return Plan(tuple(out), unused, rate, search_s, latency, name)


def plan_score_of(plan: Plan, ev: Evaluator, slo: Slo) -> float:
    """``plan_score`` of an assembled plan (its replicas re-evaluated from their node/TP/layer layout)."""
    index = {n.name: i for i, n in enumerate(ev.cluster.nodes)}
    evals = []
    for r in plan.replicas:
        key = tuple((index[s.node], s.tp) for s in r.stages)
        evals.append(ev.fixed(key, r.pp_partition))
    return plan_score(evals, slo)
