"""Symmetric layouts, the baseline the planner is compared with.

A symmetric layout ignores heterogeneity: every stage has the same TP degree ``t``, every pipeline has the same
``P`` stages with equal layer splits, and replicas are identical layouts. Pure TP (one stage over the whole
cluster) and pure PP (one GPU per stage over the whole cluster) are its extremes. TP groups still stay inside
one node. Groups are dealt into replicas in two orders (node order; larger memory first) and the replicas that
fit are kept; the best (t, P) is ``best_symmetric``.
"""

from __future__ import annotations

from dataclasses import dataclass

from hexgen.config import valid_tp_degrees
from hexgen.planner.cluster import Cluster
from hexgen.planner.costmodel import CostModel
from hexgen.planner.partition import State, canonical
from hexgen.planner.planbuild import assemble, plan_score, plan_score_of
from hexgen.planner.plans import Plan, Slo, Workload
from hexgen.planner.replica import Evaluator, Key, equal_split, rank_budget

GiB = float(1 << 30)


@dataclass(frozen=True)
class SymmetricOption:
    """One symmetric layout: its TP degree, stages per pipeline, and the plan of the replicas that fit (None and
    a reason when none does)."""

    name: str
    tp: int
    pp: int
    plan: Plan | None
    reason: str = ""  # why it is not allowed or does not fit; "" when it fits


def explain(ev: Evaluator, key: Key, layers: tuple[int, ...]) -> str:
    """Why the replica ``key`` with ``layers`` does not fit or misses the SLO ("" when it is fine)."""
    slots = ev.slots(key)
    seq = ev.costs.workload.seq_len
    last = len(key) - 1
    for i, (slot, n) in enumerate(zip(slots, layers)):
        first, is_last = i == 0, i == last
        if ev.costs.kv_tokens(slot, n, first, is_last) < seq:
            need = ev.costs.memory(slot, n, seq, first, is_last)
            node = ev.cluster.nodes[key[i][0]].name
            return (
                f"does not fit: stage {i} ({n} layers at TP {slot.tp} on {slot.dev.name}, node {node}) needs "
                f"{need / GiB:.1f} GiB per GPU for weights, workspace and one request's KV; "
                f"{rank_budget(slot.dev) / GiB:.1f} GiB usable of {slot.dev.memory_bytes / GiB:.1f} GiB"
            )
    if ev.fixed(key, layers) is None:
        loose = Evaluator(ev.cluster, ev.costs.cost, ev.costs.workload, 0.0).fixed(key, layers)
        lat = loose.latency_fn(1) if loose is not None else float("nan")
        return f"misses the latency SLO of {ev.slo_latency:g} s ({lat:.2f} s for one request)"
    return ""


def _groups(ev: Evaluator, tp: int, by_memory: bool) -> list[tuple[int, int]]:
    nodes = ev.cluster.nodes
    order = (
        sorted(range(len(nodes)), key=lambda i: (-nodes[i].device.memory_bytes, i)) if by_memory else range(len(nodes))
    )
    return [(ni, tp) for ni in order for _ in range(nodes[ni].count // tp)]


def _family(ev: Evaluator, tp: int, pp: int, slo: Slo) -> tuple[Plan | None, str]:
    layers = equal_split(ev.num_layers, pp)
    best: Plan | None = None
    reason = ""
    for by_memory in (False, True):
        groups = _groups(ev, tp, by_memory)
        reps = [tuple(groups[r * pp : (r + 1) * pp]) for r in range(len(groups) // pp)]
        fit = [(k, ev.fixed(k, layers)) for k in reps]
        good = [(k, e) for k, e in fit if e is not None]
        if not good:
            reason = reason or (explain(ev, reps[0], layers) if reps else "not enough GPUs")
            continue
        plan = assemble(ev, good, slo, 0.0, name=f"TP {tp} x PP {pp}, {len(good)} replica(s)")
        if best is None or plan_score([e for _, e in good], slo) > _score(ev, best, slo):
            best = plan
    return best, ("" if best is not None else reason)


def _score(ev: Evaluator, plan: Plan, slo: Slo) -> float:
    return plan_score_of(plan, ev, slo)


def symmetric_options(
    cluster: Cluster, cost: CostModel, workload: Workload, slo: Slo, *, evaluator: Evaluator | None = None
) -> list[SymmetricOption]:
    """Pure TP and pure PP over the whole cluster, then every uniform TP x PP family with at least one
    replica's worth of GPUs."""
    ev = evaluator or Evaluator(cluster, cost, workload, slo.latency_s)
    n_gpus, n_layers = cluster.num_gpus, cost.model.num_layers
    valid = valid_tp_degrees(cost.model, 1 << 16)
    out = []
    biggest = max(n.count for n in cluster.nodes)
    if n_gpus not in valid:
        out.append(
            SymmetricOption(
                "pure TP",
                n_gpus,
                1,
                None,
                f"TP {n_gpus} is not a valid degree for the model (valid: {', '.join(map(str, valid))})",
            )
        )
    elif n_gpus > biggest:
        out.append(
            SymmetricOption(
                "pure TP",
                n_gpus,
                1,
                None,
                f"TP {n_gpus} would span {len(cluster.nodes)} nodes; a TP group stays inside one node",
            )
        )
    else:
        plan, why = _family(ev, n_gpus, 1, slo)
        out.append(SymmetricOption("pure TP", n_gpus, 1, plan, why))
    if n_gpus > n_layers:
        out.append(SymmetricOption("pure PP", 1, n_gpus, None, f"{n_gpus} stages but only {n_layers} layers"))
    else:
        plan, why = _family(ev, 1, n_gpus, slo)
        out.append(SymmetricOption("pure PP", 1, n_gpus, plan, why))
    for tp in valid:
        if tp > biggest:
            break
        groups = sum(n.count // tp for n in cluster.nodes)
        for pp in range(1, min(groups, n_layers) + 1):
            plan, why = _family(ev, tp, pp, slo)
            out.append(SymmetricOption(f"TP {tp} x PP {pp}", tp, pp, plan, why))
    return out


def best_symmetric(
    cluster: Cluster, cost: CostModel, workload: Workload, slo: Slo, *, evaluator: Evaluator | None = None
) -> Plan | None:
    """The best symmetric layout that fits (pure TP, pure PP or uniform TP x PP with equal layer splits,
    replicas of identical layouts), under the same objective as the search; None if none fits."""
    ev = evaluator or Evaluator(cluster, cost, workload, slo.latency_s)
    plans = [o.plan for o in symmetric_options(cluster, cost, workload, slo, evaluator=ev) if o.plan is not None]
    if not plans:
        return None
    return max(plans, key=lambda p: (_score(ev, p, slo), -p.num_gpus))


def symmetric_states(ev: Evaluator, slo: Slo, limit: int = 4) -> list[State]:
    """Search starting points: the best few symmetric layouts as states."""
    c = ev.cluster
    plans = [
        o.plan for o in symmetric_options(c, ev.costs.cost, ev.costs.workload, slo, evaluator=ev) if o.plan is not None
    ]
    plans.sort(key=lambda p: -_score(ev, p, slo))
    index = {n.name: i for i, n in enumerate(c.nodes)}
    return [canonical([[(index[s.node], s.tp) for s in r.stages] for r in p.replicas]) for p in plans[:limit]]
