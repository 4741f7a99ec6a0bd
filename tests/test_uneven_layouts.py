"""Uneven tensor-parallel shards (``--tp-ratio``) against the unsharded Hugging Face model (CPU, gloo, one
process per rank), as tests/test_layouts.py does for even ones: greedy tokens equal ``generate`` and every
step's logits equal HF's forward. SmolLM2-135M (9 query / 3 KV heads) runs TP 2 at 2:1, which even shards
cannot; tiny random GQA and MHA models run several ratios at TP 2-4, mixed with asymmetric PP, and with the
fp8 KV cache; each rank reports its own KV heads and bytes per token. One uneven pipeline serves through
Redis end to end.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

from hexgen.config import EngineConfig, Layout
from hexgen.engine.offline import run_offline
from hexgen.engine.report import RankReport
from hexgen.engine.runner import ModelSpec
from tests.models import Case, check_against_hf, hf_greedy, llama_config, make_case, mha_case, smol_case

pytestmark = pytest.mark.slow

BUDGET = 32  # max_num_batched_tokens: the 45-token prompt is prefilled in two chunks


@pytest.fixture(scope="module")
def gqa6(tmp_path_factory) -> Case:
    """12 query / 6 KV heads (groups of 2), 5 layers, intermediate 200 (boundaries on 8 columns)."""
    config = llama_config(hidden_size=96, num_attention_heads=12, num_key_value_heads=6, intermediate_size=200,
                          num_hidden_layers=5)
    return make_case(str(tmp_path_factory.mktemp("gqa6")), config, 15)


@pytest.fixture(scope="module")
def mha(tmp_path_factory) -> Case:
    return mha_case(str(tmp_path_factory.mktemp("mha")))


def run(case: Case, hetero, part, ratio, reports: list[RankReport] | None = None, **engine_kw) -> dict:
    layout = Layout.build(case.cfg, hetero, part, ratio)
    engine = EngineConfig(**{"collect_logits": True, "cpu_kv_tokens": 2048, "max_num_batched_tokens": BUDGET,
                             **engine_kw})
    return run_offline(layout, ModelSpec(model_dir=case.model_dir), engine, case.requests,
                       on_report=reports.append if reports is not None else None)


@pytest.mark.parametrize(("fixture", "hetero", "part", "ratio"), [
    ("gqa6", (3, 1), (3, 2), ["3:2:1", "1"]),  # KV heads 3/2/1, query heads 6/4/2, MLP 96/64/40
    ("gqa6", (1, 4), (2, 3), ["1", "3:1:1:1"]),  # TP 4 on the last stage: KV heads 3/1/1/1
    ("mha", (2, 1), (3, 1), ["1:3", "1"]),  # MHA, the larger shard on rank 1
    ("mha", (3,), (4,), ["2:1:1"]),
], ids=["gqa6-3.1-3:2:1", "gqa6-1.4-3:1:1:1", "mha-2.1-1:3", "mha-3-2:1:1"])
def test_uneven_layout_matches_hugging_face(request, fixture, hetero, part, ratio):
    case: Case = request.getfixturevalue(fixture)
    results = run(case, hetero, part, ratio)
    check_against_hf(results, case.requests, case.hf, case.reference)


@pytest.mark.timeout(900)  # two ranks of the real checkpoint on a shared 2-core machine
def test_smollm2_tp2_at_2_to_1_matches_hugging_face(default_model_dir):
    """9 query / 3 KV heads: TP 2 is impossible with even shards, 2:1 gives rank 0 two KV heads."""
    case = smol_case(default_model_dir)
    with pytest.raises(Exception, match="TP degree 2 is not valid"):
        Layout.build(case.cfg, (2,), (30,))
    reports: list[RankReport] = []
    results = run(case, (2,), (30,), ["2:1"], reports)
    check_against_hf(results, case.requests, case.hf, case.reference)
    by_rank = {r.rank: r for r in reports}
    assert [by_rank[r].kv_heads for r in (0, 1)] == [2, 1]


def test_fp8_kv_cache_per_rank_capacity_and_unsharded_tokens(gqa6):
    """The fp8 cache's scales are per KV head, fixed by the first step that writes, so an uneven split
    quantizes exactly as one rank does on the same pipeline (the same micro-batches, so the same first
    step): tokens equal the TP-1 fp8 run's, logits within float32 summation order. Each rank reports its own
    KV heads and bytes per token (in proportion to its share) and the pipeline keeps what every rank holds."""
    reports: list[RankReport] = []
    uneven = run(gqa6, (2, 1), (3, 2), ["5:1", "1"], reports, kv_cache_dtype="fp8")
    whole = run(gqa6, (1, 1), (3, 2), None, kv_cache_dtype="fp8")
    for r in gqa6.requests:
        assert uneven[r.request_id].token_ids == whole[r.request_id].token_ids, r.request_id
        for a, b in zip(uneven[r.request_id].logits, whole[r.request_id].logits):
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    by_rank = {r.rank: r for r in reports}
    assert [by_rank[r].kv_heads for r in range(3)] == [5, 1, 6]
    d = gqa6.cfg.head_dim
    assert [by_rank[r].kv_bytes_per_token for r in range(3)] == [3 * 2 * 5 * d, 3 * 2 * 1 * d, 2 * 2 * 6 * d]
    assert {by_rank[r].kv_tokens for r in range(3)} == {2048}
    assert all(by_rank[r].kv_tokens_fit >= by_rank[r].kv_tokens for r in range(3))


def test_uneven_pipeline_serves_through_redis(tmp_path):
    """redis-server, the head and one worker per stage of a 2:1-uneven pipeline (4 KV heads, TP 2 at 3:1,
    then TP 1): greedy requests through the official client equal Hugging Face's greedy tokens."""
    from hexgen.client import HexGenClient
    from tests.models import load_hf
    from tests.serving_harness import PipelineSpec, start_deployment

    pipe = PipelineSpec("p0", (2, 1), (3, 1), ((3, 1), (1,)))
    dep = start_deployment(str(tmp_path), [pipe], model_config={"num_attention_heads": 4,
                                                                "num_key_value_heads": 4})
    try:
        async def generate():
            async with HexGenClient(dep.url, block_ms=200, timeout_s=60) as client:
                return await asyncio.gather(*[client.generate(p, max_new_tokens=8, temperature=0, ignore_eos=True)
                                              for p in ("hello world", "Once upon a time", "the tiny model")])

        results = asyncio.run(generate())
        log = dep.log("worker-p0-0", tail=200_000)
        assert "tp-ratio 3:1 1" in log
        for rank, heads in ((0, 3), (1, 1)):  # each rank's own KV heads, bytes per token and capacity
            assert f"stage 0 rank {rank}/2: {heads} KV heads, " in log and "fits " in log
    finally:
        dep.stop()
    hf = load_hf(dep.model_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dep.model_dir)
    for text, got in zip(("hello world", "Once upon a time", "the tiny model"), results):
        assert got.finish_reason == "length"
        assert got.token_ids == hf_greedy(hf, tok(text)["input_ids"], 8), text
