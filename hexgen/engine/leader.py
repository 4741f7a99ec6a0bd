"""The stage-0 leader's loop: take requests and cancellations from the source, schedule steps, send them
down the pipeline, apply what the last stage sampled.

One loop (``FirstLeader.run``) and a small strategy for how steps are launched and completed:

- ``PipelinedSteps`` (any layout): up to P micro-batches in flight. Each plan and its activations go down the
  pipeline and its result comes back from the last leader; a one-stage pipeline samples at once.
- ``AheadSteps`` (one-stage pipelines, ``runs_ahead``): step N+1 is launched, its decodes running ahead on
  step N's sampled ids still on the device, before step N's ids are waited for and applied, so the host's
  work between steps overlaps the device's. With TP > 1 the followers get each plan as before and each
  step's sampled ids by a device broadcast, in the same order on every rank (``pipeline._stage_loop``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Protocol

import torch

from hexgen.config import EngineConfig
from hexgen.engine.gauges import StageGauges
from hexgen.engine.kv_cache import BlockManager
from hexgen.engine.last_stage import LastStage, Sampled
from hexgen.engine.plan import StepPlan, StepResult
from hexgen.engine.runner import StageRunner
from hexgen.engine.scheduler import Scheduler
from hexgen.engine.types import RequestSource
from hexgen.kernels.staging import upload
from hexgen.parallel.groups import PipelineGroups

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.5  # how long an idle leader blocks on its source before looking at cancellations again


def runs_ahead(engine: EngineConfig, groups: PipelineGroups) -> bool:
    """Whether this pipeline runs asynchronous steps: one stage (it samples on the devices it computes on,
    so the next step can be enqueued before the last one's ids are on the host; scheduler module notes).
    TP > 1 only with ``async_steps_tp``: faster at batch 1, not yet shown faster under load at TP 4."""
    return (
        engine.async_steps
        and groups.layout.num_stages == 1
        and not engine.collect_logits
        and (groups.tp.size == 1 or engine.async_steps_tp)
    )


def input_ids(ids: list[int], prev: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Token ids [tokens] on ``device`` without a host sync; placeholders ``-(1 + row)`` take row of
    ``prev``, the sampled ids [n] of the step in flight."""
    out = upload(ids, torch.long, device)  # [tokens]
    if prev is None or not ids or min(ids) >= 0:
        return out
    ahead = out < 0  # [tokens]
    rows = (-1 - out).clamp_(0, prev.shape[0] - 1)  # [tokens]
    return torch.where(ahead, prev.index_select(0, rows), out)


class LoopClock:
    """Host seconds a loop spends in each of its phases (``lap(name)`` ends the phase called name)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.spent: dict[str, float] = {}
        self.longest: dict[str, float] = {}  # the longest single lap of each phase

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        took = now - self.last
        self.spent[name] = self.spent.get(name, 0.0) + took
        self.longest[name] = max(self.longest.get(name, 0.0), took)
        self.last = now

    def line(self) -> str:
        total = self.last - self.start
        parts = ", ".join(
            f"{k} {v:.2f} (longest {self.longest[k] * 1e3:.0f} ms)"
            for k, v in sorted(self.spent.items(), key=lambda kv: -kv[1])
        )
        return f"{total:.2f} s: {parts}"


@contextmanager
def _cprofiled(path: str) -> Iterator[None]:
    """The block under cProfile; its profile (by own time, then cumulative) written to ``path``."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        with open(path, "w") as f:
            for key in ("tottime", "cumulative"):
                pstats.Stats(prof, stream=f).sort_stats(key).print_stats(35)


class Steps(Protocol):
    """How the leader's steps are launched and completed."""

    @property
    def busy(self) -> bool:
        """Some step is launched and not yet applied."""

    @property
    def in_flight_count(self) -> int:
        """Steps launched and not yet applied."""

    def schedule(self, step_id: int) -> StepPlan | None:
        """The next plan, or None (nothing to send, or no room in flight)."""

    def launch(self, plan: StepPlan) -> None: ...

    def collect(self, launched: bool, clock: LoopClock) -> None:
        """Apply the results that are due now; ``launched``: this iteration launched a plan."""

    def shutdown(self, step_id: int) -> None:
        """Tell the other ranks the run is over."""

    def summary(self) -> str | None: ...


class FirstLeader:
    """The stage-0 leader: owns the scheduler and runs the loop."""

    def __init__(
        self,
        groups: PipelineGroups,
        runner: StageRunner,
        engine: EngineConfig,
        source: RequestSource,
        last: LastStage | None,
        gauges: StageGauges | None = None,
    ) -> None:
        self.groups, self.runner, self.source, self.last = groups, runner, source, last
        self.gauges = gauges  # kept current with the scheduler's figures after every iteration
        blocks = BlockManager(runner.num_blocks, engine.block_size)
        self.max_in_flight = engine.micro_batches or groups.layout.num_stages
        self.scheduler = Scheduler(
            blocks, engine.max_num_seqs, engine.max_num_batched_tokens, runner.max_len, self.max_in_flight
        )
        self.run_ahead = runs_ahead(engine, groups)
        self.profile_loop = engine.profile_loop
        self.device_trace = engine.device_trace
        self.steps: Steps = AheadSteps(self) if self.run_ahead else PipelinedSteps(self)

    def run(self) -> None:
        """Serve until the source is exhausted and every request is done; with ``profile_loop``, under
        cProfile, its profile written to that file; with ``device_trace`` (CUDA), the device's kernel
        timeline summarised into that file."""
        with ExitStack() as stack:
            if self.device_trace and self.runner.device.type == "cuda":
                from hexgen.engine.device_trace import device_timeline

                stack.enter_context(device_timeline(self.device_trace, self.runner.device))
            if self.profile_loop:
                stack.enter_context(_cprofiled(self.profile_loop))
            self._loop()

    def _loop(self) -> None:
        steps, step, clock = self.steps, 0, LoopClock()
        while True:
            clock.lap("other")
            if self._admit(steps.busy):
                break
            clock.lap("source")
            plan = steps.schedule(step)
            clock.lap("schedule")
            if plan is not None:
                step += 1
                steps.launch(plan)
            clock.lap("launch")
            steps.collect(plan is not None, clock)
            if self.gauges is not None:
                self.gauges.observe_scheduler(self.scheduler, steps.in_flight_count)
        steps.shutdown(step)
        summary = steps.summary()
        if summary:
            log.info("%s", summary)
        log.info("scheduler: %s; loop %s", self.scheduler.stats.line(), clock.line())

    def _admit(self, busy: bool) -> bool:
        """Apply cancellations and queue new requests (blocking up to IDLE_POLL_S when there is nothing to
        do); True once the source is exhausted and all work is done."""
        for rid in self.source.poll_cancelled():
            self.scheduler.cancel(rid)
        idle = self.scheduler.idle and not busy
        cap = self.scheduler.free_capacity
        if cap and not self.source.exhausted():
            for req in self.source.poll(cap, IDLE_POLL_S if idle else 0.0):
                self.scheduler.add(req)
        return self.source.exhausted() and self.scheduler.idle and not busy

    def apply(self, plan: StepPlan, result: StepResult) -> None:
        for rid in self.scheduler.update(plan, result):
            self.source.finished(rid)
        for rid in result.abandoned:  # another pipeline posts this request now: stop spending steps on it
            if self.scheduler.cancel(rid):
                log.warning("request %s: another pipeline took over its results; stopped here", rid)


class PipelinedSteps:
    """Synchronous steps through a pipeline of any depth: up to ``max_in_flight`` plans travel at once."""

    def __init__(self, leader: FirstLeader) -> None:
        self.leader = leader
        self.in_flight: deque[StepPlan] = deque()

    @property
    def busy(self) -> bool:
        return bool(self.in_flight)

    @property
    def in_flight_count(self) -> int:
        return len(self.in_flight)

    def schedule(self, step_id: int) -> StepPlan | None:
        if len(self.in_flight) >= self.leader.max_in_flight:
            return None
        return self.leader.scheduler.schedule(step_id)

    def launch(self, plan: StepPlan) -> None:
        """This stage's part of the step, then the plan and activations to the next leader; a one-stage
        pipeline samples here and applies the result at once."""
        ld, g = self.leader, self.leader.groups
        data = plan.encode()
        g.broadcast_bytes(data)
        ids = torch.tensor(plan.input_ids, dtype=torch.long, device=ld.runner.device)
        hidden = ld.runner.forward(plan, ids) if plan.num_tokens else None
        if ld.last is not None:
            ld.apply(plan, ld.last.finish_step(plan, hidden))
            return
        g.send_bytes(data, g.next_leader)
        if hidden is not None:
            g.send_hidden(hidden, g.next_leader)
        self.in_flight.append(plan)

    def collect(self, launched: bool, clock: LoopClock) -> None:
        """The oldest step's result, when nothing new was launched or the pipeline is full."""
        if self.in_flight and (not launched or len(self.in_flight) >= self.leader.max_in_flight):
            g = self.leader.groups
            result = StepResult.decode(g.recv_bytes(g.last_leader))
            clock.lap("wait")
            self.leader.apply(self.in_flight.popleft(), result)
            clock.lap("complete")

    def shutdown(self, step_id: int) -> None:
        g = self.leader.groups
        shutdown = StepPlan(step_id, shutdown=True).encode()
        g.broadcast_bytes(shutdown)
        if self.leader.last is None:
            g.send_bytes(shutdown, g.next_leader)

    def summary(self) -> str | None:
        return None


class AheadSteps:
    """Asynchronous steps of a one-stage pipeline: one step in flight while the next is launched."""

    def __init__(self, leader: FirstLeader) -> None:
        if leader.last is None:
            raise ValueError("asynchronous steps need the last stage on the stage-0 leader (one stage)")
        self.leader = leader
        self.last: LastStage = leader.last
        self.tp_ranks = leader.groups.tp.size
        self.pending: tuple[StepPlan, Sampled] | None = None  # launched, its ids not yet applied
        self.launched: tuple[StepPlan, Sampled] | None = None  # launched in this iteration

    @property
    def busy(self) -> bool:
        return self.pending is not None

    @property
    def in_flight_count(self) -> int:
        return int(self.pending is not None)

    def schedule(self, step_id: int) -> StepPlan | None:
        return self.leader.scheduler.schedule(step_id, ahead=self.pending is not None)

    def launch(self, plan: StepPlan) -> None:
        ld, g = self.leader, self.leader.groups
        if self.tp_ranks > 1:
            g.broadcast_bytes(plan.encode())
        hidden = None
        if plan.num_tokens:
            prev = self.pending[1].ids if self.pending is not None else None
            hidden = ld.runner.forward(plan, input_ids(plan.input_ids, prev, ld.runner.device))
        self.launched = (plan, self.last.sample(plan, hidden))
        if self.tp_ranks > 1 and self.launched[1].ids is not None:
            g.broadcast_ids(self.launched[1].ids)

    def collect(self, launched: bool, clock: LoopClock) -> None:
        """Wait for the previous step's ids and apply them; the step launched now becomes the pending one."""
        if self.pending is not None:
            self.pending[1].wait()
            clock.lap("wait")
            self.leader.apply(self.pending[0], self.last.complete(*self.pending))
            clock.lap("complete")
        self.pending, self.launched = self.launched, None

    def shutdown(self, step_id: int) -> None:
        if self.tp_ranks > 1:
            self.leader.groups.broadcast_bytes(StepPlan(step_id, shutdown=True).encode())

    def summary(self) -> str | None:
        steps = self.leader.scheduler.stats.steps
        return (
            f"asynchronous steps: {steps} steps, {self.leader.scheduler.ahead_tokens} decode tokens "
            "scheduled ahead of their input"
        )
