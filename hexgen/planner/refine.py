"""Layer splits re-ranked by the simulator: the last step of ``plan_cluster``.

The search scores a replica with the analytic model of ``replica.evaluate`` (a few microseconds, so annealing
can try thousands). That model charges prefill as a fixed stall on the decode ring, which undervalues moving
prefill work off a compute-weak stage: on two H200s, one cut to 40 SMs, it rated a 32/48 split of
Llama-2-70B (6.16 req/s) above 60/20 (5.99), while the discrete-event simulator (7.38 against 8.51 req/s)
and the engine (docs/planner.md, "Measured validation") favour 60/20.

So for each distinct stage sequence of the final plan, the candidate splits (one per KV reserve as in the
search, the split that balances prefill time, and blends of that with the searched split) that the analytic
model rates within ``tolerance`` of its best are simulated (``simulator.saturated_rate``: a burst of requests of the
workload's mean shape through the replica with its planned batch), and the highest simulated rate wins. The
replica's reported figures stay the analytic ones of the chosen split, so plans remain comparable to
``best_symmetric``, which ``plan_cluster`` checks afterwards. Only the rate objective is refined
(``Slo.rate == 0``); at a fixed rate the plan is chosen for latency and kept as the search left it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from hexgen.planner.planbuild import assemble
from hexgen.planner.plans import Slo
from hexgen.planner.replica import MAX_TOKENS, Eval, Evaluator, Key, _min_bottleneck
from hexgen.planner.simulator import SimConfig, saturated_rate

log = logging.getLogger(__name__)

TOLERANCE = 0.95  # candidates the analytic model rates at least this share of its best split's rate
MAX_KEYS = 16  # distinct stage sequences refined at most (larger plans keep the rest as searched)


def simulated_rate(ev: Evaluator, key: Key, e: Eval, slo: Slo) -> float:
    """Saturated requests/s of one replica with stage sequence ``key`` and evaluation ``e``."""
    plan = assemble(ev, [(key, e)], Slo(slo.latency_s), 0.0)
    return saturated_rate(
        plan, ev.costs.cost, ev.cluster, ev.costs.workload, config=SimConfig(max_num_seqs=max(1, e.max_batch))
    )


BLENDS = (0.25, 0.5, 0.75)  # shares of the way from the searched split to the prefill-balanced one


def prefill_split(ev: Evaluator, key: Key) -> list[int] | None:
    """The split that balances the stages' time for a full prefill chunk (under load the engine prefills up to
    its step token budget of prompts at once), with memory for one request's KV."""
    costs, w = ev.costs, ev.costs.workload
    tokens = min(MAX_TOKENS, w.max_batch * w.prompt_len)
    slots = ev.slots(key)
    n = len(slots)
    a, c, caps = [], [], []
    for i, s in enumerate(slots):
        first, last = i == 0, i == n - 1
        fa, fc = costs.time_coeffs(s, tokens, tokens, first, last)
        a.append(fa)
        c.append(fc)
        budget, fixed, per_layer, kv_tok = costs.mem_coeffs(s, first, last)
        room = budget - fixed
        caps.append(max(0, room // (per_layer + kv_tok * w.seq_len)) if room > 0 else 0)
    return _min_bottleneck(a, c, caps, ev.num_layers)


def _blend(x: Sequence[int], y: Sequence[int], t: float, total: int) -> tuple[int, ...]:
    """Layer counts t of the way from x to y, rounded so they still sum to ``total`` (each at least 1)."""
    raw = [max(1.0, a + t * (b - a)) for a, b in zip(x, y)]
    out = [max(1, int(v)) for v in raw]
    order = sorted(range(len(out)), key=lambda i: raw[i] - out[i], reverse=True)
    k = 0
    while sum(out) < total:
        out[order[k % len(out)]] += 1
        k += 1
    while sum(out) > total:
        j = max((i for i in range(len(out)) if out[i] > 1), key=lambda i: out[i])
        out[j] -= 1
    return tuple(out)


def candidates(ev: Evaluator, key: Key, e: Eval) -> list[Eval]:
    """The searched split's alternatives: ``Evaluator.candidates`` (one per KV reserve), the prefill-balanced
    split and blends of it with the searched one; only those that fit and meet the SLO."""
    out = list(ev.candidates(key))
    pre = prefill_split(ev, key)
    if pre is not None:
        for sp in [tuple(pre)] + [_blend(e.layers, pre, t, ev.num_layers) for t in BLENDS]:
            c = ev.fixed(key, sp)
            if c is not None and all(o.layers != c.layers for o in out):
                out.append(c)
    if all(o.layers != e.layers for o in out):
        out.append(e)
    return out


def refine_splits(
    ev: Evaluator,
    replicas: Sequence[tuple[Key, Eval]],
    slo: Slo,
    *,
    tolerance: float = TOLERANCE,
    deadline: float | None = None,
) -> list[tuple[Key, Eval]]:
    """``replicas`` with each stage sequence's layer split re-chosen by simulated rate (see the module
    docstring); stops refining at ``deadline`` (time.monotonic()) and keeps what is left as it was."""
    if slo.rate > 0:
        return list(replicas)
    chosen: dict[Key, Eval] = {}
    for key, e in replicas:
        if key in chosen or len(chosen) >= MAX_KEYS or len(key) < 2:
            continue
        if deadline is not None and time.monotonic() > deadline:
            break
        floor = tolerance * e.rate
        cands = [c for c in candidates(ev, key, e) if c.rate >= floor or c.layers == e.layers]
        if len(cands) < 2:
            continue
        scored = [(simulated_rate(ev, key, c, slo), c) for c in cands]
        best_rate, best = max(scored, key=lambda sc: (sc[0], sc[1].rate))
        if best.layers != e.layers:
            log.info(
                "planner: split %s -> %s for %s (simulated %.3g req/s; analytic %.3g -> %.3g)",
                e.layers,
                best.layers,
                key,
                best_rate,
                e.rate,
                best.rate,
            )
            chosen[key] = best
    return [(key, chosen.get(key, e)) for key, e in replicas]
