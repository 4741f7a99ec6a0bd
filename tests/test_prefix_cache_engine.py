"""The prefix cache through the engine (CPU, gloo, one process per rank): later requests reuse the K/V of
earlier ones' prefixes on every stage and still generate Hugging Face's greedy tokens with its logits.

Requests come in two phases (the second starts once the first has finished, hexgen.bench.workload's
PhasedSource): phase 1 writes a shared system prompt's blocks; phase 2 sends that prompt with new
questions, the prompt alone (its last full block is recomputed), a resumed request whose prefix is cached
and one whose prefix is not (what a pipeline that takes over a dead one's request meets), and an unrelated
prompt. Layouts: one rank, an asymmetric two-stage one with TP 3 > 1 KV head, three stages; then the fp8
cache (on against off), a tiny cache (preemption, eviction) and the cache turned off.
"""
from __future__ import annotations

import random

import pytest
import torch

from hexgen.bench.workload import PhasedSource
from hexgen.config import EngineConfig, Layout
from hexgen.engine.offline import run_offline
from hexgen.engine.report import RankReport
from hexgen.engine.runner import ModelSpec
from hexgen.engine.types import Request, SamplingParams
from tests.models import Case, check_against_hf, gqa_case, hf_greedy, mqa_case

pytestmark = pytest.mark.slow

N_NEW = 12
BLOCK = 8
BUDGET = 32  # the 41-token system prompt is prefilled in two chunks


def phases(vocab: int, hf, seed: int = 5) -> tuple[list[list[Request]], dict[str, list[int]]]:
    """The two phases of requests and HF's greedy tokens for each (a resumed request: its remaining ones)."""
    rng = random.Random(seed)
    words = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    system = words(41)
    other = words(30)
    full = hf_greedy(hf, system + [7, 8], N_NEW)  # what the resumed requests had emitted part of
    params = SamplingParams(max_new_tokens=N_NEW, ignore_eos=True)
    first = [Request("p1-sys", system + words(5), params), Request("p1-other", other, params)]
    second = [
        Request("p2-q1", system + words(9), params),
        Request("p2-q2", system + words(17), params),
        Request("p2-same", list(system), params),
        Request("p2-resumed", system + [7, 8], params, output_ids=full[:4]),  # prefix cached here
        Request("p2-resumed-cold", other[:3] + [7, 8], params, output_ids=[9, 10, 11]),  # nothing cached
        Request("p2-new", words(23), params),
    ]
    ref = {}
    for r in first + second:
        ref[r.request_id] = hf_greedy(hf, r.prompt_ids + r.output_ids, N_NEW - len(r.output_ids))
    return [first, second], ref


def run(case: Case, hetero, part, phase_list, reports=None, **engine_kw) -> dict:
    layout = Layout.build(case.cfg, hetero, part)
    engine = EngineConfig(**{"collect_logits": True, "cpu_kv_tokens": 2048, "max_num_batched_tokens": BUDGET,
                             "block_size": BLOCK, **engine_kw})
    every = [r for p in phase_list for r in p]
    return run_offline(layout, ModelSpec(model_dir=case.model_dir), engine, every, source=PhasedSource(phase_list),
                       on_report=reports.append if reports is not None else None)


def check(case: Case, results: dict, phase_list, ref: dict) -> None:
    every = [r for p in phase_list for r in p]
    for r in every:
        c = results[r.request_id]
        assert c.finish_reason == "length", (r.request_id, c.finish_reason)
        assert c.token_ids == ref[r.request_id], f"{r.request_id}: tokens differ from HF\n ours {c.token_ids}" \
                                                  f"\n   hf {ref[r.request_id]}"
    fresh = [r for r in every if not r.output_ids]
    check_against_hf(results, fresh, case.hf, {r.request_id: ref[r.request_id] for r in fresh})


@pytest.fixture(scope="module")
def gqa(tmp_path_factory) -> Case:
    return gqa_case(str(tmp_path_factory.mktemp("gqa")))


@pytest.fixture(scope="module")
def mqa(tmp_path_factory) -> Case:
    return mqa_case(str(tmp_path_factory.mktemp("mqa")))


@pytest.mark.parametrize(("fixture", "hetero", "part"), [
    ("gqa", (1,), (5,)),
    ("mqa", (3, 1), (3, 1)),  # asymmetric; TP 3 replicates the one KV head
    ("gqa", (1, 2, 1), (2, 1, 2)),
], ids=["gqa-1", "mqa-3.1", "gqa-1.2.1"])
def test_cached_prefixes_match_hugging_face(request, fixture, hetero, part):
    case: Case = request.getfixturevalue(fixture)
    phase_list, ref = phases(case.cfg.vocab_size, case.hf)
    results = run(case, hetero, part, phase_list)
    check(case, results, phase_list, ref)
    cached = {rid: c.cached_tokens for rid, c in results.items()}
    # Whole blocks of the 41-token system prompt: 5 blocks of 8; the prompt alone recomputes its last block.
    assert cached["p2-q1"] == cached["p2-q2"] == cached["p2-resumed"] == 40
    assert cached["p2-same"] == 40  # 41 tokens: blocks 0-4 cached, token 40 computed
    assert cached["p1-sys"] == cached["p1-other"] == cached["p2-new"] == 0
    assert cached["p2-resumed-cold"] == 0


def test_cache_off_computes_everything(gqa):
    phase_list, ref = phases(gqa.cfg.vocab_size, gqa.hf)
    results = run(gqa, (1, 1), (3, 2), phase_list, prefix_cache=False)
    check(gqa, results, phase_list, ref)
    assert all(c.cached_tokens == 0 for c in results.values())


def test_tiny_cache_preempts_evicts_and_stays_token_identical(gqa):
    """14 blocks of 8 tokens: phase 2 cannot hold every sequence, so sequences are preempted and cached
    blocks evicted; every request still finishes with HF's tokens."""
    phase_list, ref = phases(gqa.cfg.vocab_size, gqa.hf)
    reports: list[RankReport] = []
    results = run(gqa, (2, 1), (3, 2), phase_list, reports, num_kv_blocks=14)
    leader = [r for r in reports if r.preemptions is not None]
    assert len(leader) == 1 and leader[0].preemptions > 0, "the KV cache was not small enough"
    check(gqa, results, phase_list, ref)


def test_fp8_cache_on_matches_off(gqa):
    """The fp8 cache: the same tokens and logits with and without the prefix cache (the first step writes
    the same tokens in both runs, so the scales are the same)."""
    phase_list, _ = phases(gqa.cfg.vocab_size, gqa.hf)
    on = run(gqa, (1, 1), (3, 2), phase_list, kv_cache_dtype="fp8")
    off = run(gqa, (1, 1), (3, 2), phase_list, kv_cache_dtype="fp8", prefix_cache=False)
    assert on["p2-q1"].cached_tokens == 40
    for rid, c in off.items():
        assert on[rid].token_ids == c.token_ids and len(c.token_ids) > 0, rid
        for a, b in zip(on[rid].logits, c.logits):
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_with_cached_prefixes_match_hugging_face(gqa):
    """Decode steps in CUDA graphs over block tables that start with shared cached blocks (float32)."""
    phase_list, ref = phases(gqa.cfg.vocab_size, gqa.hf)
    results = run(gqa, (1,), (5,), phase_list, device="cuda", cuda_graphs=True, num_kv_blocks=256,
                  collect_logits=False)
    for r in [r for p in phase_list for r in p]:
        assert results[r.request_id].token_ids == ref[r.request_id], r.request_id
    assert results["p2-q1"].cached_tokens == 40 and results["p2-resumed"].cached_tokens == 40
