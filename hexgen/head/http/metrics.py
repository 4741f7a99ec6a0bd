"""``GET /metrics``: one Prometheus scrape target for the whole cluster (docs/metrics.md lists every metric).

Each scrape reads the cluster from Redis (:func:`~hexgen.head.http.cluster.read_cluster`: the registry, the
figures the stage leaders publish, the error counters, the dead-letter count) and adds this head's
own figures: its HTTP routes' counters (``ctx.counters``) and the process collectors of prometheus-client.
Names are in the ``hexgen_`` namespace and follow vLLM's where vLLM has the metric.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

import hexgen
from hexgen.head.http.cluster import ClusterSnapshot, read_cluster
from hexgen.wire import figures as F

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from hexgen.head.http.context import HttpContext, HttpCounters

log = logging.getLogger(__name__)

NS = "hexgen_"
HISTOGRAM_HELP = {
    F.TTFT: "Time from the head receiving a request to its first token, in seconds.",
    F.ITL: "Time between consecutive output tokens of a request, in seconds.",
    F.E2E: "Time from the head receiving a request to its last output, in seconds.",
    F.QUEUE: "Time from the head receiving a request to a pipeline's engine taking it, in seconds.",
}
PIPE = ["model_name", "pipeline"]
STAGE = ["model_name", "pipeline", "stage"]
VLLM_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}  # ours -> vLLM's labels
SIZE_HELP = {
    "request_prompt_tokens": "Prompt tokens of the requests answered over HTTP.",
    "request_generation_tokens": "Tokens generated for the requests answered over HTTP (all choices).",
    "request_params_n": "The n (choices) of the requests answered over HTTP.",
    "request_params_max_tokens": "The max_tokens of the requests answered over HTTP that set it.",
}


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class _Builder:
    """The families of one scrape, in the order they are declared."""

    def __init__(self) -> None:
        self.out: list[Metric] = []

    def counter(self, name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
        m = CounterMetricFamily(NS + name, doc, labels=labels)
        self.out.append(m)
        return m

    def gauge(self, name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
        m = GaugeMetricFamily(NS + name, doc, labels=labels)
        self.out.append(m)
        return m


def cluster_families(snap: ClusterSnapshot, http_errors: dict[tuple[str, int], int] | None = None) -> list[Metric]:
    """Metric families of one cluster snapshot (all but the head's own); ``http_errors`` (this head's HTTP
    error responses by (endpoint, status)) adds its 4xx to ``request_errors``."""
    b = _Builder()
    _request_families(b, snap)
    _stage_families(b, snap)
    _registry_families(b, snap, http_errors or {})
    return b.out


def _request_families(b: _Builder, snap: ClusterSnapshot) -> None:
    """The pipelines' counters and histograms (the last-stage leaders' request timings)."""
    success = b.counter(
        "request_success", "Requests finished by a pipeline, by finish_reason.", PIPE + ["finish_reason"]
    )
    plain = {
        "prompt_tokens": b.counter("prompt_tokens", "Prompt tokens of finished requests.", PIPE),
        "generation_tokens": b.counter("generation_tokens", "Tokens generated.", PIPE),
        "preemptions": b.counter("num_preemptions", "Sequences preempted (KV cache full) and recomputed later.", PIPE),
        "prefix_cache_evictions": b.counter(
            "prefix_cache_evictions", "Cached KV blocks evicted to make room (least recently used first).", PIPE
        ),
        "takeovers": b.counter(
            "takeovers",
            "Work entries this pipeline claimed after their lease lapsed (a dead or restarted pipeline's requests).",
            PIPE,
        ),
    }
    steps = b.counter("stage_steps", "Forward passes (micro-batches) this stage ran.", STAGE)
    step_s = b.counter("stage_step_seconds", "Time this stage spent in its forward passes, in seconds.", STAGE)
    hists = {name: HistogramMetricFamily(NS + name, doc, labels=PIPE) for name, doc in HISTOGRAM_HELP.items()}
    for pid, p in sorted(snap.pipelines.items()):
        lv = [p.model, pid]
        by_label: dict[str, float] = {}  # eos and stop are both vLLM's stop
        for reason, n in p.success.items():
            label = VLLM_FINISH.get(reason, reason)
            by_label[label] = by_label.get(label, 0.0) + n
        for label, count in sorted(by_label.items()):
            success.add_metric(lv + [label], count)
        for field, fam in plain.items():
            fam.add_metric(lv, p.counters.get(field, 0.0))
        for stage, n in sorted(p.stage_steps.items()):
            steps.add_metric([p.model, pid, str(stage)], n)
        for stage, x in sorted(p.stage_step_seconds.items()):
            step_s.add_metric([p.model, pid, str(stage)], x)
        for name, hist in hists.items():
            h = p.hists.get(name) or F.Histogram(F.HISTOGRAMS[name])
            hist.add_metric(lv, [(_le(bound), n) for bound, n in h.cumulative()], sum_value=h.sum)
    b.out.extend(hists.values())


def _stage_families(b: _Builder, snap: ClusterSnapshot) -> None:
    """The stage leaders' gauges: KV blocks and step time per stage, the scheduler's figures per pipeline."""
    used = b.gauge(
        "kv_blocks_used", "KV cache blocks in use (stage 0's block manager: the same on every stage).", STAGE
    )
    per_stage = {
        "kv_blocks_total": b.gauge("kv_blocks_total", "KV cache blocks allocated on this stage.", STAGE),
        "kv_blocks_fit": b.gauge(
            "kv_blocks_fit",
            "KV cache blocks this stage alone would have room for (the smallest stage bounds kv_blocks_total).",
            STAGE,
        ),
        "step_seconds": b.gauge(
            "stage_step_time_seconds",
            "Mean forward time of this stage over the latest publishing interval that had steps.",
            STAGE,
        ),
    }
    usage = b.gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).", STAGE)
    per_pipeline = {
        "running": b.gauge("num_requests_running", "Requests in the pipeline's running batch.", PIPE),
        "waiting": b.gauge(
            "num_requests_waiting",
            "Requests admitted by the pipeline, waiting for KV blocks or a batch slot.",
            PIPE,
        ),
        "in_flight": b.gauge(
            "micro_batches_in_flight",
            "Micro-batches launched by stage 0 whose results have not come back yet.",
            PIPE,
        ),
    }
    # Stage 0's block manager decides prefix reuse for every stage: each stage reuses what it says.
    queries = b.counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", STAGE)
    hits = b.counter("prefix_cache_hits", "Prompt tokens whose K/V the prefix cache supplied.", STAGE)
    cached = b.gauge("prefix_cache_blocks", "KV blocks registered in the prefix cache (stage 0's).", STAGE)
    for (pid, stage), g in sorted(snap.stages.items()):
        pipe = snap.pipelines.get(pid)
        model = pipe.model if pipe is not None else ""
        lv = [model, pid, str(stage)]
        counters = snap.pipelines[pid].counters if pid in snap.pipelines else {}
        if "prefix_cache_queries" in counters:
            queries.add_metric(lv, counters["prefix_cache_queries"])
            hits.add_metric(lv, counters.get("prefix_cache_hits", 0.0))
        if "prefix_cache_blocks" in snap.stages.get((pid, 0), {}):
            cached.add_metric(lv, snap.stages[(pid, 0)]["prefix_cache_blocks"])
        for field, fam in per_stage.items():
            if field in g:
                fam.add_metric(lv, g[field])
        if stage == 0 and "running" in g:
            for field, fam in per_pipeline.items():
                fam.add_metric([model, pid], g.get(field, 0.0))
        lead = snap.stages.get((pid, 0), {})  # every stage holds stage 0's block tables
        if "kv_blocks_used" in lead and g.get("kv_blocks_total"):
            used.add_metric(lv, lead["kv_blocks_used"])
            usage.add_metric(lv, lead["kv_blocks_used"] / g["kv_blocks_total"])


def _registry_families(b: _Builder, snap: ClusterSnapshot, http_errors: dict[tuple[str, int], int]) -> None:
    """Heartbeats, pipeline states and queues from the registry; error and dead-letter counts."""
    rank_labels = ["pipeline", "stage", "rank", "tp_rank", "host", "device"]
    age = b.gauge(
        "worker_heartbeat_age_seconds", "Seconds since the rank's last heartbeat (live ranks only).", rank_labels
    )
    alive = b.gauge("worker_alive", "1 while the rank's heartbeat key exists, else 0.", rank_labels)
    for w in snap.status.workers:
        r = w.record
        rank = r.extra.get("rank", w.id.rpartition(":")[2])
        lv = [r.pipeline, str(r.stage), rank, str(r.tp_rank), r.host, r.device]
        alive.add_metric(lv, 1.0 if w.alive else 0.0)
        if w.heartbeat_age_s is not None:
            age.add_metric(lv, w.heartbeat_age_s)
    state = b.gauge(
        "pipeline_state",
        "1 for the pipeline's registry state (forming, ready, degraded, stopped).",
        ["pipeline", "state"],
    )
    for p in snap.status.pipelines:
        state.add_metric([p.id, p.state], 1.0)
    depth = b.gauge("queue_depth", "Entries queued or pending in a stream's consumer group.", ["stream", "group"])
    pending = b.gauge("queue_pending", "Entries delivered to a consumer and not yet acked.", ["stream", "group"])
    for q in snap.status.queues:
        depth.add_metric([q.stream, q.group], q.depth)
        pending.add_metric([q.stream, q.group], q.pending)
    errors = b.counter(
        "request_errors",
        "Error events written to result streams (requests refused by a head, dead letters), by code.",
        ["code"],
    )
    codes = dict(snap.head_errors)
    for (_, status), n in http_errors.items():
        if 400 <= status < 500:
            codes[f"http_{status}"] = codes.get(f"http_{status}", 0) + n
    for code, n in sorted(codes.items()):
        errors.add_metric([code], n)
    dead = b.counter("dead_letters", "Entries moved to hexgen:deadletter (by heads and pipelines).", [])
    dead.add_metric([], snap.dead_letters)


def head_families(counters: HttpCounters) -> list[Metric]:
    """This head's HTTP routes: requests by outcome and errors by status (OpenAI routes only)."""
    req = CounterMetricFamily(
        NS + "http_requests",
        "Generation requests this head answered over HTTP, by endpoint and outcome.",
        labels=["endpoint", "outcome"],
    )
    for (endpoint, outcome), n in sorted(counters.requests.items()):
        req.add_metric([endpoint, outcome], n)
    err = CounterMetricFamily(
        NS + "http_errors", "HTTP error responses of the generation routes, by status.", labels=["endpoint", "status"]
    )
    for (endpoint, status), n in sorted(counters.errors.items()):
        err.add_metric([endpoint, str(status)], n)
    prompt = CounterMetricFamily(NS + "http_prompt_tokens", "Prompt tokens of HTTP requests.", labels=[])
    prompt.add_metric([], counters.prompt_tokens)
    completion = CounterMetricFamily(NS + "http_completion_tokens", "Completion tokens sent over HTTP.", labels=[])
    completion.add_metric([], counters.completion_tokens)
    flight = GaugeMetricFamily(
        NS + "http_requests_in_flight", "Generation requests being served over HTTP now.", labels=[]
    )
    flight.add_metric([], counters.in_flight)
    sizes = []
    for name, h in counters.sizes.items():
        fam = HistogramMetricFamily(NS + name, SIZE_HELP[name], labels=[])
        fam.add_metric([], [(_le(bound), n) for bound, n in h.cumulative()], sum_value=h.sum)
        sizes.append(fam)
    build = GaugeMetricFamily(NS + "build_info", "1, labelled with this head's HexGen version.", labels=["version"])
    build.add_metric([hexgen.__version__], 1.0)
    return [req, err, prompt, completion, flight, *sizes, build]


class _Families:
    """A collector that yields whatever families were handed to it last (one scrape's)."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return list(self.families)


class MetricsEndpoint:
    """The ``/metrics`` route of one app: its own registry (process collectors + this scrape's families)."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self.registry = CollectorRegistry(auto_describe=False)
        for make in (ProcessCollector, PlatformCollector, GCCollector):
            make(registry=self.registry)
        self._families = _Families()
        self.registry.register(self._families)

    async def render(self) -> bytes:
        families = head_families(self.ctx.counters)
        up = GaugeMetricFamily(NS + "redis_up", "1 when this scrape could read the cluster from Redis.", labels=[])
        try:
            snap = await read_cluster(self.ctx.redis, self.ctx.settings.limits.heartbeat_ttl_s)
            families += cluster_families(snap, dict(self.ctx.counters.errors))
            up.add_metric([], 1.0)
        except (RedisError, OSError) as e:
            log.warning("/metrics: cannot read the cluster from Redis: %s", e)
            up.add_metric([], 0.0)
        families.append(up)
        self._families.families = families  # no await between this and generate_latest: one scrape at a time
        try:
            return generate_latest(self.registry)
        finally:
            self._families.families = []


def install(app: Starlette, ctx: HttpContext) -> None:
    """Add ``GET /metrics`` to ``app``."""
    endpoint = MetricsEndpoint(ctx)

    async def metrics(request: Request) -> Response:
        return Response(await endpoint.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_route("/metrics", metrics, methods=["GET"])
