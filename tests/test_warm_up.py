"""The runner's start-up warm-up (``StageRunner.warm_up``, run on CUDA ranks): its steps cover the token
budget, write only a block no sequence holds, leave an fp8 cache's scales unset and change no later output."""

from __future__ import annotations

import torch
import torch.distributed as dist

from hexgen.config import EngineConfig, Layout, preset
from hexgen.engine.plan import StepPlan
from hexgen.engine.runner import ModelSpec, StageRunner
from hexgen.parallel.groups import PipelineGroups
from hexgen.procs import free_port

CPU = torch.device("cpu")
PLAN = StepPlan(0, seq_ids=[0, 1], input_ids=[5, 6, 7, 9, 4], positions=[0, 1, 2, 0, 1], q_lens=[3, 2],
                ctx_lens=[3, 2], block_tables=[[1], [2]], sample=[True, True], out_lens=[0, 0])


def _runner_run(warm: bool, engine: EngineConfig) -> tuple[torch.Tensor, list[StepPlan], torch.Tensor | None]:
    layout = Layout.build(preset("tiny"), [1], None)
    groups = PipelineGroups(layout, 0, f"tcp://127.0.0.1:{free_port()}", CPU)
    try:
        r = StageRunner(ModelSpec(preset="tiny", random_weights=True), engine, groups)
        plans = r.warm_up_plans()
        scales = None
        if warm:
            r.warm_up()
            scales = None if r.kv_scales is None else r.kv_scales.clone()
        return r.forward(PLAN, torch.tensor(PLAN.input_ids)), plans, scales
    finally:
        groups.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_warm_up_steps_cover_the_budget_and_touch_one_unused_block():
    engine = EngineConfig(cpu_kv_tokens=4096, max_num_batched_tokens=300)
    _, plans, _ = _runner_run(False, engine)
    assert max(p.num_tokens for p in plans) == 300
    assert {p.num_tokens % 16 for p in plans} - {0}, "a size that is not a multiple of 16"
    for p in plans:
        assert len(p.positions) == sum(p.q_lens) == p.num_tokens
        assert all(len(t) == -(-c // engine.block_size) for t, c in zip(p.block_tables, p.ctx_lens))
        assert {b for t in p.block_tables for b in t} == {0}  # no graphs: block 0, before any request


def test_warm_up_leaves_fp8_scales_unset_and_later_outputs_unchanged():
    engine = EngineConfig(cpu_kv_tokens=4096, max_num_batched_tokens=128, kv_cache_dtype="fp8")
    cold, _, _ = _runner_run(False, engine)
    warm, _, scales = _runner_run(True, engine)
    assert scales is not None and not scales.any(), "the warm-up fixed fp8 scales"
    assert torch.equal(cold, warm)
