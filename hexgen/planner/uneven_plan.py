"""The planner's uneven candidate: one replica whose single TP stage spans unequal GPUs with a tp-ratio.

A TP group runs as one worker on one host, so the candidate is made only when the cluster's "nodes" are
GPUs of one machine: the link between them is NVLink-class (``SAME_HOST_BANDWIDTH``), as in
config/clusters/h200x2-emulated.toml, and the cluster mixes device types (on equal GPUs even shards are
already the best split). Every ratio the model allows (and the even split when it allows the degree) is
evaluated with the replica model of hexgen/planner/replica.py, the stage costed rank by rank
(hexgen/planner/uneven.py); the best is compared, by the plan score, with the plan of separate stages.
"""

from __future__ import annotations

from hexgen import shards
from hexgen.config import Layout
from hexgen.planner.cluster import GB, Cluster, Gpu
from hexgen.planner.costmodel import CostModel
from hexgen.planner.plans import Plan, ReplicaPlan, Slo, StagePlan, Workload
from hexgen.planner.replica import Costs, Eval, Evaluator, Slot, best_split, evaluate
from hexgen.planner.uneven import even_degrees, group_memory, ideal_shares, stage_option, why

SAME_HOST_BANDWIDTH = 100 * GB  # a link at least this fast joins GPUs of one host (NVLink, not a network)
MAX_GROUP = 8  # GPUs in one TP group at most


def group_gpus(ev: Evaluator) -> list[Gpu] | None:
    """Every GPU of the cluster, fastest device first, when they can form one uneven TP group; else None."""
    cluster = ev.cluster
    if len({n.device.name for n in cluster.nodes}) < 2 or cluster.inter.bandwidth < SAME_HOST_BANDWIDTH:
        return None
    nodes = sorted(cluster.nodes, key=lambda n: (-n.device.peak_flops, n.name))
    gpus = [Gpu(n.name, i, n.device) for n in nodes for i in range(n.count)]
    return gpus if 2 <= len(gpus) <= MAX_GROUP else None


def uneven_candidate(ev: Evaluator, slo: Slo) -> tuple[Plan, Eval] | None:
    """The best single-stage TP group over every GPU with a tp-ratio, as a Plan (name, per-rank figures and
    the notes saying why its ratio beat the even split), and its evaluation; None when it does not apply or
    nothing fits."""
    gpus = group_gpus(ev)
    if gpus is None:
        return None
    cost, costs, n_layers = ev.costs.cost, ev.costs, ev.num_layers
    m, w = cost.model, costs.workload
    devs = tuple(g.device for g in gpus)
    tp = len(devs)
    link = ev.cluster.inter if len({g.node for g in gpus}) > 1 else ev.cluster.nodes[0].intra
    ratios: list[tuple[int, ...]] = [()] if tp in even_degrees(cost) else []
    ratios += shards.valid_ratios(m.num_kv_heads, m.intermediate_size, tp)
    evals: list[tuple[tuple[int, ...], Eval]] = []
    for shares in ratios:
        slot = Slot(devs[0], tp, link, None, devs, shares)
        e = best_split([slot], costs, n_layers, slo.latency_s)
        if e is not None:
            evals.append((shares, e))
    if not evals:
        return None
    shares, best = max(evals, key=lambda se: (se[1].rate, -se[1].latency_s))
    batch = best.max_batch
    ctx = batch * (w.prompt_len + w.output_len // 2)
    options = [
        stage_option(cost, devs, link, s, n_layers, True, True, batch, ctx, w.prompt_len, w.max_batch) for s, _ in evals
    ]
    chosen = next(o for o in options if o.shares == shares)
    mem = group_memory(cost, devs, shares, n_layers, best.kv_tokens[0], True, True, w.max_batch)
    stage = StagePlan(
        tuple(gpus),
        n_layers,
        0,
        max(mem),
        best.kv_tokens[0],
        shares,
        tuple(mem),
        tuple(r.decode_s for r in chosen.ranks),
    )
    replica = ReplicaPlan((stage,), best.max_batch, best.rate, best.latency_s, best.decode_step_s)
    ideal = ideal_shares(cost, devs, batch, ctx)
    near = sorted(options, key=lambda o: abs(o.ranks[0].share / sum(r.share for r in o.ranks) - ideal[0]))
    notes = (
        f"uneven TP {tp} at {chosen.ratio} over {', '.join(d.name for d in devs)}: speed-proportional shares "
        + ":".join(f"{f:.2f}" for f in ideal)
        + f"; {len(options)} valid splits, nearest {', '.join(o.ratio for o in near[:4])}",
        why(chosen, options),
    )
    name = f"uneven TP {tp} at {chosen.ratio}" if shares else f"TP {tp} (even)"
    return Plan((replica,), (), best.rate, 0.0, best.latency_s, name, notes), best


def evaluate_layout(
    cluster: Cluster, cost: CostModel, workload: Workload, slo: Slo, layout: Layout
) -> ReplicaPlan | None:
    """One replica of ``layout`` (its tp-ratio included) on the first GPUs of ``cluster``'s first node, the
    uneven stages costed rank by rank; None when it does not fit or cannot meet the SLO."""
    node = cluster.nodes[0]
    costs = Costs(cost, workload)
    stages = layout.stages()
    slots, gpus = [], []
    for st in stages:
        group = tuple(Gpu(node.name, r, node.device) for r in st.ranks)
        devs = tuple(g.device for g in group) if st.shares else ()
        slots.append(Slot(node.device, st.tp, node.intra, None if st.is_last else node.intra, devs, st.shares))
        gpus.append(group)
    e = evaluate(slots, layout.pp_partition, costs, slo.latency_s)
    if e is None:
        return None
    w = workload
    m = -(-e.max_batch // len(stages))
    ctx = m * (w.prompt_len + w.output_len // 2)
    out = []
    for i, (st, slot, group) in enumerate(zip(stages, slots, gpus)):
        first, last = st.is_first, st.is_last
        mem = costs.memory(slot, st.num_layers, e.kv_tokens[i], first, last)
        ranks: tuple = ((), ())
        if st.shares:
            opt = stage_option(
                cost, slot.devs, node.intra, st.shares, st.num_layers, first, last, m, ctx, w.prompt_len, w.max_batch
            )
            rank_mem = group_memory(cost, slot.devs, st.shares, st.num_layers, e.kv_tokens[i], first, last, w.max_batch)
            ranks = (tuple(rank_mem), tuple(r.decode_s for r in opt.ranks))
        out.append(StagePlan(group, st.num_layers, st.layer_start, mem, e.kv_tokens[i], st.shares, *ranks))
    return ReplicaPlan(tuple(out), e.max_batch, e.rate, e.latency_s, e.decode_step_s)
