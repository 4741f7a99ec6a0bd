"""Peak memory per rank and KV capacity per stage, from the ranks' reports, for the bench JSON and table."""

from __future__ import annotations

from hexgen.engine.report import CUDA_PEAK, RankReport

KV_TARGET = 0.90  # KV capacity should reach this share of what the memory budget would allow


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def memory_summary(ranks: tuple[RankReport, ...] | list[RankReport]) -> dict:
    """Per rank: peak memory, weights, KV; per stage: KV tokens allocated, what the memory allows, ratio.

    On CPU the KV cache is sized by ``cpu_kv_tokens`` (not from memory), so "allows" and the ratio are None.
    """
    rows = []
    for r in ranks:
        rows.append(
            {
                "rank": r.rank,
                "stage": r.stage,
                "device": r.device,
                "peak_memory_MiB": _mib(r.peak_memory_bytes),
                "peak_memory_kind": r.peak_memory_kind,
                "peak_vs_device": (
                    round(r.peak_memory_bytes / r.memory_total_bytes, 3)
                    if r.memory_total_bytes and r.peak_memory_kind == CUDA_PEAK
                    else None
                ),
                "memory_budget_MiB": _mib(r.memory_budget_bytes),
                "weights_MiB": _mib(r.weight_bytes),
                "kv_tokens": r.kv_tokens,
                "kv_MiB": _mib(r.kv_bytes),
                "kv_tokens_memory_allows": r.kv_tokens_memory_allows,
            }
        )
    stages = []
    for s in sorted({r.stage for r in ranks}):
        mine = [r for r in ranks if r.stage == s]
        allows = [r.kv_tokens_memory_allows for r in mine if r.kv_tokens_memory_allows is not None]
        kv = min(r.kv_tokens for r in mine)
        best = min(allows) if allows else None
        stages.append(
            {
                "stage": s,
                "kv_tokens": kv,
                "kv_tokens_memory_allows": best,
                "kv_vs_memory_allows": round(kv / best, 3) if best else None,
                "kv_cache_dtype": mine[0].kv_cache_dtype,
                "kv_bytes_per_token": max(r.kv_bytes_per_token for r in mine),
            }
        )
    ratios = [float(st["kv_vs_memory_allows"]) for st in stages if st["kv_vs_memory_allows"] is not None]
    out = {
        "ranks": rows,
        "stages": stages,
        "kv_target": KV_TARGET,
        "kv_target_met": (min(ratios) >= KV_TARGET) if ratios else None,
    }
    if not ratios:
        out["note"] = (
            "CPU: the KV cache is sized by cpu_kv_tokens, not from memory, so the share of what "
            "memory would allow is n/a; peak is the rank process's RSS (interpreter and torch "
            "included)"
        )
    else:
        out["note"] = (
            "kv_tokens_memory_allows = (device memory × gpu_memory_fraction − this rank's weights) "
            "/ KV bytes per token; the gap is the activation reserve, the CUDA context and the "
            "pipeline-wide minimum over stages"
        )
    return out


def memory_lines(mem: dict) -> list[str]:
    """Table lines for :func:`memory_summary`."""
    out = []
    for r in mem["ranks"]:
        budget = f" of budget {r['memory_budget_MiB']} MiB" if r["memory_budget_MiB"] is not None else ""
        out.append(
            f"rank {r['rank']} (stage {r['stage']}, {r['device']}): peak {r['peak_memory_MiB']} MiB"
            f"{budget} [{r['peak_memory_kind']}]; weights {r['weights_MiB']} MiB; "
            f"KV {r['kv_tokens']} tokens = {r['kv_MiB']} MiB"
        )
    for s in mem["stages"]:
        allows = s["kv_tokens_memory_allows"]
        tail = (
            f"; memory allows {allows} -> {s['kv_vs_memory_allows']:.1%} (target ≥ {mem['kv_target']:.0%})"
            if allows
            else "; memory allows: n/a (CPU)"
        )
        out.append(
            f"stage {s['stage']}: KV capacity {s['kv_tokens']} tokens ({s['kv_cache_dtype']} cache, "
            f"{s['kv_bytes_per_token']} bytes per token per rank){tail}"
        )
    return out
