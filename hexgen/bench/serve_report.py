"""``hexgen bench serve``'s comparisons of the paths it drove, and its table."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hexgen.bench.memory import memory_lines
from hexgen.bench.stats import RequestTiming, percentile

if TYPE_CHECKING:
    from hexgen.bench.serve import _Item

THROUGHPUT_COST_TARGET = 0.03  # the Redis path may cost at most 3% of output tokens/s
TTFT_P50_TARGET_MS = 2.0  # ... and at most 2 ms of p50 TTFT


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1e3 * x, 3)


def client_lateness(items: list[_Item], timings: list[RequestTiming], sent: dict[str, float]) -> dict:
    """p50s of how late the client sent each request and of its TTFT counted from the send instead."""
    late = [sent[i.request.request_id] - t.offered for i, t in zip(items, timings)]
    from_send = [t.tokens[0] - sent[i.request.request_id] for i, t in zip(items, timings)]
    return {
        "client_send_late_p50_ms": _ms(percentile(late, 50)),
        "ttft_from_send_p50_ms": _ms(percentile(from_send, 50)),
    }


def paired_ttft_diff(
    direct: list[RequestTiming], redis: list[RequestTiming], redis_sent: list[float] | None = None
) -> dict:
    """Median over requests of (Redis-path TTFT − direct TTFT) of the same request (same prompt, same arrival
    offset): steadier than the difference of the two p50s, which may fall on requests of different prompt
    lengths. With ``redis_sent`` also counted from the client's send instead of the scheduled arrival."""
    diffs = [r.ttft - d.ttft for d, r in zip(direct, redis)]
    out = {"ttft_paired_diff_p50_ms": _ms(percentile(diffs, 50))}
    if redis_sent is not None:
        from_send = [(r.tokens[0] - s) - d.ttft for d, r, s in zip(direct, redis, redis_sent)]
        out["ttft_paired_diff_from_send_p50_ms"] = _ms(percentile(from_send, 50))
    return out


def versus(path: dict, base: dict) -> dict:
    """One path's throughput ratio and p50 TTFT / TPOT differences against another's."""

    def diff(key: str) -> float | None:
        return None if path[key] is None or base[key] is None else round(path[key] - base[key], 3)

    return {
        "throughput_ratio": round(path["output_tokens_per_s"] / base["output_tokens_per_s"], 4),
        "ttft_p50_diff_ms": diff("ttft_p50_ms"),
        "tpot_p50_diff_ms": diff("tpot_p50_ms"),
    }


def overhead(direct: dict, redis: dict) -> dict:
    """The Redis path against the direct engine, and whether the targets hold."""
    ratio = redis["output_tokens_per_s"] / direct["output_tokens_per_s"]
    ttft = redis["ttft_p50_ms"] - direct["ttft_p50_ms"]
    tpot = (
        redis["tpot_p50_ms"] - direct["tpot_p50_ms"]
        if redis["tpot_p50_ms"] is not None and direct["tpot_p50_ms"] is not None
        else None
    )
    return {
        "throughput_ratio": round(ratio, 4),
        "throughput_cost": round(1 - ratio, 4),
        "ttft_p50_diff_ms": round(ttft, 3),
        "tpot_p50_diff_ms": None if tpot is None else round(tpot, 3),
        "targets": {
            "throughput_cost_max": THROUGHPUT_COST_TARGET,
            "ttft_p50_diff_max_ms": TTFT_P50_TARGET_MS,
            "throughput_met": 1 - ratio <= THROUGHPUT_COST_TARGET,
            "ttft_met": ttft <= TTFT_P50_TARGET_MS,
        },
    }


def format_serve(res: dict) -> str:
    """A short human-readable table of a serve result."""
    cols = ("output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")
    rows = [
        f"hexgen bench serve | {res['card']} | {res['dtype']} | {res['layout']} | {res['date']} | "
        f"{res['workload']['requests']} requests, {res['workload']['arrivals']}; the direct engine given "
        f"{'token ids' if res['workload'].get('direct_input') == 'ids' else 'texts (tokenized on arrival)'}",
        f"{'':<8}" + "".join(f"{c:>22}" for c in cols),
    ]
    for name in ("direct", "redis", "http"):
        if name in res:
            rows.append(f"{name:<8}" + "".join(f"{str(res[name].get(c, '-')):>22}" for c in cols))
    o, t = res["overhead"], res["overhead"]["targets"]
    rows.append(
        f"Redis path: {o['throughput_ratio']:.3f}x direct throughput (cost {o['throughput_cost']:.1%}, "
        f"target ≤ {t['throughput_cost_max']:.0%}: {'met' if t['throughput_met'] else 'missed'}); "
        f"p50 TTFT {o['ttft_p50_diff_ms']:+.1f} ms (target ≤ {t['ttft_p50_diff_max_ms']:g} ms: "
        f"{'met' if t['ttft_met'] else 'missed'})"
    )
    if o.get("ttft_paired_diff_p50_ms") is not None:
        rows.append(
            f"per request (same prompt, same arrival): Redis TTFT − direct TTFT, median "
            f"{o['ttft_paired_diff_p50_ms']:+.1f} ms; from the client's send "
            f"{o['ttft_paired_diff_from_send_p50_ms']:+.1f} ms"
        )
    if res["redis"].get("client_send_late_p50_ms") is not None:
        rows.append(
            f"Redis path client: sent {res['redis']['client_send_late_p50_ms']:.2f} ms after the scheduled "
            f"arrival (p50; counted in its TTFT); TTFT from the send: p50 "
            f"{res['redis']['ttft_from_send_p50_ms']:.1f} ms"
        )
    if "http_overhead" in res:
        d, r = res["http_overhead"]["vs_direct"], res["http_overhead"]["vs_redis"]
        rows.append(
            f"HTTP path: {d['throughput_ratio']:.3f}x direct and {r['throughput_ratio']:.3f}x Redis-path "
            f"throughput; p50 TTFT {d['ttft_p50_diff_ms']:+.1f} ms vs direct, "
            f"{r['ttft_p50_diff_ms']:+.1f} ms vs Redis (per request, median: "
            f"{d['ttft_paired_diff_p50_ms']:+.1f} / {r['ttft_paired_diff_p50_ms']:+.1f} ms)"
        )
    rows += ["memory (direct run):"] + memory_lines(res["memory"])
    return "\n".join(rows)
