"""A stage leader's figures, published through Redis for the head's ``/metrics`` (hexgen/wire/figures.py).

The engine knows nothing of Redis: it fills a :class:`~hexgen.engine.gauges.StageGauges`, and the worker
wraps its request source and output sink:

- :class:`MeteredSource` (stage-0 leader) stamps ``meta["taken_at"]`` (wall clock) on every request the
  engine takes; the meta travels with the request to the last stage.
- :class:`MeteredSink` (last-stage leader) times each request from its outputs: time to first token and
  end-to-end latency from the head's ``meta["received_at"]``, inter-token latency between consecutive
  outputs, queue time from ``received_at`` to ``taken_at``; and counts finished requests by finish_reason
  and prompt / generation tokens. Times are taken when the engine hands the outputs to the sink (the
  Redis write follows within a millisecond or so). ``received_at`` is the head's clock: heads and workers
  on different hosts need synchronised clocks (NTP) for TTFT, queue time and e2e to be right.
- :class:`FiguresPublisher`, a thread on every stage leader, writes every ``interval_s``: the counters'
  changes since its last write (HINCRBY, one MULTI) and the stage's gauges (HSET with a TTL). A failed write
  is retried at the next interval with the changes accumulated meanwhile; a worker killed outright loses
  at most one interval of counts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from hexgen.engine.gauges import StageGauges
from hexgen.engine.types import Request, StepOutput
from hexgen.wire import figures as F
from hexgen.wire.prefix_summary import encode_summary, prefix_summary_key

log = logging.getLogger(__name__)

# requests whose last token time is kept (a request lost to another pipeline never finishes here)
_MAX_TRACKED = 100_000


class RequestTimer:
    """Per-request timings and counts from the outputs of the last stage, into a :class:`~F.Tally`."""

    def __init__(self, tally: F.Tally, clock: Callable[[], float] = time.time) -> None:
        self.tally = tally
        self.clock = clock
        self._last: dict[str, float] = {}  # request id -> when its latest token was handed over

    def observe(self, outputs: list[StepOutput]) -> None:
        """Runs on the engine loop (inside ``emit``), so it stays cheap: plain dict and int work per output,
        one merge into the shared tally per step; the inter-token gaps of a step are mostly one value."""
        now = self.clock()
        tokens = 0
        gaps: dict[float, int] = {}  # inter-token gap -> tokens
        t = F.Tally()  # the rarer figures (first tokens, finishes); reaches the shared tally with the rest
        for o in outputs:
            if o.ids:
                tokens += self._tokens(o, now, gaps, t)
            if o.finish_reason is not None:
                self._finished(o, now, t)
        if tokens:
            t.add("generation_tokens", tokens)
        for gap, n in gaps.items():
            t.observe(F.ITL, gap, n)
        self.tally.merge(t)
        last = self._last
        if len(last) > _MAX_TRACKED:
            for rid in list(last)[: len(last) // 2]:
                del last[rid]

    def _tokens(self, o: StepOutput, now: float, gaps: dict[float, int], t: F.Tally) -> int:
        """Time to first token or the gaps since the request's previous token; returns the token count."""
        n = len(o.ids)
        prev = self._last.get(o.request_id)
        if prev is not None:
            gap = (now - prev) / n
            gaps[gap] = gaps.get(gap, 0) + n
        elif o.seq == 0:
            received = _float((o.meta or {}).get("received_at"))
            if received is not None:
                t.observe(F.TTFT, now - received)
        self._last[o.request_id] = now
        return n

    def _finished(self, o: StepOutput, now: float, t: F.Tally) -> None:
        self._last.pop(o.request_id, None)
        t.add(F.success_field(o.finish_reason or ""))
        t.add("prompt_tokens", o.prompt_tokens)
        meta = o.meta or {}
        received = _float(meta.get("received_at"))
        if received is not None:
            t.observe(F.E2E, now - received)
            taken = _float(meta.get("taken_at"))
            if taken is not None:
                t.observe(F.QUEUE, taken - received)


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


class MeteredSink:
    """An output sink that times outputs (:class:`RequestTimer`) before handing them to ``inner``."""

    def __init__(self, inner: Any, timer: RequestTimer) -> None:
        self.inner = inner
        self.timer = timer
        if hasattr(inner, "lost"):
            self.lost = inner.lost  # optional OutputSink.lost: LastStage looks it up once

    def emit(self, outputs: list[StepOutput]) -> None:
        if outputs:
            try:
                self.timer.observe(outputs)
            except (TypeError, ValueError, KeyError) as e:  # figures must never stop serving
                log.warning("metrics: could not time outputs: %s", e)
        self.inner.emit(outputs)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class MeteredSource:
    """A request source that stamps ``meta["taken_at"]`` on the requests the engine takes from ``inner``."""

    def __init__(self, inner: Any, clock: Callable[[], float] = time.time) -> None:
        self.inner = inner
        self.clock = clock

    def poll(self, max_requests: int, timeout_s: float) -> list[Request]:
        out = self.inner.poll(max_requests, timeout_s)
        if out:
            now = self.clock()
            for req in out:
                req.meta["taken_at"] = now
        return out

    def poll_cancelled(self) -> list[str]:
        return self.inner.poll_cancelled()

    def finished(self, request_id: str) -> None:
        self.inner.finished(request_id)

    def exhausted(self) -> bool:
        return self.inner.exhausted()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class FiguresPublisher:
    """Writes one stage leader's counters and gauges to Redis every ``interval_s`` (module notes).

    ``client_factory(socket_timeout)`` makes the thread's own Redis connection. ``source`` is a callable
    returning the stage-0 leader's request source once it exists (its ``takeovers`` count), or None.
    """

    def __init__(
        self,
        client_factory: Callable[[float], redis.Redis],
        pipeline_id: str,
        stage: int,
        model: str,
        gauges: StageGauges,
        tally: F.Tally,
        interval_s: float = F.PUBLISH_INTERVAL_S,
        source: Callable[[], Any] | None = None,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s: {interval_s!r} must be > 0")
        self.pipeline_id, self.stage, self.model = pipeline_id, stage, model
        self.gauges, self.tally, self.interval_s = gauges, tally, interval_s
        self.source = source
        self._factory = client_factory
        self._r: redis.Redis | None = None
        self._published = F.Tally()
        self._step_mark = (0, 0.0)  # (steps, seconds) at the last write
        self._step_mean = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="figures", daemon=True)
        self.writes = 0

    def start(self) -> FiguresPublisher:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread after one last write (the counts of the final steps), and drop the stage's gauges."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        try:
            self.publish(final=True)
        except (redis.RedisError, OSError) as e:
            log.warning("metrics: last write failed: %s", e)
        if self._r is not None:
            self._r.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.publish()
            except (redis.RedisError, OSError) as e:
                log.debug("metrics: write failed (%s); retrying in %.1fs", e, self.interval_s)

    def _collect(self) -> F.Tally:
        g, t = self.gauges, self.tally
        t.set_total(F.stage_field(self.stage, "steps"), g.timer.steps)
        t.set_total_float(F.stage_field(self.stage, "step_seconds"), g.timer.seconds)
        if g.scheduler_known:
            t.set_total("preemptions", g.preemptions)
            t.set_total("prefix_cache_queries", g.prefix_queries)
            t.set_total("prefix_cache_hits", g.prefix_hits)
            t.set_total("prefix_cache_evictions", g.prefix_evictions)
        src = self.source() if self.source is not None else None
        takeovers = getattr(src, "takeovers", None)
        if isinstance(takeovers, int):
            t.set_total("takeovers", takeovers)
        return t.snapshot()

    def stage_fields(self) -> dict[str, str]:
        g = self.gauges
        steps, seconds = g.timer.steps, g.timer.seconds
        if steps > self._step_mark[0]:
            self._step_mean = (seconds - self._step_mark[1]) / (steps - self._step_mark[0])
        self._step_mark = (steps, seconds)
        out = {
            "kv_blocks_total": g.kv_blocks_total,
            "kv_blocks_fit": g.kv_blocks_fit,
            "kv_bytes_per_block": g.kv_bytes_per_block,
            "step_seconds": f"{self._step_mean:.6f}",
            "interval_s": self.interval_s,
            "updated_at": f"{time.time():.3f}",
        }
        if g.scheduler_known:
            out.update(kv_blocks_used=g.kv_blocks_used, running=g.running, waiting=g.waiting, in_flight=g.in_flight)
            out["prefix_cache_blocks"] = g.prefix_cached_blocks
        return {k: str(v) for k, v in out.items()}

    def publish(self, final: bool = False) -> None:
        """One write: counter changes (HINCRBY) and this stage's gauges, in one MULTI."""
        if self._r is None:
            self._r = self._factory(10.0)
        now = self._collect()
        ints, floats = F.counter_deltas(now, self._published)
        pkey, skey = F.pipeline_figures_key(self.pipeline_id), F.stage_figures_key(self.pipeline_id, self.stage)
        pipe = self._r.pipeline(transaction=True)
        for k, v in ints.items():
            pipe.hincrby(pkey, k, v)
        for k, x in floats.items():
            pipe.hincrbyfloat(pkey, k, x)
        pipe.hset(pkey, "model", self.model)
        pipe.expire(pkey, F.COUNTERS_TTL_S)
        pipe.sadd(F.PIPELINES_INDEX_KEY, self.pipeline_id)
        summary = self.gauges.prefix_summary if self.stage == 0 else None
        ttl_ms = int(self.interval_s * F.GAUGE_TTL_INTERVALS * 1000) + 1000
        if final:
            pipe.delete(skey)
            if self.stage == 0:  # a draining pipeline takes no more routed work
                pipe.delete(prefix_summary_key(self.model, self.pipeline_id))
        else:
            pipe.sadd(F.STAGES_INDEX_KEY, f"{self.pipeline_id}:{self.stage}")
            pipe.hset(skey, mapping=self.stage_fields())
            pipe.pexpire(skey, ttl_ms)
            if summary is not None:  # cache-aware dispatch: what this pipeline holds (hexgen.wire.prefix_summary)
                pkey_prefix = prefix_summary_key(self.model, self.pipeline_id)
                pipe.hset(pkey_prefix, mapping=encode_summary(*summary))
                pipe.pexpire(pkey_prefix, ttl_ms)
        pipe.execute()
        self._published = now
        self.writes += 1


class RankFigures:
    """What one rank adds for the figures: on a stage leader, the engine's gauges, metered source and sink
    factories and a publisher; elsewhere nothing (the factories pass through and ``gauges`` is None)."""

    def __init__(
        self,
        source_factory: Callable[[], Any] | None,
        sink_factory: Callable[[], Any] | None,
        *,
        leader: bool,
        pipeline_id: str,
        stage: int,
        model: str,
        interval_s: float,
        client_factory: Callable[[float], redis.Redis],
    ) -> None:
        self.gauges: StageGauges | None = None
        self.publisher: FiguresPublisher | None = None
        self.source_factory, self.sink_factory = source_factory, sink_factory
        if not leader:
            return
        self.gauges = StageGauges()
        tally = F.Tally()
        self._source: Any = None
        if source_factory is not None:

            def metered_source() -> MeteredSource:
                self._source = MeteredSource(source_factory())
                return self._source

            self.source_factory = metered_source
        if sink_factory is not None:
            self.sink_factory = lambda: MeteredSink(sink_factory(), RequestTimer(tally))
        self.publisher = FiguresPublisher(
            client_factory, pipeline_id, stage, model, self.gauges, tally, interval_s, source=lambda: self._source
        )

    def start(self) -> RankFigures:
        if self.publisher is not None:
            self.publisher.start()
        return self

    def stop(self) -> None:
        """Last write (the final steps' counts) and the stage's gauges removed."""
        if self.publisher is not None:
            self.publisher.stop()
