"""Cluster figures in Redis: the key names and hash fields that workers write and the head's ``/metrics`` reads.

Workers publish what their engines measured through Redis, so one scrape of the head covers the whole
cluster and no GPU host opens a port. Two kinds of hash, plain strings throughout (``redis-cli HGETALL``
reads them):

- ``hexgen:metrics:pipeline:<pid>`` — **counters**, only ever incremented (HINCRBY / HINCRBYFLOAT of the
  change since the last write, by the pipeline's stage leaders every few seconds). They survive worker
  restarts; the hash expires :data:`COUNTERS_TTL_S` after its last write. Fields: ``model``,
  ``success:<finish_reason>``, ``prompt_tokens``, ``generation_tokens``, ``preemptions``, ``takeovers``,
  ``stage:<s>:steps``, ``stage:<s>:step_seconds``, and per histogram ``h:<name>:<i>`` (observations in bucket
  i alone, i = len(bounds) being +Inf), ``h:<name>:sum``, ``h:<name>:count``.
- ``hexgen:metrics:stage:<pid>:<stage>`` — **gauges** of one stage, overwritten by its leader every few
  seconds with a TTL of a few intervals, so a dead stage's figures vanish: ``kv_blocks_total``,
  ``kv_blocks_used``, ``kv_blocks_fit``, ``kv_bytes_per_block``, ``step_seconds`` (mean over the last
  interval), ``running``, ``waiting``, ``in_flight`` (stage 0), ``interval_s``, ``updated_at`` (wall clock).
- ``hexgen:metrics:pipelines`` / ``hexgen:metrics:stages`` — SETs naming the hashes above, so readers need
  no SCAN; a member whose hash has expired is skipped (and removed) by the reader.
- ``hexgen:metrics:errors`` — one counter per error code: every error event written to a result stream (by a
  head refusing a request, by a head or a pipeline dead-lettering one) increments it in the same MULTI, so
  it is exact.

Histogram bucket bounds are vLLM's (``vllm/v1/metrics/loggers.py``), so dashboards built for vLLM read ours.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hexgen.wire.text import as_text

METRICS_PREFIX = "hexgen:metrics:"
PIPELINE_FIGURES_PREFIX = METRICS_PREFIX + "pipeline:"
STAGE_FIGURES_PREFIX = METRICS_PREFIX + "stage:"
PIPELINE_FIGURES_PATTERN = PIPELINE_FIGURES_PREFIX + "*"
STAGE_FIGURES_PATTERN = STAGE_FIGURES_PREFIX + "*"
ERRORS_KEY = METRICS_PREFIX + "errors"
PIPELINES_INDEX_KEY = METRICS_PREFIX + "pipelines"  # SET of pipeline ids with counters (no SCAN needed)
STAGES_INDEX_KEY = METRICS_PREFIX + "stages"  # SET of "<pid>:<stage>" with gauges (members may have expired)
COUNTERS_TTL_S = 7 * 86400  # a pipeline's counters outlive it by a week (auto-plan names pipelines anew)
PUBLISH_INTERVAL_S = 2.0  # how often stage leaders write their figures (the default; settings may lower it)
GAUGE_TTL_INTERVALS = 3  # a stage's gauges expire after this many missed writes

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)

TTFT = "time_to_first_token_seconds"
ITL = "inter_token_latency_seconds"
E2E = "e2e_request_latency_seconds"
QUEUE = "request_queue_time_seconds"
HISTOGRAMS: dict[str, tuple[float, ...]] = {
    TTFT: TTFT_BUCKETS,
    ITL: ITL_BUCKETS,
    E2E: REQUEST_LATENCY_BUCKETS,
    QUEUE: REQUEST_LATENCY_BUCKETS,
}

STAGE_GAUGES = (
    "kv_blocks_total",
    "kv_blocks_used",
    "kv_blocks_fit",
    "kv_bytes_per_block",
    "step_seconds",
    "running",
    "waiting",
    "in_flight",
    "interval_s",
    "updated_at",
)


def pipeline_figures_key(pipeline_id: str) -> str:
    """Counters of one pipeline: ``hexgen:metrics:pipeline:<pid>``."""
    return f"{PIPELINE_FIGURES_PREFIX}{pipeline_id}"


def stage_figures_key(pipeline_id: str, stage: int) -> str:
    """Gauges of one stage: ``hexgen:metrics:stage:<pid>:<stage>``."""
    return f"{STAGE_FIGURES_PREFIX}{pipeline_id}:{stage}"


def success_field(finish_reason: str) -> str:
    return f"success:{finish_reason}"


def stage_field(stage: int, name: str) -> str:
    return f"stage:{stage}:{name}"


class Histogram:
    """Per-bucket counts (not cumulative; the last bucket is +Inf), sum and count of observations."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        """``n`` observations of ``value`` (negative values count as 0)."""
        value = max(0.0, float(value))
        self.counts[bisect.bisect_left(self.bounds, value)] += n  # a value equal to a bound belongs to it (le)
        self.sum += value * n
        self.count += n

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations ≤ it) per bucket, +Inf last: Prometheus' ``le`` buckets."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            total += n
            out.append((bound, total))
        return out

    def quantile(self, q: float) -> float | None:
        """Estimate of quantile ``q`` by linear interpolation inside its bucket (as Prometheus'
        ``histogram_quantile``); None without observations. The +Inf bucket answers with the last bound."""
        if self.count == 0:
            return None
        rank = q * self.count
        lower, seen = 0.0, 0
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            if n and seen + n >= rank:
                if math.isinf(bound):
                    return self.bounds[-1] if self.bounds else lower
                return lower + (bound - lower) * max(0.0, rank - seen) / n
            seen += n
            lower = bound
        return self.bounds[-1] if self.bounds else 0.0

    def minus(self, other: Histogram) -> Histogram:
        """The observations made between ``other`` (an earlier copy) and this one."""
        out = Histogram(self.bounds)
        out.counts = [max(0, a - b) for a, b in zip(self.counts, other.counts)]
        out.sum = max(0.0, self.sum - other.sum)
        out.count = max(0, self.count - other.count)
        return out

    def copy(self) -> Histogram:
        out = Histogram(self.bounds)
        out.counts, out.sum, out.count = list(self.counts), self.sum, self.count
        return out


@dataclass
class Tally:
    """Cumulative counters and histograms of one process, safe to update from several threads.

    ``snapshot()`` gives plain copies; :func:`counter_deltas` turns two snapshots into the HINCRBY fields.
    """

    ints: dict[str, int] = field(default_factory=dict)
    floats: dict[str, float] = field(default_factory=dict)
    hists: dict[str, Histogram] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.ints[name] = self.ints.get(name, 0) + n

    def add_float(self, name: str, x: float) -> None:
        with self._lock:
            self.floats[name] = self.floats.get(name, 0.0) + x

    def set_total(self, name: str, n: int) -> None:
        """A counter kept elsewhere (the scheduler's preemptions): its current cumulative value."""
        with self._lock:
            self.ints[name] = n

    def set_total_float(self, name: str, x: float) -> None:
        with self._lock:
            self.floats[name] = x

    def observe(self, hist: str, value: float, n: int = 1) -> None:
        with self._lock:
            h = self.hists.get(hist)
            if h is None:
                h = self.hists[hist] = Histogram(HISTOGRAMS[hist])
            h.observe(value, n)

    def merge(self, other: Tally) -> None:
        """Add ``other``'s counts (a batch gathered without the lock) in one step: a snapshot sees all or none."""
        with self._lock:
            for k, n in other.ints.items():
                self.ints[k] = self.ints.get(k, 0) + n
            for k, x in other.floats.items():
                self.floats[k] = self.floats.get(k, 0.0) + x
            for k, h in other.hists.items():
                mine = self.hists.get(k)
                if mine is None:
                    self.hists[k] = h.copy()
                else:
                    mine.counts = [a + b for a, b in zip(mine.counts, h.counts)]
                    mine.sum += h.sum
                    mine.count += h.count

    def snapshot(self) -> Tally:
        with self._lock:
            return Tally(dict(self.ints), dict(self.floats), {k: h.copy() for k, h in self.hists.items()})


def counter_deltas(now: Tally, before: Tally) -> tuple[dict[str, int], dict[str, float]]:
    """HINCRBY and HINCRBYFLOAT fields that bring Redis from ``before`` to ``now`` (zero changes left out)."""
    ints = {k: v - before.ints.get(k, 0) for k, v in now.ints.items()}
    floats = {k: v - before.floats.get(k, 0.0) for k, v in now.floats.items()}
    for name, h in now.hists.items():
        d = h.minus(before.hists.get(name) or Histogram(h.bounds))
        for i, n in enumerate(d.counts):
            ints[f"h:{name}:{i}"] = n
        ints[f"h:{name}:count"] = d.count
        floats[f"h:{name}:sum"] = d.sum
    return {k: v for k, v in ints.items() if v}, {k: v for k, v in floats.items() if v}


def _num(v: Any) -> float:
    try:
        return float(as_text(v))
    except ValueError:
        return 0.0


@dataclass
class PipelineFigures:
    """One pipeline's counters as read back from Redis."""

    pipeline: str
    model: str = ""
    success: dict[str, int] = field(default_factory=dict)  # finish_reason -> requests
    counters: dict[str, float] = field(default_factory=dict)  # prompt_tokens, generation_tokens, ...
    stage_steps: dict[int, int] = field(default_factory=dict)
    stage_step_seconds: dict[int, float] = field(default_factory=dict)
    hists: dict[str, Histogram] = field(default_factory=dict)


def parse_pipeline_figures(pipeline_id: str, raw: Mapping[Any, Any]) -> PipelineFigures:
    """Decode a ``hexgen:metrics:pipeline:<pid>`` hash; unknown or malformed fields are skipped."""
    out = PipelineFigures(pipeline_id)
    for k, v in raw.items():
        key = as_text(k)
        parts = key.split(":")
        if key == "model":
            out.model = as_text(v)
        elif parts[0] == "success" and len(parts) == 2:
            out.success[parts[1]] = int(_num(v))
        elif parts[0] == "stage" and len(parts) == 3 and parts[1].isdigit():
            _stage_counter(out, int(parts[1]), parts[2], v)
        elif parts[0] == "h" and len(parts) == 3 and parts[1] in HISTOGRAMS:
            _histogram_field(out, parts[1], parts[2], v)
        elif len(parts) == 1:
            out.counters[key] = _num(v)
    return out


def _stage_counter(out: PipelineFigures, stage: int, name: str, v: Any) -> None:
    if name == "steps":
        out.stage_steps[stage] = int(_num(v))
    elif name == "step_seconds":
        out.stage_step_seconds[stage] = _num(v)


def _histogram_field(out: PipelineFigures, name: str, part: str, v: Any) -> None:
    h = out.hists.get(name)
    if h is None:
        h = out.hists[name] = Histogram(HISTOGRAMS[name])
    if part == "sum":
        h.sum = _num(v)
    elif part == "count":
        h.count = int(_num(v))
    elif part.isdigit() and int(part) < len(h.counts):
        h.counts[int(part)] = int(_num(v))


def parse_stage_figures(raw: Mapping[Any, Any]) -> dict[str, float]:
    """Decode a ``hexgen:metrics:stage:<pid>:<stage>`` hash into its known gauges."""
    fields = {as_text(k): v for k, v in raw.items()}
    return {name: _num(fields[name]) for name in STAGE_GAUGES if name in fields}


def split_stage_key(key: Any) -> tuple[str, int] | None:
    """(pipeline id, stage) of a stage figures key, or None when it is not one."""
    rest = as_text(key)[len(STAGE_FIGURES_PREFIX) :]
    pid, _, stage = rest.rpartition(":")
    return (pid, int(stage)) if pid and stage.isdigit() else None
