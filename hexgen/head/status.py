"""A snapshot of a HexGen deployment read from Redis: workers, pipelines and queue depths.

Read-only. Used by ``hexgen status`` and by the head's health watcher. Workers and pipelines are listed
with SCAN over ``hexgen:worker:*`` / ``hexgen:pipeline:*``; a worker is alive while its heartbeat key exists.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from hexgen.wire import figures as F
from hexgen.wire import keys as C
from hexgen.wire.protocol import ProtocolError
from hexgen.wire.records import PipelineRecord, WorkerRecord
from hexgen.wire.text import as_text


@dataclass(frozen=True)
class WorkerStatus:
    """One registered TP rank; ``heartbeat_age_s`` is None when its heartbeat key has expired."""

    id: str
    record: WorkerRecord
    alive: bool
    heartbeat_age_s: float | None


@dataclass(frozen=True)
class PipelineStatus:
    """One pipeline: registry state, its workers, and its load (work items it holds unacked)."""

    id: str
    state: str
    layout: str
    rendezvous: str
    workers: int
    alive_workers: int
    load: int
    prefix_hit_rate: float | None = None  # prompt tokens the prefix cache supplied / looked up (None: no lookup)


@dataclass(frozen=True)
class QueueStatus:
    """One stream and its consumer group: ``lag`` = entries not yet delivered (None: Redis can't tell)."""

    stream: str
    group: str
    length: int
    pending: int
    lag: int | None
    consumers: dict[str, int] = field(default_factory=dict)  # consumer -> pending

    @property
    def depth(self) -> int:
        """Queued + pending: what back-pressure counts (the stream length when lag is unknown)."""
        return self.pending + (self.lag if self.lag is not None else max(0, self.length - self.pending))


@dataclass(frozen=True)
class StatusReport:
    """Everything ``hexgen status`` shows."""

    time: float
    workers: tuple[WorkerStatus, ...]
    pipelines: tuple[PipelineStatus, ...]
    queues: tuple[QueueStatus, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def group_depth(length: int, groups: list[dict], group: str) -> int:
    """:attr:`QueueStatus.depth` of ``group`` from an XLEN and an XINFO GROUPS reply (no XINFO CONSUMERS)."""
    for g in groups:
        if as_text(g.get("name", b"")) == group:
            lag = g.get("lag")
            return QueueStatus("", group, length, int(g.get("pending") or 0), None if lag is None else int(lag)).depth
    return length


async def queue_status(r: Any, stream: str, group: str) -> QueueStatus:
    """Length, pending, lag and per-consumer pending of ``stream``'s ``group`` (zeros if either is missing)."""
    length = int(await r.xlen(stream))
    try:
        groups = await r.xinfo_groups(stream)
    except ResponseError:  # no such key
        return QueueStatus(stream, group, 0, 0, 0)
    for g in groups:
        if as_text(g.get("name", b"")) == group:
            lag = g.get("lag")
            consumers = {as_text(c["name"]): int(c["pending"]) for c in await r.xinfo_consumers(stream, group)}
            return QueueStatus(
                stream, group, length, int(g.get("pending") or 0), None if lag is None else int(lag), consumers
            )
    return QueueStatus(stream, group, length, 0, length)


async def _scan(r: Any, pattern: str) -> list[str]:
    return sorted({as_text(k) async for k in r.scan_iter(match=pattern, count=500)})


async def read_workers(
    r: Any, now: float | None = None, heartbeat_ttl_s: float = C.HEARTBEAT_TTL_S
) -> list[WorkerStatus]:
    """Every registered worker with its liveness and heartbeat age (malformed records are skipped)."""
    now = time.time() if now is None else now
    keys = await _scan(r, C.WORKER_KEY_PATTERN)
    if not keys:
        return []
    ids = [k[len(C.WORKER_KEY_PREFIX) :] for k in keys]
    async with r.pipeline(transaction=False) as p:
        for wid in ids:
            p.hgetall(C.worker_key(wid))
            p.get(C.heartbeat_key(wid))
            p.pttl(C.heartbeat_key(wid))
        replies = await p.execute(raise_on_error=False)
    out = []
    for i, wid in enumerate(ids):
        fields, beat, pttl = replies[3 * i : 3 * i + 3]
        if isinstance(fields, Exception) or not fields:
            continue
        try:
            record = WorkerRecord.from_fields(fields)
        except ProtocolError:
            continue
        alive = beat is not None and not isinstance(beat, Exception)
        age = None
        if alive:
            try:
                age = max(0.0, now - float(as_text(beat)))
            except ValueError:
                age = max(0.0, heartbeat_ttl_s - pttl / 1000.0) if isinstance(pttl, int) and pttl >= 0 else None
        out.append(WorkerStatus(wid, record, alive, age))
    return out


async def read_pipelines(r: Any, workers: list[WorkerStatus], work: list[QueueStatus]) -> list[PipelineStatus]:
    """Every pipeline in the registry or named by a worker, with its load from the work streams."""
    keys = await _scan(r, C.PIPELINE_KEY_PATTERN)
    records: dict[str, PipelineRecord] = {}
    for k in keys:
        try:
            fields = await r.hgetall(k)
        except ResponseError:  # not a hash
            continue
        records[k[len(C.PIPELINE_KEY_PREFIX) :]] = PipelineRecord.from_fields(fields)
    ids = sorted(set(records) | {w.record.pipeline for w in workers})
    out = []
    for pid in ids:
        rec = records.get(pid, PipelineRecord(state="unregistered"))
        mine = [w for w in workers if w.record.pipeline == pid]
        consumer = C.PIPELINE_CONSUMER_PREFIX + pid
        load = sum(q.consumers.get(consumer, q.consumers.get(pid, 0)) for q in work)
        hit_rate = await _prefix_hit_rate(r, pid)
        out.append(
            PipelineStatus(
                pid, rec.state, rec.layout, rec.rendezvous, len(mine), sum(w.alive for w in mine), load, hit_rate
            )
        )
    return out


async def _prefix_hit_rate(r: Any, pipeline_id: str) -> float | None:
    """The pipeline's prefix-cache hit rate from its published counters (hexgen.wire.figures)."""
    try:
        queries, hits = await r.hmget(F.pipeline_figures_key(pipeline_id), "prefix_cache_queries", "prefix_cache_hits")
    except ResponseError:  # not a hash
        return None
    try:
        q = int(as_text(queries)) if queries is not None else 0
        return int(as_text(hits or b"0")) / q if q > 0 else None
    except ValueError:
        return None


async def collect_status(r: Any, heartbeat_ttl_s: float = C.HEARTBEAT_TTL_S) -> StatusReport:
    """Read the registry and queues (works with redis.asyncio clients and fakeredis)."""
    now = time.time()
    workers = await read_workers(r, now, heartbeat_ttl_s)
    queues = [await queue_status(r, C.REQUESTS_STREAM, C.HEADS_GROUP)]
    for stream in await _scan(r, C.WORK_STREAM_PREFIX + "*"):
        if as_text(await r.type(stream)) == "stream":
            queues.append(await queue_status(r, stream, C.PIPELINES_GROUP))
    pipelines = await read_pipelines(r, workers, queues[1:])
    return StatusReport(now, tuple(workers), tuple(pipelines), tuple(queues))


def _age(a: float | None) -> str:
    return "dead" if a is None else f"{a:.1f}s"


def _mem(n: int) -> str:
    return f"{n / 2**30:.1f}GiB" if n else "-"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers)] + [fmt.format(*r) for r in rows]


def format_status(report: StatusReport) -> str:
    """Human-readable tables: pipelines, workers, queues."""
    lines = ["PIPELINES"]
    lines += (
        _table(
            ["id", "state", "layout", "workers", "load", "prefix hit"],
            [
                [
                    p.id,
                    p.state,
                    p.layout or "-",
                    f"{p.alive_workers}/{p.workers} alive",
                    str(p.load),
                    "-" if p.prefix_hit_rate is None else f"{100 * p.prefix_hit_rate:.1f}%",
                ]
                for p in report.pipelines
            ],
        )
        if report.pipelines
        else ["  (none)"]
    )
    lines += ["", "WORKERS"]
    lines += (
        _table(
            ["id", "pipeline", "stage", "rank", "host", "device", "memory", "heartbeat"],
            [
                [
                    w.id,
                    w.record.pipeline,
                    str(w.record.stage),
                    str(w.record.tp_rank),
                    w.record.host,
                    w.record.device,
                    _mem(w.record.memory),
                    _age(w.heartbeat_age_s),
                ]
                for w in report.workers
            ],
        )
        if report.workers
        else ["  (none)"]
    )
    lines += ["", "QUEUES"]
    lines += _table(
        ["stream", "group", "length", "pending", "queued"],
        [
            [q.stream, q.group, str(q.length), str(q.pending), "?" if q.lag is None else str(q.lag)]
            for q in report.queues
        ],
    )
    return "\n".join(lines)
