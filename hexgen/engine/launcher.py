"""Start the ranks of one pipeline as local processes (one per rank) and watch them."""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

from hexgen.config import EngineConfig, Layout
from hexgen.engine.pipeline import RankSpec, run_rank
from hexgen.engine.runner import ModelSpec
from hexgen.engine.types import OutputSink, RequestSource
from hexgen.errors import HexGenError
from hexgen.procs import free_port

log = logging.getLogger(__name__)


class LaunchError(HexGenError):
    """A rank process failed."""


def start_ranks(
    layout: Layout,
    model: ModelSpec,
    engine: EngineConfig,
    source_factory: Callable[[], RequestSource],
    sink_factory: Callable[[], OutputSink],
    devices: list[int] | None = None,
    report: Callable | None = None,
) -> list[BaseProcess]:
    """Spawn every rank of ``layout`` on this host; rank 0 gets the source, the last leader the sink, and
    every rank ``report`` (picklable; see run_rank)."""
    init = f"tcp://127.0.0.1:{free_port()}"
    last = layout.stages()[-1].leader
    ctx = mp.get_context("spawn")
    procs: list[BaseProcess] = []
    for rank in range(layout.world_size):
        dev = devices[rank] if devices else None
        spec = RankSpec(rank, layout, model, engine, init, dev)
        p = ctx.Process(
            target=run_rank,
            name=f"hexgen-rank{rank}",
            daemon=False,
            args=(spec, source_factory if rank == 0 else None, sink_factory if rank == last else None, report),
        )
        p.start()
        procs.append(p)
    return procs


def stop_ranks(procs: list[BaseProcess], grace_s: float = 5.0) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def wait_ranks(procs: list[BaseProcess], on_tick: Callable[[], None] | None = None, tick_s: float = 0.05) -> None:
    """Wait for every rank; if one fails, stop the others and raise LaunchError."""
    try:
        while any(p.is_alive() for p in procs):
            if on_tick is not None:
                on_tick()
            else:
                time.sleep(tick_s)
            bad = [p for p in procs if p.exitcode not in (None, 0)]
            if bad:
                raise LaunchError(f"{bad[0].name} exited with code {bad[0].exitcode}")
        if on_tick is not None:
            on_tick()
        bad = [p for p in procs if p.exitcode != 0]
        if bad:
            raise LaunchError(f"{bad[0].name} exited with code {bad[0].exitcode}")
    finally:
        stop_ranks(procs)
