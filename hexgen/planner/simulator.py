"""Discrete-event simulation of a request stream through a planned deployment.

Requests arrive as a Poisson stream (or all at once), a dispatcher hands each to the replica with the most free
room (as HexGen's pipelines pull from a Redis consumer group when they have room), and each replica runs the
engine's own stage-0 scheduler (hexgen.engine.scheduler, on a simulated clock) with up to P micro-batches in flight
through P stages, every stage a FIFO server whose service times come from the cost model. See
hexgen/planner/sim_replica.py for the replica model.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from hexgen.errors import ConfigError
from hexgen.planner.sim_replica import ARRIVAL, RESULT, ReplicaSim, SimSeq, StageModel
from hexgen.planner.uneven import group_step_time


@dataclass(frozen=True)
class SimConfig:
    """Engine settings the simulated replicas run with (hexgen.config.EngineConfig's names).

    ``max_num_seqs`` None takes each replica's planned ``max_batch`` (64 where that is not positive).
    ``max_model_len`` None takes the model's ``max_position_embeddings``.
    """

    max_num_seqs: int | None = None
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_model_len"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"{name}: {v!r} must be a positive integer or None")
        for name in ("max_num_batched_tokens", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}: {v!r} must be a positive integer")


@dataclass(frozen=True)
class SimResult:
    """What one simulated run measured. Times in seconds; percentiles over completed requests (0 when none);
    ``slo_attainment`` over all ``num_requests`` (a rejected or unfinished request misses the SLO)."""

    completed: int
    throughput_rps: float
    output_tok_s: float
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    latency_p50: float
    latency_p99: float
    slo_attainment: float
    num_requests: int = 0
    rejected: int = 0  # prompt does not fit a replica's context / KV cache
    duration_s: float = 0.0  # first arrival to last completion
    latency_mean: float = 0.0
    mean_in_system: float = 0.0  # time-average of requests held by the dispatcher or a replica (Little's L)
    preemptions: int = 0
    steps: int = 0  # micro-batches launched, all replicas
    peak_running: int = 0  # most sequences running at once in one replica
    bottleneck_util: float = 0.0  # busy fraction of the busiest stage over duration_s

    def __post_init__(self) -> None:
        for name in ("completed", "num_requests", "rejected", "preemptions", "steps", "peak_running"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}: {v!r} must be a non-negative integer")
        for name in (
            "throughput_rps",
            "output_tok_s",
            "ttft_p50",
            "ttft_p99",
            "tpot_p50",
            "tpot_p99",
            "latency_p50",
            "latency_p99",
            "duration_s",
            "latency_mean",
            "mean_in_system",
            "bottleneck_util",
        ):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v >= 0:
                raise ConfigError(f"{name}: {v!r} must be a non-negative number")
        if not 0.0 <= self.slo_attainment <= 1.0:
            raise ConfigError(f"slo_attainment: {self.slo_attainment!r} must be in [0, 1]")

    def as_dict(self) -> dict:
        """Plain dict of all fields (for JSON)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def percentile(values: Sequence[float], q: float) -> float:
    """Linearly interpolated percentile (numpy's default) of ``values``, ``q`` in [0, 100]; 0 when empty."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def request_stream(rate: float, num_requests: int, workload, seed: int = 0) -> list[tuple[float, int, int]]:
    """(arrival time, prompt tokens, output tokens) of each request, in arrival order.

    Poisson arrivals at ``rate`` requests/s from ``random.Random(seed)`` (the same seed gives the same unit-rate
    gaps, scaled by 1/rate, so streams at different rates are comparable); ``rate`` = inf: all at t = 0.
    ``workload``: a Workload (every request has its prompt_len / output_len) or (prompt, output) pairs, used
    in order and cycled.
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        raise ConfigError(f"rate: {rate!r} must be > 0 requests/s (inf: all at once)")
    if isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 1:
        raise ConfigError(f"num_requests: {num_requests!r} must be a positive integer")
    pairs = _length_pairs(workload)
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(num_requests):
        if i and not math.isinf(rate):
            t += rng.expovariate(1.0) / rate
        p, o = pairs[i % len(pairs)]
        out.append((t, p, o))
    return out


def _length_pairs(workload) -> list[tuple[int, int]]:
    if hasattr(workload, "prompt_len") and hasattr(workload, "output_len"):
        pairs = [(workload.prompt_len, workload.output_len)]
    elif isinstance(workload, (list, tuple)) and workload:
        pairs = [tuple(p) for p in workload]
    else:
        raise ConfigError(f"workload: {workload!r} must be a Workload or a non-empty list of (prompt, output)")
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in pair):
            raise ConfigError(
                f"workload[{i}]: {pair!r} must be a (prompt tokens, output tokens) pair of positive integers"
            )
    return pairs


def _stage_models(replica, cost, cluster) -> tuple[list[StageModel], float]:
    """Cost-model callables of each stage of ``replica`` and the latency of sampled ids back to stage 0."""
    stages = replica.stages
    last = len(stages) - 1
    models = []
    for i, st in enumerate(stages):
        lead = st.gpus[0]
        tp_link = cluster.link(lead, st.gpus[-1])
        hop_link = cluster.link(lead, stages[i + 1].gpus[0]) if i < last else None

        def time(
            tokens, context, dev=lead.device, tp=st.tp, layers=st.layers, link=tp_link, first=i == 0, is_last=i == last
        ):
            return cost.stage_time(dev, tp, layers, link, tokens, context, first, is_last)

        def time_by_rank(tokens, context, st=st, link=tp_link, is_last=i == last):
            devs = [g.device for g in st.gpus]
            return group_step_time(cost, devs, link, st.tp_ratio, st.layers, tokens, context, is_last)

        by_rank = bool(getattr(st, "tp_ratio", ())) or len({g.device for g in st.gpus}) > 1  # an uneven group

        def hop(tokens, link=hop_link):
            return cost.transfer_time(link, tokens) if link is not None else 0.0

        models.append(StageModel(time_by_rank if by_rank else time, hop))
    ret = cluster.link(stages[-1].gpus[0], stages[0].gpus[0]).latency if last else 0.0
    return models, ret


def _build_replicas(plan, cost, cluster, config: SimConfig, micro_batches: bool) -> list[ReplicaSim]:
    if not plan.replicas:
        raise ConfigError("plan.replicas: the plan has no replica to simulate")
    model_len = config.max_model_len or getattr(getattr(cost, "model", None), "max_position_embeddings", None)
    sims = []
    for r, rp in enumerate(plan.replicas):
        if not rp.stages:
            raise ConfigError(f"plan.replicas[{r}].stages: a replica needs at least one stage")
        kv = min(st.kv_tokens for st in rp.stages)
        num_blocks = kv // config.block_size
        if num_blocks < 1:
            raise ConfigError(
                f"plan.replicas[{r}].stages: KV capacity {kv} tokens is less than one block "
                f"({config.block_size} tokens)"
            )
        seqs = config.max_num_seqs or (rp.max_batch if getattr(rp, "max_batch", 0) > 0 else 64)
        models, ret = _stage_models(rp, cost, cluster)
        sims.append(
            ReplicaSim(
                r,
                models,
                ret,
                num_blocks=num_blocks,
                block_size=config.block_size,
                max_num_seqs=seqs,
                max_batched_tokens=config.max_num_batched_tokens,
                max_len=model_len or num_blocks * config.block_size,
                max_in_flight=len(rp.stages) if micro_batches else 1,
            )
        )
    return sims


def simulate(
    plan,
    cost,
    cluster,
    *,
    rate: float,
    num_requests: int,
    workload,
    slo,
    seed: int = 0,
    micro_batches: bool = True,
    config: SimConfig | None = None,
) -> SimResult:
    """Simulate ``num_requests`` requests arriving at ``rate`` (requests/s, inf = all at once) through ``plan``.

    ``workload``: a Workload (fixed lengths) or a list of (prompt, output) token pairs (cycled).
    ``slo.latency_s``: end-to-end bound for ``slo_attainment`` (0: no bound, attainment = completed fraction).
    ``micro_batches`` False keeps one micro-batch in flight per replica (no pipelining).
    Deterministic for a seed.
    """
    seqs, replicas, area = _run(
        plan, cost, cluster, rate, num_requests, workload, seed, micro_batches, config or SimConfig()
    )
    return _summarize(seqs, replicas, slo, area)


def _run(plan, cost, cluster, rate, num_requests, workload, seed, micro_batches, config):
    """The event loop; returns the requests (with their timestamps), the replicas and the area under the
    number of requests held over time."""
    stream = request_stream(rate, num_requests, workload, seed)
    replicas = _build_replicas(plan, cost, cluster, config, micro_batches)
    seqs = [SimSeq(i, p, o, t) for i, (t, p, o) in enumerate(stream)]

    heap: list = []
    counter = 0

    def push(time: float, prio: int, replica: int, payload) -> None:
        nonlocal counter
        heapq.heappush(heap, (time, prio, counter, replica, payload))
        counter += 1

    for s in seqs:
        push(s.arrival, ARRIVAL, -1, s)
    queue: list[SimSeq] = []  # arrived, not yet pulled by a replica (FIFO)
    qhead = 0
    in_system, area, last_t = 0, 0.0, 0.0

    while heap:
        now, prio, _, r, payload = heapq.heappop(heap)
        area += in_system * (now - last_t)
        last_t = now
        done: list[SimSeq] = []
        if prio == ARRIVAL:  # a burst (same instant) reaches the dispatcher together
            queue.append(payload)
            in_system += 1
            while heap and heap[0][0] == now and heap[0][1] == ARRIVAL:
                queue.append(heapq.heappop(heap)[4])
                in_system += 1
        elif prio == RESULT:
            done = replicas[r].on_result(now, payload, push)
        else:
            done = replicas[r].on_leader_free(now, push)
        in_system -= len(done)
        if qhead < len(queue):
            qhead, rejected = _dispatch(queue, qhead, replicas, now, push)
            in_system -= rejected
    return seqs, replicas, area


def _dispatch(queue: list[SimSeq], qhead: int, replicas: list[ReplicaSim], now: float, push) -> tuple[int, int]:
    """Hand queued requests (from ``qhead`` on) to the replicas with the most free room while any has room, and
    kick the idle ones that got work; returns the new queue head and how many requests were rejected."""
    touched, rejected = set(), 0
    while qhead < len(queue):
        best = max(replicas, key=lambda x: x.free_capacity)
        if not best.free_capacity:
            break
        s = queue[qhead]
        qhead += 1
        if best.add(s):
            touched.add(best.index)
        else:
            rejected += 1
    for i in sorted(touched):
        if replicas[i].polling:
            replicas[i].kick(now, push)
    return qhead, rejected


def _summarize(seqs: list[SimSeq], replicas: list[ReplicaSim], slo, area: float) -> SimResult:
    # (request, first token, done) of the completed requests
    done = [(s, s.first_token, s.done_at) for s in seqs if s.done_at is not None and s.first_token is not None]
    start = seqs[0].arrival
    end = max((d for _, _, d in done), default=start)
    duration = end - start
    ttft = [f - s.arrival for s, f, _ in done]
    lat = [d - s.arrival for s, _, d in done]
    tpot = [(d - f) / (s.generated - 1) for s, f, d in done if s.generated > 1]
    bound = getattr(slo, "latency_s", 0) or 0
    ok = sum(1 for x in lat if not bound or x <= bound)
    out_tokens = sum(s.generated for s, _, _ in done)
    busiest = max((b for rep in replicas for b in rep.stage_busy_s), default=0.0)
    return SimResult(
        completed=len(done),
        throughput_rps=len(done) / duration if duration > 0 else 0.0,
        output_tok_s=out_tokens / duration if duration > 0 else 0.0,
        ttft_p50=percentile(ttft, 50),
        ttft_p99=percentile(ttft, 99),
        tpot_p50=percentile(tpot, 50),
        tpot_p99=percentile(tpot, 99),
        latency_p50=percentile(lat, 50),
        latency_p99=percentile(lat, 99),
        slo_attainment=ok / len(seqs),
        num_requests=len(seqs),
        rejected=sum(1 for s in seqs if s.rejected),
        duration_s=duration,
        latency_mean=sum(lat) / len(lat) if lat else 0.0,
        mean_in_system=area / duration if duration > 0 else 0.0,
        preemptions=sum(rep.preemptions for rep in replicas),
        steps=sum(rep.steps for rep in replicas),
        peak_running=max(rep.peak_running for rep in replicas),
        bottleneck_util=min(1.0, busiest / duration) if duration > 0 else 0.0,
    )


def _concurrency(plan, config: SimConfig) -> int:
    """Requests all replicas together run at once (their max_num_seqs)."""
    return sum(config.max_num_seqs or (rp.max_batch if getattr(rp, "max_batch", 0) > 0 else 64) for rp in plan.replicas)


def _window_rate(seqs: list[SimSeq]) -> float:
    """Completions per second between the 25th and 75th percentile completion."""
    done = sorted(s.done_at for s in seqs if s.done_at is not None)
    if len(done) < 4:
        return len(done) / done[-1] if done and done[-1] > 0 else 0.0
    a, b = len(done) // 4, (3 * len(done)) // 4
    span = done[b] - done[a]
    return (b - a) / span if span > 0 else math.inf


def saturated_rate(
    plan,
    cost,
    cluster,
    workload,
    *,
    seed: int = 0,
    micro_batches: bool = True,
    config: SimConfig | None = None,
    num_requests: int | None = None,
) -> float:
    """Steady-state capacity (requests/s) of ``plan``: the completion rate between the 25th and 75th percentile
    completion of a burst (all at once) of ``num_requests`` (default: 4x the plan's total max_num_seqs, at least
    200). Every replica runs full until the queue drains at about the 75th percentile, and the ramp-up and the
    drain are left out."""
    config = config or SimConfig()
    n = num_requests or max(200, 4 * _concurrency(plan, config))
    return _window_rate(_run(plan, cost, cluster, math.inf, n, workload, seed, micro_batches, config)[0])


def max_rate_under_slo(
    plan,
    cost,
    cluster,
    workload,
    slo,
    attainment: float = 0.9,
    *,
    num_requests: int | None = None,
    seed: int = 0,
    micro_batches: bool = True,
    config: SimConfig | None = None,
    rel_tol: float = 0.02,
    max_iters: int = 20,
) -> float:
    """Highest Poisson rate (requests/s) at which at least ``attainment`` of ``num_requests`` requests meet
    ``slo`` (default: the plan's total max_num_seqs, between 500 and 5000).

    Bisects between 0 and ``saturated_rate``, which also caps the answer: a finite stream can meet a loose SLO
    above capacity, a sustained one cannot. 0.0 when even a lone request misses the SLO. The same seed at every
    rate, so the arrival pattern only scales.
    """
    if not 0.0 < attainment <= 1.0:
        raise ConfigError(f"attainment: {attainment!r} must be in (0, 1]")
    if not 0.0 < rel_tol < 1.0:
        raise ConfigError(f"rel_tol: {rel_tol!r} must be in (0, 1)")
    config = config or SimConfig()
    n = num_requests or min(5000, max(500, _concurrency(plan, config)))

    def run(rate: float, count: int = n) -> SimResult:
        return simulate(
            plan,
            cost,
            cluster,
            rate=rate,
            num_requests=count,
            workload=workload,
            slo=slo,
            seed=seed,
            micro_batches=micro_batches,
            config=config,
        )

    if run(math.inf, 1).slo_attainment < 1.0:
        return 0.0
    hi = saturated_rate(plan, cost, cluster, workload, seed=seed, micro_batches=micro_batches, config=config)
    if not 0 < hi < math.inf:
        return 0.0
    if run(hi).slo_attainment >= attainment:
        return hi
    lo = 0.0
    for _ in range(max_iters):
        if hi - lo <= rel_tol * hi:
            break
        mid = (lo + hi) / 2
        if run(mid).slo_attainment >= attainment:
            lo = mid
        else:
            hi = mid
    return lo
