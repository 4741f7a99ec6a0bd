"""The rank loops of a pipeline.

- stage-0 leader: owns the scheduler; pulls requests from its source, sends each micro-batch's plan and
  activations down the pipeline, keeps up to P micro-batches in flight, applies sampled ids coming back.
- leaders of later stages: receive plan + hidden from the previous leader, share them with their TP group,
  run their layers, pass on; the last one samples, emits outputs to its sink and returns ids to stage 0.
- followers (TP ranks other than the leader): receive plan + hidden from their leader and run the layers.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from hexgen.config import EngineConfig, Layout, StageSpec
from hexgen.engine.emulation import limited_device
from hexgen.engine.kv_cache import BlockManager
from hexgen.engine.loop_clock import LoopClock
from hexgen.engine.output import OutputProcessor
from hexgen.engine.plan import StepPlan, StepResult
from hexgen.engine.report import RankReport, rank_report
from hexgen.engine.runner import ModelSpec, StageRunner
from hexgen.engine.sampler import sample
from hexgen.engine.scheduler import Scheduler
from hexgen.engine.types import OutputSink, Request, RequestSource, SamplingParams, StepOutput
from hexgen.logutil import setup_logging
from hexgen.model.staging import upload
from hexgen.parallel.groups import PipelineGroups

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.5


@dataclass(frozen=True)
class RankSpec:
    rank: int
    layout: Layout
    model: ModelSpec
    engine: EngineConfig
    init_method: str  # tcp://host:port of the rendezvous
    device_index: int | None = None


def load_tokenizer(model: ModelSpec):
    """The model's Hugging Face tokenizer, or None (random-weight presets, directories without one)."""
    if model.model_dir is None or not any(os.path.exists(os.path.join(model.model_dir, f))
                                          for f in ("tokenizer.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model.model_dir, local_files_only=True)


class LastStage:
    """Sampling and output processing on the last stage's leader."""

    def __init__(self, runner: StageRunner, model: ModelSpec, sink: OutputSink, collect_logits: bool) -> None:
        self.runner = runner
        self.sink = sink
        self._lost = getattr(sink, "lost", None)  # optional OutputSink.lost (types.py), looked up once
        self.collect_logits = collect_logits
        self.processor = OutputProcessor(load_tokenizer(model), runner.cfg.eos_token_ids)
        self.requests: dict[int, Request] = {}  # seq_id -> request

    def _aborted(self, notice: dict) -> StepOutput:
        req = self.requests.pop(notice["seq_id"], None)
        if req is not None and notice["reason"] == "cancelled" and req.request_id in self.processor:
            return self.processor.cancel(req.request_id)
        req = req or Request.from_dict(notice["request"])
        n = len(req.output_ids)
        return StepOutput(req.request_id, n, [], "", notice["reason"], len(req.prompt_ids), n, req.meta)

    def finish_step(self, plan: StepPlan, hidden: torch.Tensor) -> StepResult:
        return self.complete(plan, self.sample(plan, hidden))

    def sample(self, plan: StepPlan, hidden: torch.Tensor | None) -> "Sampled":
        """Enqueue the step's sampling on the device; no host sync (``complete`` reads the ids)."""
        for item in plan.new_requests:
            req = Request.from_dict(item["request"])
            self.requests[item["seq_id"]] = req
            self.processor.add(req)
        rows = [i for i, s in enumerate(plan.sample) if s]
        if not rows or hidden is None:
            return Sampled(rows=[])
        logits = self.runner.logits(plan, hidden)  # [n_sampled, vocab]
        # A request may already be gone (finished one step earlier while this step ran ahead): any params do.
        params = [self.requests[sid].params if sid in self.requests else GREEDY
                  for sid in (plan.seq_ids[i] for i in rows)]
        ids = sample(logits, params, [plan.out_lens[i] for i in rows])  # [n_sampled] int64, on the device
        return Sampled(rows, ids, host_copy(ids), logits if self.collect_logits else None)

    def complete(self, plan: StepPlan, sampled: "Sampled") -> StepResult:
        """Wait for the sampled ids, turn them into outputs for the sink and a result for stage 0."""
        outputs = [self._aborted(n) for n in plan.cancelled]
        result = StepResult(plan.step_id)
        tokens = sampled.tokens()
        for row, (i, tok) in enumerate(zip(sampled.rows, tokens)):
            sid = plan.seq_ids[i]
            req = self.requests.get(sid)
            if req is None:  # finished at the step before (ran ahead): drop the extra token
                continue
            out = self.processor.step(req.request_id, tok)
            if sampled.logits is not None:
                out.logits = sampled.logits[row].cpu()
            if out.finish_reason is not None:
                del self.requests[sid]
            outputs.append(out)
            result.seq_ids.append(sid)
            result.tokens.append(tok)
            result.finished.append(out.finish_reason is not None)
        if outputs:
            self.sink.emit(outputs)
        if self._lost is not None:
            result.abandoned = list(self._lost())
        return result


GREEDY = SamplingParams()


def host_copy(ids: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
    """Start copying ``ids`` to pinned host memory now, on the current stream, so that a later read waits
    for this step's work only and not for steps enqueued after it."""
    if ids.device.type != "cuda":
        return ids, None
    host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
    host.copy_(ids, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


@dataclass
class Sampled:
    """One step's sampling, enqueued: the plan rows that sampled, their ids on the device and in flight to
    the host, and (collect_logits) their logits."""

    rows: list[int]
    ids: torch.Tensor | None = None  # [n_sampled] int64 on the device
    host: tuple[torch.Tensor, "torch.cuda.Event | None"] | None = None
    logits: torch.Tensor | None = None  # [n_sampled, vocab] float32

    def wait(self) -> None:
        """Block until the ids are on the host."""
        if self.host is not None and self.host[1] is not None:
            self.host[1].synchronize()

    def tokens(self) -> list[int]:
        if self.host is None:
            return []
        self.wait()
        return self.host[0].tolist()


def runs_ahead(engine: EngineConfig, groups: PipelineGroups) -> bool:
    """Whether this pipeline runs asynchronous steps: one stage (it samples on the devices it computes on,
    so the next step can be enqueued before the last one's ids are on the host; scheduler module notes).
    TP > 1 only with ``async_steps_tp``: 36% faster batch-1 decode at TP 2, but under load at TP 4 it
    measured slower in a run whose order may have favoured the synchronous loop (docs/benchmarks.md, run 12)."""
    return (engine.async_steps and groups.layout.num_stages == 1 and not engine.collect_logits
            and (groups.tp.size == 1 or engine.async_steps_tp))


def input_ids(ids: list[int], prev: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Token ids [tokens] on ``device`` without a host sync; placeholders ``-(1 + row)`` take row of
    ``prev``, the sampled ids [n] of the step in flight."""
    out = upload(ids, torch.long, device)  # [tokens]
    if prev is None or not ids or min(ids) >= 0:
        return out
    ahead = out < 0  # [tokens]
    rows = (-1 - out).clamp_(0, prev.shape[0] - 1)  # [tokens]
    return torch.where(ahead, prev.index_select(0, rows), out)


class FirstLeader:
    """The stage-0 leader's scheduling loop."""

    def __init__(self, groups: PipelineGroups, runner: StageRunner, engine: EngineConfig,
                 source: RequestSource, last: LastStage | None) -> None:
        self.groups, self.runner, self.source, self.last = groups, runner, source, last
        blocks = BlockManager(runner.num_blocks, engine.block_size)
        self.max_in_flight = engine.micro_batches or groups.layout.num_stages
        self.scheduler = Scheduler(blocks, engine.max_num_seqs, engine.max_num_batched_tokens, runner.max_len,
                                   self.max_in_flight)
        self.run_ahead = runs_ahead(engine, groups)
        self.tp_ranks = groups.tp.size
        self.profile_loop = engine.profile_loop

    def _launch(self, plan: StepPlan) -> StepResult | None:
        data = plan.encode()
        self.groups.broadcast_bytes(data)
        ids = torch.tensor(plan.input_ids, dtype=torch.long, device=self.runner.device)
        hidden = self.runner.forward(plan, ids) if plan.num_tokens else None
        if self.last is not None:
            return self.last.finish_step(plan, hidden)
        nxt = self.groups.next_leader
        self.groups.send_bytes(data, nxt)
        if hidden is not None:
            self.groups.send_hidden(hidden, nxt)
        return None

    def _apply(self, plan: StepPlan, result: StepResult) -> None:
        for rid in self.scheduler.update(plan, result):
            self.source.finished(rid)
        for rid in result.abandoned:  # another pipeline posts this request now: stop spending steps on it
            if self.scheduler.cancel(rid):
                log.warning("request %s: another pipeline took over its results; stopped here", rid)

    def run_async(self) -> None:
        """The loop of a one-stage pipeline: launch step N+1 (its decodes run ahead on step N's sampled ids,
        still on the device), then wait for step N's ids and apply them, so the host's work between steps
        overlaps the device's. With TP > 1 the followers get each plan as before and each step's sampled ids
        by a device broadcast, in the same order on every rank (see ``_stage_loop``)."""
        pending: tuple[StepPlan, Sampled] | None = None
        step = 0
        clock = LoopClock()
        while True:
            clock.lap("other")
            for rid in self.source.poll_cancelled():
                self.scheduler.cancel(rid)
            idle = self.scheduler.idle and pending is None
            cap = self.scheduler.free_capacity
            if cap and not self.source.exhausted():
                for req in self.source.poll(cap, IDLE_POLL_S if idle else 0.0):
                    self.scheduler.add(req)
            if self.source.exhausted() and self.scheduler.idle and pending is None:
                break
            clock.lap("source")
            plan = self.scheduler.schedule(step, ahead=pending is not None)
            clock.lap("schedule")
            launched = None
            if plan is not None:
                step += 1
                if self.tp_ranks > 1:
                    self.groups.broadcast_bytes(plan.encode())
                hidden = None
                if plan.num_tokens:
                    prev = pending[1].ids if pending is not None else None
                    hidden = self.runner.forward(plan, input_ids(plan.input_ids, prev, self.runner.device))
                launched = (plan, self.last.sample(plan, hidden))
                if self.tp_ranks > 1 and launched[1].ids is not None:
                    self.groups.broadcast_ids(launched[1].ids)
            clock.lap("launch")
            if pending is not None:
                pending[1].wait()
                clock.lap("wait")
                self._apply(pending[0], self.last.complete(*pending))
                clock.lap("complete")
            pending = launched
        if self.tp_ranks > 1:
            self.groups.broadcast_bytes(StepPlan(step, shutdown=True).encode())
        log.info("asynchronous steps: %d steps, %d decode tokens scheduled ahead of their input",
                 step, self.scheduler.ahead_tokens)
        log.info("scheduler: %s; loop %s", self.scheduler.stats.line(), clock.line())

    def run(self) -> None:
        path = self.profile_loop  # a file: where this loop's host profile goes (cProfile)
        if not path:
            self._run()
            return
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        try:
            self._run()
        finally:
            prof.disable()
            with open(path, "w") as f:
                for key in ("tottime", "cumulative"):
                    pstats.Stats(prof, stream=f).sort_stats(key).print_stats(35)

    def _run(self) -> None:
        if self.run_ahead:
            self.run_async()
            return
        in_flight: deque[StepPlan] = deque()
        step = 0
        while True:
            for rid in self.source.poll_cancelled():
                self.scheduler.cancel(rid)
            idle = self.scheduler.idle and not in_flight
            cap = self.scheduler.free_capacity
            if cap and not self.source.exhausted():
                for req in self.source.poll(cap, IDLE_POLL_S if idle else 0.0):
                    self.scheduler.add(req)
            if self.source.exhausted() and self.scheduler.idle and not in_flight:
                break
            plan = self.scheduler.schedule(step) if len(in_flight) < self.max_in_flight else None
            if plan is not None:
                step += 1
                result = self._launch(plan)
                if result is not None:
                    self._apply(plan, result)
                else:
                    in_flight.append(plan)
            if in_flight and (plan is None or len(in_flight) >= self.max_in_flight):
                result = StepResult.decode(self.groups.recv_bytes(self.groups.last_leader))
                self._apply(in_flight.popleft(), result)
        log.info("scheduler: %s", self.scheduler.stats.line())
        shutdown = StepPlan(step, shutdown=True).encode()
        self.groups.broadcast_bytes(shutdown)
        if self.last is None:
            self.groups.send_bytes(shutdown, self.groups.next_leader)


def _stage_loop(groups: PipelineGroups, runner: StageRunner, last: LastStage | None) -> None:
    """Loop of every rank except the stage-0 leader."""
    g, cfg = groups, runner.cfg
    ahead = runs_ahead(runner.engine, g)  # here: a follower of a one-stage pipeline's leader (run_async)
    prev: torch.Tensor | None = None  # the last step's sampled ids [n], broadcast by the leader
    while True:
        data = g.recv_bytes(g.prev_leader) if g.is_leader else None
        data = g.broadcast_bytes(data)
        plan = StepPlan.decode(data)
        if plan.shutdown:
            if g.is_leader and not g.stage.is_last:
                g.send_bytes(data, g.next_leader)
            return
        hidden = None
        if plan.num_tokens:
            if g.stage.is_first:
                x = input_ids(plan.input_ids, prev, runner.device)
            else:
                shape = (plan.num_tokens, cfg.hidden_size)
                x = g.recv_hidden(shape, runner.dtype, g.prev_leader) if g.is_leader else \
                    torch.empty(shape, dtype=runner.dtype, device=runner.device)
                x = g.broadcast_hidden(x)
            hidden = runner.forward(plan, x)
            if ahead and any(plan.sample):
                prev = g.broadcast_ids(torch.empty(sum(plan.sample), dtype=torch.long, device=runner.device))
        if not g.is_leader:
            continue
        if last is not None:
            g.send_bytes(last.finish_step(plan, hidden).encode(), g.first_leader)
        else:
            g.send_bytes(data, g.next_leader)
            if hidden is not None:
                g.send_hidden(hidden, g.next_leader)


def run_rank(spec: RankSpec, source_factory: Callable[[], RequestSource] | None,
             sink_factory: Callable[[], OutputSink] | None,
             report: Callable[[RankReport], None] | None = None) -> None:
    """Run one rank of a pipeline until stage 0's source is exhausted and all work is done; then hand
    ``report`` (when given) this rank's peak memory and KV capacity."""
    stage = spec.layout.stage_of_rank(spec.rank)
    setup_logging(spec.rank, stage.index, spec.engine.log_level)
    if spec.engine.device == "cuda":
        device = torch.device("cuda", spec.device_index if spec.device_index is not None else spec.rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.layout.world_size))
    with limited_device(spec.engine.device_limit(spec.rank), device):
        _run_rank(spec, stage, device, source_factory, sink_factory, report)


def _run_rank(spec: RankSpec, stage: StageSpec, device: torch.device,
              source_factory: Callable[[], RequestSource] | None,
              sink_factory: Callable[[], OutputSink] | None,
              report: Callable[[RankReport], None] | None = None) -> None:
    groups = PipelineGroups(spec.layout, spec.rank, spec.init_method, device)
    source = sink = None
    try:
        runner = StageRunner(spec.model, spec.engine, groups)
        last = None
        if stage.is_last and groups.is_leader:
            sink = sink_factory()
            last = LastStage(runner, spec.model, sink, spec.engine.collect_logits)
        if spec.rank == 0:
            source = source_factory()
            FirstLeader(groups, runner, spec.engine, source, last).run()
        else:
            _stage_loop(groups, runner, last)
        if report is not None:
            report(rank_report(spec.rank, runner))
    finally:
        if sink is not None:
            sink.close()
        if source is not None:
            source.close()
        groups.close()
