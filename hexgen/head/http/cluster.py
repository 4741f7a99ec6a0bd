"""One read of the whole cluster from Redis for ``/metrics`` and the dashboard: the registry (workers,
pipelines, queues; :mod:`hexgen.head.status`), the figures the stage leaders publish
(:mod:`hexgen.wire.figures`), the error counters and the dead-letter count.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from hexgen.head.status import StatusReport, collect_status
from hexgen.wire import figures as F
from hexgen.wire import keys as C
from hexgen.wire.text import as_text


@dataclass
class ClusterSnapshot:
    time: float
    status: StatusReport
    pipelines: dict[str, F.PipelineFigures] = field(default_factory=dict)
    stages: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)
    head_errors: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0


async def dead_letter_count(r: Any) -> int:
    """Entries ever added to the dead-letter stream (XINFO STREAM ``entries-added``, Redis 7; else XLEN)."""
    try:
        info = await r.xinfo_stream(C.DEADLETTER_STREAM)
    except ResponseError:  # no such stream yet
        return 0
    added = info.get("entries-added", info.get(b"entries-added"))
    return int(added) if added is not None else int(info.get("length", 0))


async def read_figures(r: Any) -> tuple[dict[str, F.PipelineFigures], dict[tuple[str, int], dict[str, float]]]:
    """Every pipeline's counters and every live stage's gauges; expired index members are removed."""
    pids = sorted(as_text(m) for m in await r.smembers(F.PIPELINES_INDEX_KEY))
    stage_ids = sorted(as_text(m) for m in await r.smembers(F.STAGES_INDEX_KEY))
    async with r.pipeline(transaction=False) as p:
        for pid in pids:
            p.hgetall(F.pipeline_figures_key(pid))
        for sid in stage_ids:
            p.hgetall(F.STAGE_FIGURES_PREFIX + sid)
        replies = await p.execute(raise_on_error=False)
    pipelines: dict[str, F.PipelineFigures] = {}
    stages: dict[tuple[str, int], dict[str, float]] = {}
    gone_p, gone_s = [], []
    for pid, raw in zip(pids, replies[: len(pids)]):
        if isinstance(raw, Exception) or not raw:
            gone_p.append(pid)
            continue
        pipelines[pid] = F.parse_pipeline_figures(pid, raw)
    for sid, raw in zip(stage_ids, replies[len(pids) :]):
        where = F.split_stage_key(F.STAGE_FIGURES_PREFIX + sid)
        if where is None or isinstance(raw, Exception) or not raw:
            gone_s.append(sid)
            continue
        stages[where] = F.parse_stage_figures(raw)
    if gone_p:
        await r.srem(F.PIPELINES_INDEX_KEY, *gone_p)
    if gone_s:
        await r.srem(F.STAGES_INDEX_KEY, *gone_s)
    return pipelines, stages


async def read_cluster(r: Any, heartbeat_ttl_s: float) -> ClusterSnapshot:
    """Everything ``/metrics`` and ``/api/cluster`` show, in a handful of round trips."""
    status = await collect_status(r, heartbeat_ttl_s)
    pipelines, stages = await read_figures(r)
    errors = {as_text(k): int(as_text(v)) for k, v in (await r.hgetall(F.ERRORS_KEY)).items()}
    return ClusterSnapshot(time.time(), status, pipelines, stages, errors, await dead_letter_count(r))


@dataclass
class _Sample:
    t: float
    generation_tokens: float
    ttft: F.Histogram


class RecentWindow:
    """Cluster-wide rates over the last ``window_s`` from successive snapshots' counters: tokens/s and
    TTFT quantiles (estimated from the histogram's buckets, as Prometheus' ``histogram_quantile`` does)."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._samples: deque[_Sample] = deque()

    def add(self, snap: ClusterSnapshot) -> None:
        ttft = F.Histogram(F.TTFT_BUCKETS)
        tokens = 0.0
        for p in snap.pipelines.values():
            tokens += p.counters.get("generation_tokens", 0.0)
            h = p.hists.get(F.TTFT)
            if h is not None:
                ttft.counts = [a + b for a, b in zip(ttft.counts, h.counts)]
                ttft.sum += h.sum
                ttft.count += h.count
        self._samples.append(_Sample(snap.time, tokens, ttft))
        while len(self._samples) > 2 and snap.time - self._samples[1].t >= self.window_s:
            self._samples.popleft()

    def summary(self) -> dict[str, float | None]:
        """``tokens_per_s``, ``ttft_p50_s``, ``ttft_p99_s``, ``requests`` (first tokens) and ``window_s``
        (the span actually covered); None where there is not enough to tell."""
        if len(self._samples) < 2:
            return {"tokens_per_s": None, "ttft_p50_s": None, "ttft_p99_s": None, "requests": None, "window_s": 0.0}
        first, last = self._samples[0], self._samples[-1]
        span = max(1e-9, last.t - first.t)
        d = last.ttft.minus(first.ttft)
        return {
            "tokens_per_s": max(0.0, last.generation_tokens - first.generation_tokens) / span,
            "ttft_p50_s": d.quantile(0.5),
            "ttft_p99_s": d.quantile(0.99),
            "requests": d.count,
            "window_s": span,
        }
