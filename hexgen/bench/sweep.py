"""``hexgen bench sweep``: throughput at a Poisson request-rate sweep, and the highest rate within a TPOT SLO.

At each rate the same fixed-seed request mix arrives by a seeded Poisson process (hexgen.bench.workload
.poisson_offsets); the rates run one after another in one pipeline (after a warm-up phase), each starting
once the previous rate's requests have all finished. TTFT and TPOT count from each request's arrival.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hexgen.bench.engine_bench import run_engine
from hexgen.bench.memory import memory_lines, memory_summary
from hexgen.bench.modes import BenchSetup, device_info
from hexgen.bench.stats import summarize
from hexgen.bench.workload import Shape, make_requests, mixed_shapes, poisson_offsets
from hexgen.errors import ConfigError


def check_range(flag: str, value: tuple[int, int], lo: int = 1) -> None:
    """ConfigError naming ``flag`` unless ``lo ≤ MIN ≤ MAX``."""
    a, b = value
    if not lo <= a <= b:
        raise ConfigError(f"{flag}: {a} {b} must satisfy {lo} ≤ MIN ≤ MAX")


@dataclass(frozen=True)
class SweepOptions:
    """One sweep: request rates (per second), requests per rate, the mix and the p99 TPOT SLO."""

    rates: tuple[float, ...]
    num_requests: int = 64
    prompt_range: tuple[int, int] = (64, 512)
    output_range: tuple[int, int] = (32, 128)
    seed: int = 0
    tpot_slo_ms: float = 100.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "rates", tuple(float(r) for r in self.rates))
        if not self.rates:
            raise ConfigError("--rates: give at least one request rate (requests/s), e.g. --rates 1 2 4 8")
        for r in self.rates:
            if not (r > 0 and math.isfinite(r)):
                raise ConfigError(f"--rates: {r} must be a finite number of requests/s > 0")
        if len(set(self.rates)) != len(self.rates):
            raise ConfigError(f"--rates: {list(self.rates)} lists a rate twice")
        if self.num_requests < 1:
            raise ConfigError(f"--num-requests: {self.num_requests} must be ≥ 1")
        check_range("--prompt-range", self.prompt_range)
        check_range("--output-range", self.output_range, lo=2)  # TPOT needs two tokens
        if not (self.tpot_slo_ms > 0 and math.isfinite(self.tpot_slo_ms)):
            raise ConfigError(f"--tpot-slo-ms: {self.tpot_slo_ms} must be a finite number of ms > 0")


def max_rate_under_slo(rows: list[dict], slo_ms: float) -> float | None:
    """The highest swept rate such that it and every lower rate kept p99 TPOT under ``slo_ms``.

    Rates are taken in increasing order; the first one that misses the SLO (or has no TPOT sample) ends the
    search, so a lucky higher rate after a miss is not credited. None when the lowest rate already misses.
    """
    best = None
    for row in sorted(rows, key=lambda r: r["rate"]):
        p99 = row.get("tpot_p99_ms")
        if p99 is None or not p99 < slo_ms:
            break
        best = row["rate"]
    return best


def sweep(setup: BenchSetup, opts: SweepOptions) -> dict:
    """Run the sweep; returns one JSON-able dict (per-rate rows, the highest rate within the SLO, memory)."""
    cfg = setup.model.config()
    shapes = mixed_shapes(opts.num_requests, opts.prompt_range, opts.output_range, opts.seed)
    warm = make_requests([Shape(opts.prompt_range[0], 8)] * 4, cfg.vocab_size, "warm", seed=99)
    phases = [[(0.0, r) for r in warm]]
    per_rate = []
    for i, rate in enumerate(opts.rates):
        reqs = make_requests(shapes, cfg.vocab_size, f"rate{i}-", opts.seed)
        offsets = poisson_offsets(len(reqs), rate, opts.seed)
        phases.append(list(zip(offsets, reqs)))
        per_rate.append((rate, reqs, offsets))
    run = run_engine(setup.layout, setup.model, setup.engine, phases, setup.devices)
    rows = []
    for rate, reqs, offsets in per_rate:
        s = summarize([run.timings[r.request_id] for r in reqs])
        span = offsets[-1]
        row = {"rate": rate, "offered_rate": round((len(reqs) - 1) / span, 3) if span > 0 else None, **s}
        row["tpot_p99_under_slo"] = s["tpot_p99_ms"] is not None and s["tpot_p99_ms"] < opts.tpot_slo_ms
        rows.append(row)
    return {
        "mode": "sweep",
        "command": setup.command,
        **device_info(setup.engine),
        "layout": setup.layout.describe(),
        "workload": {
            "requests_per_rate": opts.num_requests,
            "prompt_range": list(opts.prompt_range),
            "output_range": list(opts.output_range),
            "seed": opts.seed,
            "arrivals": "poisson",
            "prompt_tokens": sum(x.prompt for x in shapes),
            "output_tokens": sum(x.output for x in shapes),
        },
        "engine_config": {
            "max_num_seqs": setup.engine.max_num_seqs,
            "max_num_batched_tokens": setup.engine.max_num_batched_tokens,
            "cuda_graphs": setup.engine.cuda_graphs,
        },
        "tpot_slo_ms": opts.tpot_slo_ms,
        "rates": rows,
        "max_rate_under_slo": max_rate_under_slo(rows, opts.tpot_slo_ms),
        "run_wall_s": round(run.wall_s, 2),
        "memory": memory_summary(run.ranks),
    }


def format_sweep(res: dict) -> str:
    """A short human-readable table of a sweep result."""
    lines = [
        f"hexgen bench sweep | {res['card']} | {res['dtype']} | {res['layout']} | {res['date']}",
        f"{'rate/s':>8}{'offered/s':>11}{'out tok/s':>11}{'TTFT p50':>11}{'TTFT p99':>11}"
        f"{'TPOT p50':>11}{'TPOT p99':>11}  p99 TPOT < {res['tpot_slo_ms']:g} ms",
    ]
    for r in res["rates"]:
        lines.append(
            f"{r['rate']:>8g}{str(r['offered_rate']):>11}{r['output_tokens_per_s']:>11}"
            f"{r['ttft_p50_ms']:>11}{r['ttft_p99_ms']:>11}{str(r['tpot_p50_ms']):>11}"
            f"{str(r['tpot_p99_ms']):>11}  {'yes' if r['tpot_p99_under_slo'] else 'no'}"
        )
    best = res["max_rate_under_slo"]
    lines.append(
        f"highest rate with p99 TPOT < {res['tpot_slo_ms']:g} ms: "
        + (f"{best:g} requests/s" if best is not None else "none of the swept rates")
    )
    lines += memory_lines(res["memory"])
    return "\n".join(lines)
