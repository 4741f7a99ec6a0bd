"""The prefix cache's bookkeeping (no processes): chained block hashes, the block manager's references, LRU
eviction and capacity, and the scheduler's hits (positions after the cached prefix, at least one token
computed, preemption, cancellation, failover's resumed tokens)."""
from __future__ import annotations

from hexgen.engine.block_hash import block_hashes, chain, prefix_seed
from hexgen.engine.kv_cache import BlockManager
from hexgen.engine.plan import NewSequence, StepPlan, StepResult
from hexgen.engine.scheduler import Scheduler
from hexgen.engine.types import Request, SamplingParams

BLOCK = 4
SEED = prefix_seed("tiny", "float32", "auto")


def make(num_blocks: int = 64, budget: int = 64, max_num_seqs: int = 8, cache: bool = True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BLOCK, cache, SEED), max_num_seqs, budget, 1024, 1)


def req(rid: str, prompt: list[int], max_new: int = 2, output: list[int] | None = None) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_new_tokens=max_new), output_ids=list(output or []))


def finish_step(sched: Scheduler, plan: StepPlan, token: int = 7) -> list[str]:
    seqs = {s.seq_id: s for s in sched.running}
    result = StepResult(plan.step_id)
    for sid, sample in zip(plan.seq_ids, plan.sample):
        if sample and sid in seqs:
            seq = seqs[sid]
            result.seq_ids.append(sid)
            result.tokens.append(token)
            result.finished.append(seq.num_output + 1 >= seq.request.params.max_new_tokens)
    return sched.update(plan, result)


def drain(sched: Scheduler) -> list[StepPlan]:
    plans, step = [], 0
    while (plan := sched.schedule(step)) is not None:
        plans.append(plan)
        finish_step(sched, plan)
        step += 1
    return plans


def check_refs(blocks: BlockManager, held: list[list[int]]) -> None:
    """Every block's reference count equals the number of block tables holding it; free + held = all."""
    want = [0] * blocks.num_blocks
    for table in held:
        for b in table:
            want[b] += 1
    assert [blocks.refs(b) for b in range(blocks.num_blocks)] == want
    assert blocks.num_free == sum(1 for n in want if n == 0)


PROMPT = list(range(100, 118))  # 18 tokens: 4 full blocks and 2 more


def test_hashes_are_chained_and_seeded():
    a = block_hashes(PROMPT, BLOCK, SEED)
    assert len(a) == 4 and len(set(a)) == 4
    assert a[1] == chain(a[0], PROMPT[4:8])
    # A different first block changes every later hash; a different seed (model or dtypes) changes all.
    b = block_hashes([99] + PROMPT[1:], BLOCK, SEED)
    assert all(x != y for x, y in zip(a, b))
    assert set(block_hashes(PROMPT, BLOCK, prefix_seed("tiny", "float32", "fp8"))).isdisjoint(a)
    assert block_hashes(PROMPT, BLOCK, SEED) == a  # stable (no per-process salt)


def test_second_request_starts_after_the_cached_prefix():
    s = make()
    s.add(req("a", PROMPT))
    drain(s)
    assert s.blocks.num_cached == 4 and s.blocks.num_free == 64  # resident, unreferenced, still free
    s.add(req("b", PROMPT + [1, 2, 3]))
    plan = s.schedule(0)
    seq = s.running[0]
    assert seq.cached_tokens == 16
    assert plan.positions == list(range(16, 21)) and plan.input_ids == (PROMPT + [1, 2, 3])[16:]
    assert plan.ctx_lens == [21] and plan.q_lens == [5]
    a_blocks = plan.block_tables[0][:4]
    assert plan.new_requests[0].cached_tokens == 16
    check_refs(s.blocks, [seq.blocks])
    finish_step(s, plan)
    drain(s)
    assert s.stats.prefix_hits == 16 and s.stats.prefix_queries == 18 + 21
    check_refs(s.blocks, [])
    # The same prompt again: the last full block is recomputed so that one token is left to compute.
    s.add(req("c", PROMPT[:16]))
    plan = s.schedule(0)
    assert plan.positions == [12, 13, 14, 15] and plan.block_tables[0][:3] == a_blocks[:3]
    assert plan.block_tables[0][3] not in a_blocks


def test_a_request_asking_for_prompt_logprobs_computes_its_whole_prompt():
    """Prompt logprobs come from the last stage's rows of the prompt: a cached prefix would leave them out."""
    s = make()
    s.add(req("a", PROMPT))
    drain(s)
    scored = Request("b", PROMPT + [1, 2, 3], SamplingParams(max_new_tokens=2, prompt_logprobs=0))
    s.add(scored)
    plan = s.schedule(0)
    assert s.running[0].cached_tokens == 0 and plan.positions[0] == 0


def test_running_sequences_share_blocks_and_release_them():
    s = make()
    s.add(req("a", PROMPT, max_new=4))
    plan = s.schedule(0)
    finish_step(s, plan)  # a's prompt is written: its 4 full blocks are registered while a still runs
    s.add(req("b", PROMPT[:12] + [5, 5, 5, 5, 5]))
    plan = s.schedule(1)
    a, b = s.running
    assert b.blocks[:3] == a.blocks[:3] and b.cached_tokens == 12
    check_refs(s.blocks, [a.blocks, b.blocks])
    assert s.cancel("b")
    finish_step(s, plan)
    check_refs(s.blocks, [a.blocks])  # b's references released, a's shared blocks still held once
    drain(s)
    check_refs(s.blocks, [])


def test_cached_blocks_are_evicted_lru_only_when_needed():
    blocks = BlockManager(8, BLOCK, True, SEED)
    a = blocks.allocate(4)
    ha = block_hashes(PROMPT, BLOCK, SEED)
    for b, h in zip(a, ha):
        blocks.register(b, h)
    blocks.free(a)
    assert blocks.num_free == 8 and blocks.evictions == 0
    got = blocks.allocate(4)  # the never-used blocks come first
    assert set(got).isdisjoint(a) and blocks.evictions == 0
    one = blocks.allocate(1)  # then the least recently used cached one: a's last block (freed first)
    assert one == [a[3]] and blocks.evictions == 1
    assert blocks.match(ha) == a[:3]  # the chain up to the evicted block still hits
    assert not blocks.can_allocate(1)
    blocks.free(a[:3])
    blocks.free(got + one)
    assert blocks.num_free == 8


def test_a_full_pool_never_fails_a_request_that_fits_without_the_cache():
    """Many distinct prompts fill the pool with cached blocks; a request needing the whole pool still runs."""
    s = make(num_blocks=8, budget=64)
    for i in range(6):
        s.add(req(f"p{i}", [200 + 20 * i + k for k in range(17)], max_new=1))
        drain(s)
    assert s.blocks.num_cached > 0 and s.blocks.num_free == 8
    s.add(req("big", list(range(500, 531)), max_new=1))  # 31 + 1 tokens: all 8 blocks
    plans = drain(s)
    assert plans and plans[0].q_lens == [31] and len(plans[0].block_tables[0]) == 8
    assert s.blocks.evictions > 0
    check_refs(s.blocks, [])


def test_preempted_sequence_reuses_its_own_blocks():
    s = make(num_blocks=6, budget=8)
    s.add(req("a", list(range(100, 108)), max_new=12))
    s.add(req("b", list(range(300, 308)), max_new=12))
    seen_hit = False
    step = 0
    while (plan := s.schedule(step)) is not None:
        finish_step(s, plan)
        step += 1
        if s.stats.preemptions and s.stats.prefix_hits:
            seen_hit = True
    assert s.stats.preemptions > 0 and seen_hit
    check_refs(s.blocks, [])


def test_resumed_request_hits_its_prompt_and_output():
    """A request taken over from a dead pipeline carries its emitted tokens: prompt + output is looked up."""
    s = make()
    s.add(req("a", PROMPT, max_new=1))
    drain(s)
    s.add(req("a2", PROMPT, max_new=8, output=[7, 7, 7]))
    plan = s.schedule(0)
    assert plan.positions[0] == 16 and plan.ctx_lens == [21]
    assert s.running[0].cached_tokens == 16


def test_cache_off_shares_nothing():
    s = make(cache=False)
    s.add(req("a", PROMPT))
    drain(s)
    s.add(req("b", PROMPT))
    plan = s.schedule(0)
    assert plan.positions == list(range(18)) and s.running[0].cached_tokens == 0
    assert s.blocks.num_cached == 0


def test_plan_carries_cached_tokens():
    plan = StepPlan(3, new_requests=[NewSequence(5, req("x", [1, 2]), 12)])
    back = StepPlan.decode(plan.encode())
    assert back.new_requests[0].cached_tokens == 12 and back.new_requests[0].seq_id == 5


def test_on_by_default_and_turned_off_by_flag_or_toml():
    import pytest

    from hexgen.cli import bench as bench_cli
    from hexgen.cli import worker as worker_cli
    from hexgen.cli.generate import resolve_engine
    from hexgen.config import EngineConfig, Layout, preset
    from hexgen.errors import ConfigError
    from hexgen.wire.settings import settings_from_dict

    assert EngineConfig().prefix_cache is True
    with pytest.raises(ConfigError, match="prefix_cache: 'no' must be true or false"):
        EngineConfig(prefix_cache="no")
    base = {"model": {"preset": "tiny"}}
    assert settings_from_dict(base).engine.prefix_cache is True
    assert settings_from_dict({**base, "engine": {"prefix_cache": False}}).engine.prefix_cache is False
    with pytest.raises(ConfigError, match="engine.prefix_cache: 'off' must be true or false"):
        settings_from_dict({**base, "engine": {"prefix_cache": "off"}})
    assert settings_from_dict(base).engine.prefix_routing is True
    assert settings_from_dict({**base, "engine": {"prefix_routing": False}}).engine.prefix_routing is False
    with pytest.raises(ConfigError, match="engine.prefix_routing: 1 must be true or false"):
        settings_from_dict({**base, "engine": {"prefix_routing": 1}})
    with pytest.raises(ConfigError, match="engine.prefix: unknown key"):
        settings_from_dict({**base, "engine": {"prefix": False}})
    w = worker_cli.build_parser()
    assert "prefix_cache" not in worker_cli.engine_overrides(w.parse_args(["--stage", "0"]))
    assert worker_cli.engine_overrides(w.parse_args(["--stage", "0", "--no-prefix-cache"]))["prefix_cache"] is False
    layout = Layout.build(preset("tiny"), None)
    args = bench_cli._parser().parse_args(["throughput", "--preset", "tiny", "--random-weights", "--device", "cpu"])
    assert resolve_engine(args, layout).prefix_cache is True
    args = bench_cli._parser().parse_args(["throughput", "--preset", "tiny", "--random-weights", "--device", "cpu",
                                           "--no-prefix-cache"])
    assert resolve_engine(args, layout).prefix_cache is False
