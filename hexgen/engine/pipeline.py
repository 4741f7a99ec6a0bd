"""The rank loops of a pipeline, and a rank's entry point (``run_rank``).

- stage-0 leader (``hexgen.engine.leader``): owns the scheduler; pulls requests from its source, sends each
  micro-batch's plan and activations down the pipeline, keeps up to P micro-batches in flight, applies
  sampled ids coming back.
- leaders of later stages: receive plan + hidden from the previous leader, share them with their TP group,
  run their layers, pass on; the last one samples, emits outputs to its sink and returns ids to stage 0
  (``hexgen.engine.last_stage``).
- followers (TP ranks other than the leader): receive plan + hidden from their leader and run the layers.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hexgen.config import EngineConfig, Layout, StageSpec
from hexgen.engine.emulation import limited_device
from hexgen.engine.gauges import StageGauges
from hexgen.engine.last_stage import LastStage
from hexgen.engine.leader import FirstLeader, input_ids, runs_ahead
from hexgen.engine.plan import StepPlan
from hexgen.engine.report import RankReport, rank_report
from hexgen.engine.runner import ModelSpec, StageRunner
from hexgen.engine.threads import CpuThreads
from hexgen.engine.types import OutputSink, RequestSource
from hexgen.logutil import setup_logging
from hexgen.parallel.groups import PipelineGroups

__all__ = ["FirstLeader", "LastStage", "RankSpec", "run_rank", "runs_ahead"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankSpec:
    rank: int
    layout: Layout
    model: ModelSpec
    engine: EngineConfig
    init_method: str  # tcp://host:port of the rendezvous
    device_index: int | None = None
    # CPU: the rank's thread sizing (workers count the host's ranks in Redis); None: this pipeline's world
    # size is the host's rank count (every rank local), or engine.cpu_threads when set
    cpu_threads: CpuThreads | None = field(default=None, compare=False)


def _stage_loop(groups: PipelineGroups, runner: StageRunner, last: LastStage | None) -> None:
    """Loop of every rank except the stage-0 leader."""
    g, cfg = groups, runner.cfg
    ahead = runs_ahead(runner.engine, g)  # here: a follower of a one-stage pipeline's leader (AheadSteps)
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
                x = (
                    g.recv_hidden(shape, runner.dtype, g.prev_leader)
                    if g.is_leader
                    else torch.empty(shape, dtype=runner.dtype, device=runner.device)
                )
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


def run_rank(
    spec: RankSpec,
    source_factory: Callable[[], RequestSource] | None,
    sink_factory: Callable[[], OutputSink] | None,
    report: Callable[[RankReport], None] | None = None,
    gauges: StageGauges | None = None,
) -> None:
    """Run one rank of a pipeline until stage 0's source is exhausted and all work is done; then hand
    ``report`` (when given) this rank's peak memory and KV capacity. A stage leader given ``gauges`` keeps
    them current (KV blocks, its forward time; the stage-0 leader its scheduler's figures too)."""
    stage = spec.layout.stage_of_rank(spec.rank)
    setup_logging(spec.rank, stage.index, spec.engine.log_level)
    if spec.engine.device == "cuda":
        device = torch.device("cuda", spec.device_index if spec.device_index is not None else spec.rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    threads = None
    if device.type == "cpu":
        threads = spec.cpu_threads or CpuThreads(spec.engine.cpu_threads, spec.layout.world_size)
        log.info(
            "torch threads: %d (%d cores, %d ranks on this host%s)",
            threads.apply(),
            threads.cores,
            threads.ranks_on_host,
            ", fixed" if threads.fixed else "",
        )
    with limited_device(spec.engine.device_limit(spec.rank), device):
        _run_rank(spec, stage, device, source_factory, sink_factory, report, gauges, threads)


def _run_rank(
    spec: RankSpec,
    stage: StageSpec,
    device: torch.device,
    source_factory: Callable[[], RequestSource] | None,
    sink_factory: Callable[[], OutputSink] | None,
    report: Callable[[RankReport], None] | None = None,
    gauges: StageGauges | None = None,
    threads: CpuThreads | None = None,
) -> None:
    groups = PipelineGroups(spec.layout, spec.rank, spec.init_method, device)
    source = sink = None
    try:
        runner = StageRunner(spec.model, spec.engine, groups)
        runner.cpu_threads = threads
        # what start-up made (modules, weights, graphs, compiled kernels) lives as long as the rank: kept out
        # of the collector's full passes, which then scan only what serving allocates
        gc.collect()
        gc.freeze()
        if gauges is not None and groups.is_leader:
            gauges.watch(runner)
        last = None
        if stage.is_last and groups.is_leader:
            if sink_factory is None:
                raise ValueError("run_rank: the last stage's leader needs a sink factory")
            sink = sink_factory()
            last = LastStage(runner, spec.model, sink, spec.engine.collect_logits)
        preemptions = None
        if spec.rank == 0:
            if source_factory is None:
                raise ValueError("run_rank: rank 0 needs a source factory")
            source = source_factory()
            leader = FirstLeader(groups, runner, spec.engine, source, last, gauges)
            leader.run()
            preemptions = leader.scheduler.stats.preemptions
        else:
            _stage_loop(groups, runner, last)
        if report is not None:
            report(rank_report(spec.rank, runner, preemptions))
    finally:
        if sink is not None:
            sink.close()
        if source is not None:
            source.close()
        groups.close()
