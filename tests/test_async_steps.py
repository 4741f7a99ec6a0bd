"""Asynchronous steps (one-stage pipelines, any TP degree): step N+1 is scheduled and launched before step N's
sampled ids reach the host; its decodes read those ids on the device through placeholder input ids.

Scheduler units check the placeholders (position, context, KV blocks, seeding index) and when a sequence
must not run ahead; engine runs on CPU check the tokens against Hugging Face and against the synchronous
loop, with a KV cache small enough to force preemption, and that decodes really ran ahead.
"""
from __future__ import annotations

import pytest

from hexgen.config import EngineConfig, Layout
from hexgen.engine.kv_cache import BlockManager
from hexgen.engine.offline import run_offline
from hexgen.engine.plan import StepPlan, StepResult
from hexgen.engine.runner import ModelSpec
from hexgen.engine.scheduler import Scheduler
from hexgen.engine.types import Request, SamplingParams
from tests.models import Case, check_against_hf, gqa_case

BLOCK = 4


def make(num_blocks: int = 64, budget: int = 64) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BLOCK), 8, budget, 1024, 1)


def req(rid: str, prompt_len: int, max_new: int = 8) -> Request:
    return Request(rid, list(range(10, 10 + prompt_len)), SamplingParams(max_new_tokens=max_new))


def result(sched: Scheduler, plan: StepPlan, tokens: dict[int, int], finished: set[int] = frozenset()
           ) -> StepResult:
    """The last stage's answer: ``tokens[seq_id]`` for every sampling row whose sequence is still running."""
    running = {s.seq_id for s in sched.running}
    out = StepResult(plan.step_id)
    for sid, sample in zip(plan.seq_ids, plan.sample):
        if sample and sid in running:
            out.seq_ids.append(sid)
            out.tokens.append(tokens[sid])
            out.finished.append(sid in finished)
    return out


def test_decodes_run_ahead_on_placeholders():
    s = make()
    s.add(req("a", 4))
    s.add(req("b", 3))
    p0 = s.schedule(0)
    assert p0.sample == [True, True] and p0.input_ids[:4] == list(range(10, 14))
    p1 = s.schedule(1, ahead=True)
    # Row r of p0's sampled ids feeds row r of p1; the token goes where p0's sample lands.
    assert p1.seq_ids == p0.seq_ids
    assert p1.input_ids == [-1, -2]
    assert p1.positions == [4, 3] and p1.ctx_lens == [5, 4] and p1.q_lens == [1, 1]
    assert p1.out_lens == [1, 1] and p1.sample == [True, True]
    a, b = s.running
    assert len(a.blocks) == 2 and len(b.blocks) == 1  # position 4 needs a second block of 4
    assert a.in_flight == 5 and b.in_flight == 4
    s.update(p0, result(s, p0, {a.seq_id: 100, b.seq_id: 200}))
    assert a.tokens[4:] == [100] and a.num_computed == 4 and a.in_flight == 1
    p2 = s.schedule(2, ahead=True)  # p1 in flight: a and b run ahead on p1's samples
    assert p2.input_ids == [-1, -2] and p2.positions == [5, 4] and p2.out_lens == [2, 2]
    s.update(p1, result(s, p1, {a.seq_id: 101, b.seq_id: 201}))
    s.update(p2, result(s, p2, {a.seq_id: 102, b.seq_id: 202}))
    assert a.tokens[4:] == [100, 101, 102] and a.num_computed == 6 and a.in_flight == 0
    assert b.tokens[3:] == [200, 201, 202] and s.ahead_tokens == 4


def test_no_run_ahead_past_the_last_token_or_without_a_sample():
    s = make(budget=4)
    s.add(req("one", 2, max_new=1))  # its first sample is its last token
    s.add(req("long", 6))  # the 4-token budget leaves 2 for it: a chunk that does not sample
    p0 = s.schedule(0)
    assert p0.q_lens == [2, 2] and p0.sample == [True, False]
    assert s.schedule(1, ahead=True) is None
    assert s.ahead_tokens == 0


def test_sequence_finished_while_running_ahead_is_dropped():
    s = make()
    s.add(req("a", 4))
    s.add(req("b", 4))
    p0 = s.schedule(0)
    p1 = s.schedule(1, ahead=True)
    a, b = s.running
    free_before = s.blocks.num_free
    released = s.update(p0, result(s, p0, {a.seq_id: 1, b.seq_id: 2}, finished={a.seq_id}))  # a hit EOS
    assert released == ["a"] and a not in s.running and s.blocks.num_free > free_before
    released = s.update(p1, result(s, p1, {b.seq_id: 3}))  # a's extra token is not applied anywhere
    assert released == [] and b.tokens[4:] == [2, 3] and b.in_flight == 0


def test_no_run_ahead_when_its_block_does_not_fit_or_it_is_cancelled():
    s = make(num_blocks=2)
    s.add(req("a", 4))  # fills block 0; its next token needs block 1
    s.add(req("b", 3))  # fills block 1
    p0 = s.schedule(0)
    p1 = s.schedule(1, ahead=True)
    assert p1.seq_ids == [p0.seq_ids[1]]  # b's token fits its block; a must wait for a free block
    s2 = make()
    s2.add(req("c", 3))
    s2.schedule(0)
    assert s2.cancel("c")
    assert s2.schedule(1, ahead=True) is None


def test_which_pipelines_run_ahead():
    from types import SimpleNamespace

    from hexgen.engine.pipeline import runs_ahead

    def groups(stages: int, tp: int):
        return SimpleNamespace(layout=SimpleNamespace(num_stages=stages), tp=SimpleNamespace(size=tp))
    on = EngineConfig()
    assert runs_ahead(on, groups(1, 1))
    assert not runs_ahead(on, groups(2, 1))  # pipelines keep P micro-batches in flight instead
    assert not runs_ahead(on, groups(1, 2))  # TP > 1: opt-in
    assert runs_ahead(EngineConfig(async_steps_tp=True), groups(1, 2))
    assert not runs_ahead(EngineConfig(async_steps=False), groups(1, 1))
    assert not runs_ahead(EngineConfig(collect_logits=True), groups(1, 1))  # logits are read after the next step


# --- engine runs on CPU ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gqa(tmp_path_factory) -> Case:
    return gqa_case(str(tmp_path_factory.mktemp("gqa_async")))


def run(case: Case, tp: int = 1, **engine_kw) -> dict:
    layout = Layout.build(case.cfg, (tp,), (case.cfg.num_layers,))
    engine = EngineConfig(**{"cpu_kv_tokens": 2048, "max_num_batched_tokens": 32, **engine_kw})
    return run_offline(layout, ModelSpec(model_dir=case.model_dir), engine, case.requests)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_async_steps_match_hugging_face_and_run_ahead(gqa, capfd, tp):
    """TP 2: the follower resolves the placeholders from the ids the leader broadcasts after each step."""
    results = run(gqa, tp, async_steps_tp=True, log_level="INFO")
    err = capfd.readouterr().err
    ahead = [line for line in err.splitlines() if "asynchronous steps:" in line]
    assert ahead, "the one-rank pipeline did not take the asynchronous loop"
    assert int(ahead[-1].split("steps, ")[1].split()[0]) > 0, ahead[-1]
    check_against_hf(results, gqa.requests, gqa.hf, gqa.reference, check_logits=False)


@pytest.mark.slow
def test_async_steps_with_preemption_equal_the_synchronous_loop(gqa, capfd):
    """10 blocks of 8 tokens cannot hold the four sequences: preemption, recompute and run-ahead refusals
    interleave; the tokens must still equal HF's and the synchronous loop's."""
    fast = run(gqa, num_kv_blocks=10, block_size=8, log_level="INFO")
    assert "preempting request" in capfd.readouterr().err, "the KV cache was not small enough"
    slow = run(gqa, num_kv_blocks=10, block_size=8, async_steps=False)
    assert {k: v.token_ids for k, v in fast.items()} == {k: v.token_ids for k, v in slow.items()}
    check_against_hf(fast, gqa.requests, gqa.hf, gqa.reference, check_logits=False)


@pytest.mark.slow
def test_async_steps_on_the_static_decode_path_equal_the_reference_path(gqa):
    """cuda_graphs=True on CPU runs the padded static decode path uncaptured: with asynchronous steps it must
    give the tokens of the synchronous reference path."""
    fast = run(gqa, cuda_graphs=True, max_num_seqs=6)
    check_against_hf(fast, gqa.requests, gqa.hf, gqa.reference, check_logits=False)
