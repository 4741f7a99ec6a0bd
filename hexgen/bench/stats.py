"""Per-request timings and their summaries."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestTiming:
    """Host-clock (time.monotonic) stamps of one request: when offered, and when each token arrived."""

    offered: float
    tokens: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.tokens[0] - self.offered

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if len(self.tokens) < 2:
            return None
        return (self.tokens[-1] - self.tokens[0]) / (len(self.tokens) - 1)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    v = sorted(values)
    if not v:
        return None
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(timings: list[RequestTiming]) -> dict:
    """Output tokens/s over the span from the first offer to the last token, and TTFT/TPOT percentiles."""
    start = min(t.offered for t in timings)
    end = max(t.tokens[-1] for t in timings)
    n_out = sum(len(t.tokens) for t in timings)
    ttft = [t.ttft for t in timings]
    tpot = [t.tpot for t in timings if t.tpot is not None]
    ms = lambda x: None if x is None else round(1e3 * x, 3)  # noqa: E731
    return {
        "requests": len(timings),
        "output_tokens": n_out,
        "span_s": round(end - start, 4),
        "output_tokens_per_s": round(n_out / (end - start), 2),
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p99_ms": ms(percentile(ttft, 99)),
        "tpot_p50_ms": ms(percentile(tpot, 50)),
        "tpot_p99_ms": ms(percentile(tpot, 99)),
    }
