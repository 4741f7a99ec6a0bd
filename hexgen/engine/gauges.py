"""Live figures one rank's engine exposes to whoever runs it (the worker publishes them; no Redis here).

The engine loop writes plain attributes of a :class:`StageGauges`; another thread of the same process reads
them (single int/float attribute writes are atomic in CPython, and a reader only needs a recent value).

Importing this module imports no torch: a worker rank imports it before it blocks SIGTERM, and torch's
import starts threads that would otherwise take the signal (workers/rank.py).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SUMMARY_EVERY_S = 0.5  # how often the stage-0 leader snapshots its cached block hashes for dispatch
SUMMARY_HASHES = 8192  # the most hashes a snapshot holds (hexgen.wire.prefix_summary.MAX_SUMMARY_HASHES)


class StepTimer:
    """Wall time of a stage's forward passes, summed.

    On CPU the host time of each call. On CUDA the device time between two events recorded around the
    call on the current stream, read without a host sync: finished pairs are collected on later calls
    (``event.query()``), so figures lag by a step or two.
    """

    def __init__(self) -> None:
        self.steps = 0
        self.seconds = 0.0
        self._pending: deque[tuple[Any, Any]] = deque()

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        import torch

        def timed(plan: Any, x: torch.Tensor) -> torch.Tensor:
            if x.device.type != "cuda":
                t0 = time.perf_counter()
                out = fn(plan, x)
                self.seconds += time.perf_counter() - t0
                self.steps += 1
                return out
            self._collect()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(plan, x)
            end.record()
            self._pending.append((start, end))
            return out

        return timed

    def _collect(self) -> None:
        while self._pending and self._pending[0][1].query():
            start, end = self._pending.popleft()
            self.seconds += start.elapsed_time(end) / 1000.0
            self.steps += 1


@dataclass
class StageGauges:
    """What one stage leader's engine shows of itself. KV blocks are the stage's allocated cache (the same
    count on every stage: stage 0's block manager hands each sequence one block table for all stages);
    ``kv_blocks_fit`` is what this rank alone would have fitted. The scheduler figures (``running``,
    ``waiting``, ``in_flight``, ``kv_blocks_used``, ``preemptions`` and the prefix cache's) are kept by the
    stage-0 leader only: its block manager decides reuse for every stage."""

    kv_blocks_total: int = 0
    kv_blocks_fit: int = 0
    kv_bytes_per_block: int = 0
    kv_blocks_used: int = 0
    running: int = 0
    waiting: int = 0
    in_flight: int = 0  # micro-batches launched whose results stage 0 has not applied yet
    preemptions: int = 0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache at admission (stage 0)
    prefix_hits: int = 0  # of those, tokens whose K/V the cache supplied
    prefix_cached_blocks: int = 0  # blocks registered in the prefix cache
    prefix_evictions: int = 0  # cached blocks given to other tokens
    # what cache-aware dispatch publishes (None: the prefix cache is off): (seed, block size, room, hashes),
    # refreshed at most every SUMMARY_EVERY_S (a new tuple: readers on other threads see one whole)
    prefix_summary: tuple[int, int, int, list[int]] | None = None
    _summary_at: float = -1e9
    timer: StepTimer = field(default_factory=StepTimer)
    scheduler_known: bool = False  # True once the stage-0 leader wrote the scheduler figures

    def watch(self, runner: Any) -> None:
        """Take the stage's KV figures from its runner and time its forward passes from now on."""
        from hexgen.engine.kv_cache import kv_bytes_per_block

        self.kv_blocks_total = runner.num_blocks
        self.kv_blocks_fit = getattr(runner, "blocks_fit", runner.num_blocks)
        self.kv_bytes_per_block = kv_bytes_per_block(
            runner.cfg, runner.groups.stage, runner.n_kv_local, runner.engine.block_size, runner.dtype
        )
        runner.forward = self.timer.wrap(runner.forward)

    def observe_scheduler(self, scheduler: Any, in_flight: int) -> None:
        """Called by the stage-0 leader once per loop turn."""
        self.running = len(scheduler.running)
        self.waiting = len(scheduler.waiting)
        self.in_flight = in_flight
        self.kv_blocks_used = scheduler.blocks.num_blocks - scheduler.blocks.num_free
        self.preemptions = scheduler.stats.preemptions
        self.prefix_queries = scheduler.stats.prefix_queries
        self.prefix_hits = scheduler.stats.prefix_hits
        self.prefix_cached_blocks = scheduler.blocks.num_cached
        self.prefix_evictions = scheduler.blocks.evictions
        now = time.monotonic()
        if getattr(scheduler.blocks, "prefix_cache", False) and now - self._summary_at >= SUMMARY_EVERY_S:
            self._summary_at = now
            room = scheduler.max_num_seqs - len(scheduler.running) - len(scheduler.waiting)
            b = scheduler.blocks
            self.prefix_summary = (b.seed, b.block_size, room, b.held_hashes(SUMMARY_HASHES))
        self.scheduler_known = True
