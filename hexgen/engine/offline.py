"""Offline generation: a fixed list of requests through a local pipeline, results back over a pipe."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import torch

from hexgen.config import EngineConfig, Layout
from hexgen.engine.launcher import start_ranks, wait_ranks
from hexgen.engine.report import RankReport
from hexgen.engine.runner import ModelSpec
from hexgen.engine.types import Request, RequestSource, StepOutput


class ListSource:
    """Hands out a fixed list of requests, then reports exhausted."""

    def __init__(self, requests: list[dict]) -> None:
        self._pending = [Request.from_dict(r) for r in requests]

    def poll(self, max_requests: int, timeout_s: float) -> list[Request]:
        out, self._pending = self._pending[:max_requests], self._pending[max_requests:]
        return out

    def poll_cancelled(self) -> list[str]:
        return []

    def finished(self, request_id: str) -> None:
        pass  # nothing to release: the parent collects results from the sink

    def exhausted(self) -> bool:
        return not self._pending

    def close(self) -> None:
        pass


class PipeSink:
    """Sends each step's outputs (msgpack) to the parent process over a multiprocessing pipe."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def emit(self, outputs: list[StepOutput]) -> None:
        rows = []
        for o in outputs:
            row = {k: v for k, v in o.__dict__.items() if k != "logits"}
            if o.logits is not None:
                row["logits"] = o.logits.float().numpy().tobytes()
            rows.append(row)
        self.conn.send_bytes(msgpack.packb(rows, use_bin_type=True))

    def close(self) -> None:
        self.conn.send_bytes(msgpack.packb(None))
        self.conn.close()


def _decode_outputs(data: bytes) -> list[StepOutput] | None:
    rows = msgpack.unpackb(data, raw=False)
    if rows is None:
        return None
    out = []
    for r in rows:
        logits = r.pop("logits", None)
        o = StepOutput(**r)
        if logits is not None:
            o.logits = torch.frombuffer(bytearray(logits), dtype=torch.float32)
        out.append(o)
    return out


@dataclass
class Completion:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied
    logits: list[torch.Tensor] = field(default_factory=list)  # per generated token (collect_logits)


def run_offline(
    layout: Layout,
    model: ModelSpec,
    engine: EngineConfig,
    requests: list[Request],
    on_output: Callable[[StepOutput], None] | None = None,
    devices: list[int] | None = None,
    source: RequestSource | None = None,
    on_report: Callable[[RankReport], None] | None = None,
) -> dict[str, Completion]:
    """Generate every request on a local pipeline; returns completions by request id.

    ``source`` (picklable) replaces the default ListSource of ``requests``, e.g. to release them in phases
    (benchmarks); ``requests`` must still list every request it will hand out. ``on_report`` gets each
    rank's RankReport (peak memory, KV capacity) once that rank has finished.
    """
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    reports = ctx.SimpleQueue() if on_report is not None else None
    source = source if source is not None else ListSource([r.to_dict() for r in requests])
    results = {r.request_id: Completion(r.request_id) for r in requests}
    procs = start_ranks(
        layout,
        model,
        engine,
        _Factory(source),
        _Factory(PipeSink(send)),
        devices,
        _QueueReport(reports) if reports is not None else None,
    )
    send.close()

    def drain() -> None:
        while reports is not None and on_report is not None and not reports.empty():
            on_report(RankReport.from_dict(reports.get()))
        while recv.poll(0.05):
            try:
                outs = _decode_outputs(recv.recv_bytes())
            except EOFError:
                return
            for o in outs or []:
                c = results[o.request_id]
                c.token_ids += o.ids
                c.text += o.text
                c.prompt_tokens = o.prompt_tokens
                c.cached_tokens = o.cached_tokens
                c.finish_reason = o.finish_reason or c.finish_reason
                if o.logits is not None:
                    c.logits.append(o.logits)
                if on_output is not None:
                    on_output(o)

    wait_ranks(procs, on_tick=drain)
    return results


class _QueueReport:
    """A picklable report callback of a rank: puts the RankReport (as a dict) on a queue to the parent."""

    def __init__(self, queue) -> None:
        self.queue = queue

    def __call__(self, report: RankReport) -> None:
        self.queue.put(report.to_dict())


class _Factory:
    """A picklable zero-argument factory returning a prepared object."""

    def __init__(self, obj) -> None:
        self.obj = obj

    def __call__(self):
        return self.obj
