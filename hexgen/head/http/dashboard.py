"""``GET /``: the live cluster dashboard, ``GET /api/cluster``: the JSON it polls, ``/static/*``: its assets.

The page (``static/index.html``, ``app.js``, ``style.css``; package data, no CDN, no build step) draws each
pipeline as a row of its stages (TP degree, layers, the hosts and devices of its ranks, KV use, step time)
with the queue depth, tokens/s and TTFT p50/p99 over the last minute, refreshed every 1.5 s, and a chat box
that streams from ``/v1/chat/completions``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles

from hexgen.head.http.cluster import ClusterSnapshot, RecentWindow, read_cluster
from hexgen.wire import keys as C

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from hexgen.head.http.context import HttpContext

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
_LAYOUT = re.compile(r"hetero-config ([\d ]+) / pp-partition ([\d ]+)(?: / tp-ratio [\d: ]+)?")


def parse_layout(text: str) -> tuple[list[int], list[int]] | None:
    """(hetero_config, pp_partition) from a registry layout string (``Layout.describe()``), or None."""
    m = _LAYOUT.fullmatch(text.strip())
    if m is None:
        return None
    tp, layers = [int(x) for x in m.group(1).split()], [int(x) for x in m.group(2).split()]
    return (tp, layers) if len(tp) == len(layers) else None


def prefix_hit_rate(counters: dict[str, float]) -> float | None:
    """Prompt tokens the prefix cache supplied over those looked up (None before any lookup)."""
    queries = counters.get("prefix_cache_queries", 0.0)
    return counters.get("prefix_cache_hits", 0.0) / queries if queries else None


def cluster_view(snap: ClusterSnapshot, window: RecentWindow, model: str) -> dict[str, Any]:
    """The dashboard's JSON: pipelines with their stages, queues, recent rates (plain types only)."""
    pipelines = []
    for p in snap.status.pipelines:
        layout = parse_layout(p.layout or "")
        ranks = [w for w in snap.status.workers if w.record.pipeline == p.id]
        figures = snap.pipelines.get(p.id)
        lead = snap.stages.get((p.id, 0), {})
        stages = []
        tps, counts = layout or ([], [])
        if not layout:  # not formed yet: whatever stages its workers registered
            n = max((w.record.stage for w in ranks), default=-1) + 1
            tps, counts = [sum(w.record.stage == s for w in ranks) for s in range(n)], [0] * n
        first = 0
        for s, (tp, n_layers) in enumerate(zip(tps, counts)):
            g = snap.stages.get((p.id, s), {})
            total = int(g.get("kv_blocks_total", 0))
            used = int(lead["kv_blocks_used"]) if "kv_blocks_used" in lead and total else None
            stages.append(
                {
                    "stage": s,
                    "tp": tp,
                    "layers": n_layers,
                    "first_layer": first,
                    "last_layer": first + n_layers - 1,
                    "ranks": [
                        {
                            "rank": w.record.extra.get("rank", w.id.rpartition(":")[2]),
                            "tp_rank": w.record.tp_rank,
                            "host": w.record.host,
                            "device": w.record.device,
                            "alive": w.alive,
                            "heartbeat_age_s": w.heartbeat_age_s,
                        }
                        for w in sorted(ranks, key=lambda w: w.record.tp_rank)
                        if w.record.stage == s
                    ],
                    "kv_blocks_used": used,
                    "kv_blocks_total": total or None,
                    "kv_usage": used / total if used is not None and total else None,
                    "step_time_s": g.get("step_seconds"),
                    "steps": figures.stage_steps.get(s) if figures else None,
                    "live": bool(g),
                }
            )
            first += n_layers
        pipelines.append(
            {
                "id": p.id,
                "state": p.state,
                "layout": p.layout,
                "workers": p.workers,
                "alive_workers": p.alive_workers,
                "load": p.load,
                "stages": stages,
                "running": lead.get("running"),
                "waiting": lead.get("waiting"),
                "in_flight": lead.get("in_flight"),
                "finished": sum(figures.success.values()) if figures else 0,
                "generation_tokens": figures.counters.get("generation_tokens", 0) if figures else 0,
                "prefix_cache_hit_rate": prefix_hit_rate(figures.counters) if figures else None,
            }
        )
    work = [q for q in snap.status.queues if q.stream.startswith(C.WORK_STREAM_PREFIX)]
    return {
        "time": snap.time,
        "model": model,
        "pipelines": pipelines,
        "queues": [
            {"stream": q.stream, "group": q.group, "depth": q.depth, "pending": q.pending} for q in snap.status.queues
        ],
        "queue_depth": sum(q.depth for q in work),
        "recent": window.summary(),
        "errors": snap.head_errors,
        "dead_letters": snap.dead_letters,
    }


def install(app: Starlette, ctx: HttpContext) -> None:
    """Add ``GET /`` (the page), ``GET /api/cluster`` and ``/static`` to ``app``."""
    window = RecentWindow(60.0)
    index = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    async def page(request: Request) -> Response:
        return HTMLResponse(index)

    async def cluster(request: Request) -> Response:
        try:
            snap = await read_cluster(ctx.redis, ctx.settings.limits.heartbeat_ttl_s)
        except (RedisError, OSError) as e:
            log.warning("/api/cluster: cannot read the cluster from Redis: %s", e)
            return JSONResponse(
                {
                    "error": {
                        "message": f"Redis unavailable: {e}",
                        "type": "server_error",
                        "param": None,
                        "code": "redis_unavailable",
                    }
                },
                status_code=503,
            )
        window.add(snap)
        return JSONResponse(cluster_view(snap, window, ctx.model), headers={"Cache-Control": "no-store"})

    app.add_route("/", page, methods=["GET"])
    app.add_route("/api/cluster", cluster, methods=["GET"])
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
