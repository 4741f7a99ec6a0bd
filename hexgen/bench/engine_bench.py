"""Time the engine through ``run_offline``: stamps taken in the parent as each token's output arrives."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from hexgen.bench.stats import RequestTiming
from hexgen.bench.workload import T_OFFERED, TimedSource
from hexgen.config import EngineConfig, Layout
from hexgen.engine.offline import run_offline
from hexgen.engine.report import RankReport
from hexgen.engine.runner import ModelSpec
from hexgen.engine.types import Request, StepOutput


@dataclass(frozen=True)
class EngineRun:
    """Timings by request id, the wall time of the whole run (process start and weight loading included)
    and every rank's report (peak memory, KV capacity), by rank."""

    timings: dict[str, RequestTiming]
    wall_s: float
    ranks: tuple[RankReport, ...]


def at_once(phases: list[list[Request]]) -> list[list[tuple[float, Request]]]:
    """Phases whose requests all arrive when their phase starts."""
    return [[(0.0, r) for r in p] for p in phases]


def run_engine(
    layout: Layout,
    model: ModelSpec,
    engine: EngineConfig,
    phases: list[list[tuple[float, Request]]],
    devices: list[int] | None = None,
    source: TimedSource | None = None,
) -> EngineRun:
    """Run every phase (the first is usually a warm-up) in one pipeline; each phase is a list of
    (arrival in seconds after the phase starts, request) and starts once the previous one has finished.
    TTFT and TPOT count from each request's scheduled arrival. ``source`` replaces the TimedSource of
    ``phases`` (one made from the same phases, e.g. a tokenizing one)."""
    timings: dict[str, RequestTiming] = {}
    reports: list[RankReport] = []
    progress = {"tokens": 0, "next": time.monotonic() + 30.0}

    def on_output(o: StepOutput) -> None:
        now = time.monotonic()
        progress["tokens"] += len(o.ids)
        if now >= progress["next"]:  # a heartbeat on stderr for long runs
            progress["next"] = now + 30.0
            print(f"bench: {progress['tokens']} tokens, {len(timings)} requests started", file=sys.stderr, flush=True)
        t = timings.get(o.request_id)
        if t is None:
            t = timings[o.request_id] = RequestTiming(float(o.meta[T_OFFERED]))
        t.tokens.extend([now] * len(o.ids))

    all_requests = [r for p in phases for _, r in p]
    t0 = time.monotonic()
    results = run_offline(
        layout,
        model,
        engine,
        all_requests,
        on_output=on_output,
        devices=devices,
        source=source or TimedSource(phases),
        on_report=reports.append,
    )
    wall = time.monotonic() - t0
    for r in all_requests:
        got = len(results[r.request_id].token_ids)
        if got != r.params.max_new_tokens:
            raise RuntimeError(
                f"bench: request {r.request_id} produced {got} tokens, expected "
                f"{r.params.max_new_tokens} ({results[r.request_id].finish_reason})"
            )
    return EngineRun(timings, wall, tuple(sorted(reports, key=lambda x: x.rank)))
