"""Tests for hexgen.engine.scheduler (no processes): chunked prefill under the token budget, max_num_seqs,
preemption and recompute when KV blocks run out, cancellation, and capping max_new_tokens to the context."""
from __future__ import annotations

import pytest

from hexgen.engine.kv_cache import BlockManager
from hexgen.engine.plan import StepPlan, StepResult
from hexgen.engine.scheduler import Scheduler, max_step_batch
from hexgen.engine.types import Request, SamplingParams

BLOCK = 4


def make(num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 64, max_len: int = 1024,
         micro_batches: int = 1) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BLOCK), max_num_seqs, budget, max_len, micro_batches)


def req(rid: str, prompt_len: int, max_new: int = 4, output: list[int] | None = None) -> Request:
    return Request(rid, list(range(10, 10 + prompt_len)), SamplingParams(max_new_tokens=max_new),
                   output_ids=list(output or []))


def by_rid(sched: Scheduler, plan: StepPlan) -> dict[str, int]:
    """request id -> index of its row in ``plan``."""
    ids = {s.seq_id: s.request.request_id for s in sched.running}
    return {ids[sid]: i for i, sid in enumerate(plan.seq_ids)}


def finish_step(sched: Scheduler, plan: StepPlan, token: int = 7) -> list[str]:
    """Play the last stage: sample ``token`` for every sampling row, finish at max_new_tokens."""
    seqs = {s.seq_id: s for s in sched.running}
    result = StepResult(plan.step_id)
    for sid, sample in zip(plan.seq_ids, plan.sample):
        if sample:
            seq = seqs[sid]
            result.seq_ids.append(sid)
            result.tokens.append(token)
            result.finished.append(seq.num_output + 1 >= seq.request.params.max_new_tokens)
    return sched.update(plan, result)


def check_plan(sched: Scheduler, plan: StepPlan) -> None:
    """Plan invariants: budget, one row per sequence, inputs/positions/slots consistent with the sequence."""
    assert plan.num_tokens <= sched.max_batched_tokens
    assert len(set(plan.seq_ids)) == len(plan.seq_ids)
    seqs = {s.seq_id: s for s in sched.running}
    start = 0
    for sid, q, ctx, table, sample in zip(plan.seq_ids, plan.q_lens, plan.ctx_lens, plan.block_tables,
                                          plan.sample):
        seq = seqs[sid]
        assert plan.positions[start:start + q] == list(range(ctx - q, ctx))
        assert plan.input_ids[start:start + q] == seq.tokens[ctx - q:ctx]
        assert len(table) * BLOCK >= ctx
        assert sample == (ctx == len(seq.tokens))
        start += q
    assert start == plan.num_tokens
    tables = [b for t in plan.block_tables for b in t]
    assert len(tables) == len(set(tables)), "two sequences share a KV block"


def run_to_end(sched: Scheduler, max_steps: int = 500) -> list[StepPlan]:
    plans = []
    for step in range(max_steps):
        plan = sched.schedule(step)
        if plan is None:
            assert sched.idle
            return plans
        check_plan(sched, plan)
        plans.append(plan)
        finish_step(sched, plan)
    raise AssertionError("scheduler did not finish")


# --- chunked prefill ---------------------------------------------------------------------------------

def test_long_prompt_is_prefilled_in_budget_sized_chunks():
    s = make(budget=8)
    s.add(req("a", 20))
    chunks = []
    for step in range(3):
        plan = s.schedule(step)
        check_plan(s, plan)
        chunks.append((plan.q_lens, plan.positions[0], plan.sample))
        finish_step(s, plan)
    assert chunks == [([8], 0, [False]), ([8], 8, [False]), ([4], 16, [True])]
    assert s.running[0].num_output == 1  # only the last chunk sampled


def test_budget_is_shared_between_decodes_and_new_prefills():
    s = make(budget=8)
    s.add(req("a", 3, max_new=10))
    finish_step(s, s.schedule(0))  # a prefilled, one token out
    s.add(req("b", 12))
    plan = s.schedule(1)
    check_plan(s, plan)
    rows = by_rid(s, plan)
    assert plan.q_lens[rows["a"]] == 1  # running decodes first
    assert plan.q_lens[rows["b"]] == 7  # the rest of the budget to the new prompt
    assert plan.num_tokens == 8
    assert [r.request.request_id for r in plan.new_requests] == ["b"]


def test_waiting_prompt_does_not_start_when_budget_is_spent():
    s = make(budget=4)
    s.add(req("a", 4))
    s.add(req("b", 4))
    plan = s.schedule(0)
    assert plan.q_lens == [4] and len(s.waiting) == 1


def test_everything_completes_with_a_tiny_budget():
    s = make(budget=3)
    for i, n in enumerate((1, 7, 11, 2)):
        s.add(req(f"r{i}", n, max_new=5))
    run_to_end(s)
    assert s.blocks.num_free == s.blocks.num_blocks


# --- max_num_seqs and micro-batches ------------------------------------------------------------------

def test_max_num_seqs_limits_running_sequences():
    s = make(max_num_seqs=2)
    assert s.free_capacity == 2
    for i in range(3):
        s.add(req(f"r{i}", 3, max_new=2))
    assert s.free_capacity == 0
    plan = s.schedule(0)
    assert len(plan.seq_ids) == 2 and len(s.running) == 2 and len(s.waiting) == 1
    finish_step(s, plan)
    plan = s.schedule(1)  # both finish here (max_new 2): the third still waits this step
    assert len(plan.seq_ids) == 2 and len(s.waiting) == 1
    assert sorted(finish_step(s, plan)) == ["r0", "r1"]
    plan = s.schedule(2)
    assert by_rid(s, plan) == {"r2": 0}


def test_micro_batches_split_sequences_between_plans():
    s = make(micro_batches=2)
    for i in range(4):
        s.add(req(f"r{i}", 3))
    first = s.schedule(0)
    second = s.schedule(1)  # the first is still in flight
    assert len(first.seq_ids) == 2 and len(second.seq_ids) == 2
    assert not set(first.seq_ids) & set(second.seq_ids)
    assert s.schedule(2) is None  # every sequence has a chunk in flight
    finish_step(s, first)
    third = s.schedule(3)
    assert sorted(third.seq_ids) == sorted(first.seq_ids)


# --- preemption ------------------------------------------------------------------------------------

def test_preemption_frees_the_youngest_and_recomputes_it():
    s = make(num_blocks=4, budget=64)  # 16 token slots
    s.add(req("old", 6, max_new=8))
    s.add(req("young", 6, max_new=8))
    plan = s.schedule(0)
    finish_step(s, plan)  # each holds 2 blocks (6 prompt tokens), all 4 blocks used
    assert s.blocks.num_free == 0
    young = s.by_request["young"]
    for step in range(1, 3):  # 7th and 8th tokens fit in the second blocks
        finish_step(s, s.schedule(step))
    plan = s.schedule(3)  # "old" needs a third block for its 9th token: "young" is preempted
    assert by_rid(s, plan) == {"old": 0}
    assert young in s.waiting and young.num_computed == 0 and young.blocks == []
    finish_step(s, plan)
    while "old" in s.by_request:
        finish_step(s, s.schedule(99))
    plan = s.schedule(100)  # recompute: prompt + the tokens generated before preemption
    assert plan.seq_ids == [young.seq_id]
    assert plan.input_ids == young.tokens and len(young.tokens) == 6 + 3
    assert plan.sample == [True] and plan.out_lens == [3]  # the 4th completion token comes next
    assert plan.new_requests == []  # the last stage already knows it
    finish_step(s, plan)
    run_to_end(s)
    assert s.blocks.num_free == 4
    # the counters saw one preemption, which threw away young's 8 computed tokens (6 prompt + 2 decoded)
    assert (s.stats.preemptions, s.stats.recomputed_tokens) == (1, 8)


def test_step_stats_count_what_was_sent():
    s = make(budget=64)
    s.add(req("a", 5, max_new=3))
    s.add(req("b", 3, max_new=2))
    finish_step(s, s.schedule(0))  # two prefills (5 + 3 tokens): one mixed step, no decode rows
    s.add(req("c", 1, max_new=2))  # a one-token prompt is a decode-shaped row
    finish_step(s, s.schedule(1))  # decodes of a and b, plus c's one token
    run_to_end(s)
    st = s.stats
    assert (st.mixed_steps, st.prefill_tokens, st.preemptions) == (1, 8, 0)
    # decode rows: step 1 has three; then a makes its third token and c its second in one more step
    assert st.steps == 3 and st.decode_rows == 3 + 2
    assert "3 steps (1 with a prefill chunk)" in st.line()


def test_sequences_compare_by_identity():
    """Membership tests in running/waiting run per sequence per step: they must not compare token lists
    (an O(batch² × tokens) cost: milliseconds a step at 256 sequences)."""
    s = make()
    s.add(req("a", 4))
    s.add(req("a2", 4))
    a, a2 = s.waiting
    a2.seq_id, a2.request = a.seq_id, a.request  # equal fields
    assert a != a2 and a2 not in [a]


def test_preemption_skips_sequences_in_flight():
    s = make(num_blocks=4, budget=64, micro_batches=2)
    s.add(req("a", 8, max_new=8))
    s.add(req("b", 8, max_new=8))
    pa = s.schedule(0)
    pb = s.schedule(1)
    finish_step(s, pa)
    plan = s.schedule(2)  # "a" needs a block; "b" is in flight and may not be preempted
    assert plan is None
    assert s.by_request["b"].blocks and s.by_request["b"] in s.running
    finish_step(s, pb)
    plan = s.schedule(3)  # now "b" is idle: preempted for "a"
    assert by_rid(s, plan) == {"a": 0}
    assert s.by_request["b"] in s.waiting


def test_many_sequences_through_a_small_cache_all_finish():
    s = make(num_blocks=6, budget=5)
    lengths = [3, 9, 5, 14, 1, 7]
    for i, n in enumerate(lengths):
        s.add(req(f"r{i}", n, max_new=6))
    run_to_end(s, max_steps=2000)
    assert s.blocks.num_free == 6


# --- cancellation ------------------------------------------------------------------------------------

def test_cancel_waiting_request_reports_it_without_running_it():
    s = make(max_num_seqs=1)
    s.add(req("a", 3))
    s.add(req("b", 3))
    plan = s.schedule(0)
    assert s.cancel("b")
    assert "b" not in s.by_request and not s.waiting
    finish_step(s, plan)
    plan = s.schedule(1)
    (notice,) = plan.cancelled
    assert notice.request_id == "b" and notice.reason == "cancelled"
    assert notice.request.request_id == "b"  # never announced: the last stage needs the request
    assert "b" in finish_step(s, plan)


def test_cancel_idle_running_request_frees_blocks_at_once():
    s = make()
    s.add(req("a", 5, max_new=10))
    finish_step(s, s.schedule(0))
    assert s.blocks.num_free < s.blocks.num_blocks
    assert s.cancel("a")
    assert s.blocks.num_free == s.blocks.num_blocks and not s.running
    plan = s.schedule(1)
    assert plan.seq_ids == [] and plan.cancelled[0].request is None  # announced: id only
    assert finish_step(s, plan) == ["a"]
    assert s.idle


def test_cancel_in_flight_request_waits_for_its_step():
    s = make()
    s.add(req("a", 5, max_new=10))
    s.add(req("b", 5, max_new=10))
    plan = s.schedule(0)
    assert s.cancel("a")
    a = s.by_request["a"]
    assert a in s.running and a.blocks  # its chunk is still in the pipeline
    finish_step(s, plan)
    assert a not in s.running and "a" not in s.by_request and a.blocks == []
    nxt = s.schedule(1)
    assert [n.request_id for n in nxt.cancelled] == ["a"]
    assert by_rid(s, nxt) == {"b": 0}


def test_cancel_unknown_or_finished_request_returns_false():
    s = make()
    assert not s.cancel("nope")
    s.add(req("a", 2, max_new=1))
    finish_step(s, s.schedule(0))
    assert not s.cancel("a")


# --- capping to the context ----------------------------------------------------------------------------

def test_max_new_tokens_is_capped_to_the_model_context():
    s = make(max_len=32)
    r = req("a", 20, max_new=50)
    s.add(r)
    assert r.params.max_new_tokens == 12  # 20 + 12 = 32


def test_max_new_tokens_is_capped_to_the_kv_cache():
    s = make(num_blocks=5, max_len=1024)  # 20 token slots
    r = req("a", 15, max_new=50)
    s.add(r)
    assert s.max_len == 20 and r.params.max_new_tokens == 5


def test_cap_counts_resumed_output_tokens():
    s = make(max_len=32)
    r = req("a", 20, max_new=50, output=[1, 2, 3])  # 3 already sent: room for 32 - 23 = 9 more
    s.add(r)
    assert r.params.max_new_tokens == 3 + 9
    plan = s.schedule(0)
    assert plan.input_ids == r.prompt_ids + [1, 2, 3] and plan.out_lens == [3]


def test_small_request_is_not_capped():
    s = make(max_len=32)
    r = req("a", 20, max_new=5)
    s.add(r)
    assert r.params.max_new_tokens == 5


@pytest.mark.parametrize(("prompt_len", "max_new", "output"), [(32, 4, []), (40, 4, []), (3, 2, [5, 6])])
def test_request_without_room_finishes_with_length(prompt_len, max_new, output):
    s = make(max_len=32)
    s.add(req("a", prompt_len, max_new=max_new, output=output))
    assert not s.waiting and "a" not in s.by_request
    plan = s.schedule(0)
    assert plan.seq_ids == []
    (notice,) = plan.cancelled
    assert notice.reason == "length" and notice.request.request_id == "a"
    assert finish_step(s, plan) == ["a"]


@pytest.mark.parametrize(("num_blocks", "max_len"), [(64, 32), (8, 1024)])  # model context / KV cache (32 slots)
@pytest.mark.parametrize("short", [1, 2])
def test_prompt_just_short_of_the_context_makes_the_tokens_that_fit(num_blocks, max_len, short):
    s = make(num_blocks=num_blocks, max_len=max_len)
    r = req("a", s.max_len - short, max_new=50)
    s.add(r)
    assert r.params.max_new_tokens == short
    made, step = 0, 0
    while True:
        plan = s.schedule(step)
        step += 1
        check_plan(s, plan)
        made += sum(plan.sample)
        if finish_step(s, plan) == ["a"]:
            break
    assert made == short and s.idle


def test_a_micro_batch_never_exceeds_max_step_batch():
    """Decode graphs, one-shot all-reduce buffers and the logits reserve are sized by max_step_batch: with 4
    micro-batches in flight and max_num_seqs 10, no plan may carry more than 3 sequences, whatever the mix."""
    s = make(max_num_seqs=10, budget=40, micro_batches=4)
    cap = max_step_batch(10, 4)
    assert cap == 3
    pending, n = [], 0
    for step in range(200):
        while s.free_capacity and n < 40:
            s.add(req(f"r{n}", 3 + (7 * n) % 23, max_new=1 + n % 9))
            n += 1
        plan = s.schedule(step) if len(pending) < 4 else None
        if plan is not None:
            assert len(plan.seq_ids) <= cap, (step, len(plan.seq_ids))
            pending.append(plan)
        if pending and (plan is None or len(pending) >= 4):
            finish_step(s, pending.pop(0))
        if s.idle and not pending and n >= 40:
            break
    assert n == 40 and s.idle and not pending
