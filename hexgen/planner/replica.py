"""One replica under the cost model: its operating point (batch, rate, latency) and its best layer split.

A replica is an ordered sequence of stage *slots* (device, TP degree, the link inside the TP group, the link to
the next stage). ``evaluate`` predicts, for given layer counts, the largest batch that fits the smallest stage's
KV cache and meets the latency SLO; ``best_split`` chooses the layer counts (see docs/planner.md, "Search").

Latency model for ``b`` requests in flight on ``P`` stages, micro-batches of ``m = ceil(b / P)``:

- decode round (every request gains a token): ``max(sum_s D_s(m) + hops + return, P * max_s D_s(m))``
- time to first token: ``sum_s F_s(prompt) + hops``
- latency: ``TTFT + (output - 1) * round + b * stall``, ``stall = max_s F_s + RING_STALL * (TTFT - max_s F_s)``:
  in steady state ``b`` other prompts are prefilled during one request's lifetime. A micro-batch carrying a
  prefill holds the bottleneck stage for ``max_s F_s`` and also delays the ring of ``P`` micro-batches at the
  other stages it passes; RING_STALL is fitted to hexgen/planner/simulator.py (docs/planner.md, "Search").
- rate: ``b / latency`` (Little's law).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hexgen.config import default_partition
from hexgen.planner import uneven
from hexgen.planner.cluster import Cluster, Link
from hexgen.planner.costmodel import GPU_RUNTIME_BYTES, CostModel
from hexgen.planner.devices import DeviceSpec
from hexgen.planner.plans import Workload

MEMORY_FRACTION = 0.9  # EngineConfig.gpu_memory_fraction
MAX_TOKENS = 2048  # EngineConfig.max_num_batched_tokens: the activation workspace
MAX_BATCH = 256  # default of Workload.max_batch: requests in flight per replica (worker --max-num-seqs)
RING_STALL = 0.5  # share of the other stages' prefill time that also stalls the decode ring (see above)
BATCH_TARGETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # KV reserves (in requests) the layer split is tried with


@dataclass(frozen=True)
class Slot:
    """The hardware of one stage: device, TP degree, link inside the TP group, link to the next stage; for
    a TP group of unequal GPUs, each rank's device and the stage's tp-ratio (hexgen/planner/uneven.py)."""

    dev: DeviceSpec
    tp: int
    tp_link: Link
    hop: Link | None  # None on the last stage
    devs: tuple[DeviceSpec, ...] = ()  # per rank, when the group mixes devices or has a tp-ratio
    shares: tuple[int, ...] = ()  # the stage's tp-ratio; (): even shards


@dataclass(frozen=True)
class Eval:
    """A replica's predicted operating point for fixed layer counts."""

    layers: tuple[int, ...]
    kv_tokens: tuple[int, ...]  # KV capacity per stage
    max_batch: int
    rate: float
    latency_s: float
    decode_step_s: float
    latency_fn: Callable[[int], float]  # latency with b requests in flight
    kv_batch: int  # requests the KV cache alone allows (capped at the workload's max_batch)

    def latency_at(self, rate: float) -> float | None:
        """Predicted latency when offered ``rate`` requests/s (the smallest batch that sustains it); None when
        the replica cannot sustain it within its max_batch."""
        if rate > self.rate * (1 + 1e-9):
            return None
        lo, hi = 1, self.max_batch
        while lo < hi:
            mid = (lo + hi) // 2
            if mid / self.latency_fn(mid) >= rate:
                hi = mid
            else:
                lo = mid + 1
        return self.latency_fn(lo)


class Costs:
    """Memoised cost-model queries for one model, workload and memory fraction."""

    def __init__(self, cost: CostModel, workload: Workload) -> None:
        self.cost = cost
        self.workload = workload
        self._time: dict[tuple, tuple[float, float]] = {}
        self._hop: dict[tuple, float] = {}
        self._mem: dict[tuple, tuple[int, int, int, int]] = {}
        self._kv: dict[tuple, int] = {}

    def time_coeffs(self, slot: Slot, tokens: int, context: int, first: bool, last: bool) -> tuple[float, float]:
        """(per layer, fixed) seconds of a step of ``slot``: stage_time is linear in its layer count."""
        key = (slot.dev, slot.tp, slot.tp_link, slot.devs, slot.shares, tokens, context, first, last)
        hit = self._time.get(key)
        if hit is None and slot.devs:
            t1, t2 = (
                uneven.group_step_time(self.cost, slot.devs, slot.tp_link, slot.shares, n, tokens, context, last)
                for n in (1, 2)
            )
            hit = self._time[key] = (t2 - t1, 2 * t1 - t2)
        if hit is None:
            t1 = self.cost.stage_time(slot.dev, slot.tp, 1, slot.tp_link, tokens, context, first, last)
            t2 = self.cost.stage_time(slot.dev, slot.tp, 2, slot.tp_link, tokens, context, first, last)
            hit = self._time[key] = (t2 - t1, 2 * t1 - t2)
        return hit

    def stage_time(self, slot: Slot, layers: int, tokens: int, context: int, first: bool, last: bool) -> float:
        a, c = self.time_coeffs(slot, tokens, context, first, last)
        return a * layers + c

    def hop(self, link: Link | None, tokens: int) -> float:
        if link is None:
            return 0.0
        key = (link, tokens)
        hit = self._hop.get(key)
        if hit is None:
            hit = self._hop[key] = self.cost.transfer_time(link, tokens)
        return hit

    def mem_coeffs(self, slot: Slot, first: bool, last: bool) -> tuple[int, int, int, int]:
        """(budget, fixed bytes, bytes per layer, KV bytes per token per layer) of one rank of the stage."""
        key = (slot.dev, slot.tp, slot.devs, slot.shares, first, last)
        hit = self._mem.get(key)
        if hit is None and slot.devs:  # the rank that holds the fewest tokens binds
            w = self.workload.max_batch
            per = [
                uneven.rank_memory(self.cost, d, slot.tp, slot.shares, r, n, first, last, w)
                for r, d in enumerate(slot.devs)
                for n in (1, 2)
            ]
            r = min(range(slot.tp), key=lambda i: (per[2 * i][0] - per[2 * i][2]) // per[2 * i][3])
            (budget, _, m1, kv1), (_, _, m2, _) = per[2 * r], per[2 * r + 1]
            hit = self._mem[key] = (budget, 2 * m1 - m2, m2 - m1, kv1)
        if hit is None:
            c = self.cost
            m1 = c.stage_memory(slot.tp, 1, 0, first, last, MAX_TOKENS, self.workload.max_batch)
            m2 = c.stage_memory(slot.tp, 2, 0, first, last, MAX_TOKENS, self.workload.max_batch)
            budget = rank_budget(slot.dev)
            hit = self._mem[key] = (budget, 2 * m1 - m2, m2 - m1, c.kv_bytes_per_token(slot.tp))
        return hit

    def kv_tokens(self, slot: Slot, layers: int, first: bool, last: bool) -> int:
        key = (slot.dev, slot.tp, slot.devs, slot.shares, layers, first, last)
        hit = self._kv.get(key)
        if hit is None and slot.devs:
            w = self.workload.max_batch
            hit = self._kv[key] = uneven.group_kv_tokens(self.cost, slot.devs, slot.shares, layers, first, last, w)
        if hit is None:
            hit = self._kv[key] = self.cost.kv_capacity_tokens(
                slot.dev, slot.tp, layers, first, last, MEMORY_FRACTION, MAX_TOKENS, self.workload.max_batch
            )
        return hit

    def memory(self, slot: Slot, layers: int, kv_tokens: int, first: bool, last: bool) -> int:
        """Per-rank bytes of the stage holding ``kv_tokens`` of KV (the cost model's stage_memory; the largest
        rank's for a group of unequal GPUs)."""
        if slot.devs:
            w = self.workload.max_batch
            return max(uneven.group_memory(self.cost, slot.devs, slot.shares, layers, kv_tokens, first, last, w))
        return self.cost.stage_memory(slot.tp, layers, kv_tokens, first, last, MAX_TOKENS, self.workload.max_batch)


def rank_budget(dev: DeviceSpec) -> int:
    """Bytes a rank may use for weights + KV + workspace: the engine's fraction less the CUDA runtime."""
    return int(dev.memory_bytes * MEMORY_FRACTION) - (0 if dev.name == "CPU" else GPU_RUNTIME_BYTES)


def evaluate(
    slots: Sequence[Slot], layers: Sequence[int], costs: Costs, slo_latency: float, return_latency: float = 0.0
) -> Eval | None:
    """The operating point of a replica with these layer counts; None when a stage cannot hold its weights
    plus one request's KV, or when even one request misses ``slo_latency`` (0: no bound)."""
    w = costs.workload
    p, o = w.prompt_len, w.output_len
    n = len(slots)
    last = n - 1
    kv = tuple(costs.kv_tokens(s, layers[i], i == 0, i == last) for i, s in enumerate(slots))
    kv_batch = min(min(kv) // w.seq_len, w.max_batch)
    if kv_batch < 1:
        return None
    ftimes = [costs.stage_time(s, layers[i], p, p, i == 0, i == last) for i, s in enumerate(slots)]
    ttft = sum(ftimes) + sum(costs.hop(s.hop, p) for s in slots)
    stall = max(ftimes) + RING_STALL * (ttft - max(ftimes))
    ctx_per_seq = p + o // 2
    memo: dict[int, tuple[float, float]] = {}

    def point(b: int) -> tuple[float, float]:
        hit = memo.get(b)
        if hit is None:
            m = -(-b // n)
            d = [costs.stage_time(s, layers[i], m, m * ctx_per_seq, i == 0, i == last) for i, s in enumerate(slots)]
            path = sum(d) + sum(costs.hop(s.hop, m) for s in slots) + return_latency
            rnd = max(path, n * max(d))
            hit = memo[b] = (ttft + (o - 1) * rnd + b * stall, max(d))
        return hit

    def latency(b: int) -> float:
        return point(b)[0]

    if slo_latency > 0 and latency(1) > slo_latency:
        return None
    hi = kv_batch
    if slo_latency > 0 and latency(hi) > slo_latency:
        lo = 1  # latency(lo) meets the SLO, latency(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if latency(mid) <= slo_latency:
                lo = mid
            else:
                hi = mid
        hi = lo
    best = max({hi, max(1, n * (hi // n))}, key=lambda b: (b / latency(b), -b))
    lat, step = point(best)
    return Eval(tuple(layers), kv, best, best / lat, lat, step, latency, kv_batch)


def _min_bottleneck(a: list[float], c: list[float], caps: list[int], total: int) -> list[int] | None:
    """Layer counts n_s in [1, caps_s] summing to ``total`` that minimise max_s(a_s * n_s + c_s)."""
    if sum(caps) < total or min(caps) < 1 or len(caps) > total:
        return None

    def counts(t: float) -> list[int]:
        return [
            max(1, min(cap, int(math.floor((t - ci) / ai + 1e-9)) if ai > 0 else cap))
            for ai, ci, cap in zip(a, c, caps)
        ]

    lo = max(ai + ci for ai, ci in zip(a, c))
    hi = max(ai * cap + ci for ai, ci, cap in zip(a, c, caps))
    if sum(counts(lo)) < total:
        for _ in range(60):
            mid = (lo + hi) / 2
            if sum(counts(mid)) >= total:
                hi = mid
            else:
                lo = mid
        lo = hi
    out = counts(lo)
    while sum(out) > total:  # drop the excess from the slowest stages that can give a layer
        j = max((i for i in range(len(out)) if out[i] > 1), key=lambda i: (a[i] * out[i] + c[i], i))
        out[j] -= 1
    return out


def split_for_batch(slots: Sequence[Slot], costs: Costs, num_layers: int, batch: int) -> list[int] | None:
    """The layer split that minimises the bottleneck stage's work per request lifetime while every stage holds
    its weights plus KV for ``batch`` requests; None when no split can."""
    w = costs.workload
    p, o = w.prompt_len, w.output_len
    n = len(slots)
    m = -(-batch // n)
    a, c, caps = [], [], []
    for i, s in enumerate(slots):
        first, last = i == 0, i == n - 1
        da, dc = costs.time_coeffs(s, m, m * (p + o // 2), first, last)
        fa, fc = costs.time_coeffs(s, p, p, first, last)
        # a stage's busy time over one request lifetime: o decode rounds of n micro-batches + `batch` prefills
        a.append(o * n * da + batch * fa)
        c.append(o * n * dc + batch * fc)
        budget, fixed, per_layer, kv_tok = costs.mem_coeffs(s, first, last)
        room = budget - fixed
        caps.append(max(0, room // (per_layer + kv_tok * batch * w.seq_len)) if room > 0 else 0)
    return _min_bottleneck(a, c, caps, num_layers)


def split_candidates(
    slots: Sequence[Slot], costs: Costs, num_layers: int, extra: Sequence[Sequence[int]] = ()
) -> list[tuple[int, ...]]:
    """Distinct layer splits worth evaluating: ``extra``, then one made for each KV reserve in BATCH_TARGETS
    (capped at the workload's max_batch) until a reserve no longer fits."""
    out: list[tuple[int, ...]] = []
    for split in extra:
        if len(split) == len(slots) and tuple(split) not in out:
            out.append(tuple(split))
    for b in sorted({min(t, costs.workload.max_batch) for t in BATCH_TARGETS}):
        made = split_for_batch(slots, costs, num_layers, b)
        if made is None:
            break  # a larger reserve only shrinks the caps
        if tuple(made) not in out:
            out.append(tuple(made))
    return out


def best_split(
    slots: Sequence[Slot],
    costs: Costs,
    num_layers: int,
    slo_latency: float,
    return_latency: float = 0.0,
    extra: Sequence[Sequence[int]] = (),
) -> Eval | None:
    """The best-rate replica over ``split_candidates``."""
    best: Eval | None = None
    for split in split_candidates(slots, costs, num_layers, extra):
        ev = evaluate(slots, split, costs, slo_latency, return_latency)
        if ev is not None and (best is None or (ev.rate, -ev.latency_s) > (best.rate, -best.latency_s)):
            best = ev
    return best


Key = tuple[tuple[int, int], ...]  # (node index, TP degree) per stage, in pipeline order


def equal_split(num_layers: int, stages: int) -> tuple[int, ...]:
    """Layers split as evenly as possible (the symmetric layouts' split)."""
    return default_partition(num_layers, (1,) * stages)


class Evaluator:
    """Replica evaluations keyed by their stages' (node, TP) sequence, memoised for the search.

    GPUs of one node are interchangeable, so a replica is known by which node and TP degree each stage has.
    """

    def __init__(self, cluster: Cluster, cost: CostModel, workload: Workload, slo_latency: float) -> None:
        self.cluster = cluster
        self.costs = Costs(cost, workload)
        self.num_layers = cost.model.num_layers
        self.slo_latency = slo_latency
        self._best: dict[Key, Eval | None] = {}
        self._fixed: dict[tuple[Key, tuple[int, ...]], Eval | None] = {}

    def slots(self, key: Key) -> list[Slot]:
        nodes = self.cluster.nodes
        out = []
        for i, (ni, tp) in enumerate(key):
            nxt = key[i + 1][0] if i + 1 < len(key) else None
            hop = None if nxt is None else (nodes[ni].intra if nxt == ni else self.cluster.inter)
            out.append(Slot(nodes[ni].device, tp, nodes[ni].intra, hop))
        return out

    def return_latency(self, key: Key) -> float:
        """Sampled ids travel from the last stage back to the first."""
        if len(key) == 1:
            return 0.0
        return (self.cluster.nodes[key[0][0]].intra if key[0][0] == key[-1][0] else self.cluster.inter).latency

    def best(self, key: Key) -> Eval | None:
        """The best layer split for this stage sequence (None: nothing fits or meets the SLO)."""
        if key not in self._best:
            ok = 0 < len(key) <= self.num_layers
            self._best[key] = (
                best_split(
                    self.slots(key),
                    self.costs,
                    self.num_layers,
                    self.slo_latency,
                    self.return_latency(key),
                    extra=[equal_split(self.num_layers, len(key))],
                )
                if ok
                else None
            )
        return self._best[key]

    def candidates(self, key: Key) -> list[Eval]:
        """Every candidate split of this stage sequence that fits and meets the SLO, evaluated."""
        if not 0 < len(key) <= self.num_layers:
            return []
        splits = split_candidates(
            self.slots(key), self.costs, self.num_layers, extra=[equal_split(self.num_layers, len(key))]
        )
        return [e for e in (self.fixed(key, sp) for sp in splits) if e is not None]

    def fixed(self, key: Key, layers: tuple[int, ...]) -> Eval | None:
        """This stage sequence with the given layer counts."""
        k = (key, tuple(layers))
        if k not in self._fixed:
            self._fixed[k] = evaluate(self.slots(key), layers, self.costs, self.slo_latency, self.return_latency(key))
        return self._fixed[k]
