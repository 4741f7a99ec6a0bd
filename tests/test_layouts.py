"""Every parallel layout against the unsharded Hugging Face model (CPU, gloo, one process per rank).

Per layout, one batch of prompts of different lengths (one longer than the per-step token budget, so its
prefill is chunked) generates 32 greedy tokens each: the ids must equal ``LlamaForCausalLM.generate`` and
the logits of every step must equal Hugging Face's forward over prompt + generated tokens (float32).
Tiny random configs cover MHA, GQA, KV-head replication (TP > KV heads), uneven MLP shards, tied
embeddings, Llama-3 rope scaling and sharded checkpoints; SmolLM2-135M covers a real checkpoint. A tiny KV
cache forces preemption and recompute. Sampling runs check seeds, EOS and stop strings through the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from hexgen.config import EngineConfig, Layout, ModelConfig
from hexgen.engine.offline import run_offline
from hexgen.engine.report import RankReport
from hexgen.engine.runner import ModelSpec
from hexgen.engine.types import Request, SamplingParams
from tests.models import (
    LENGTHS,
    N_NEW,
    Case,
    build_llama,
    check_against_hf,
    gqa_case,
    hf_greedy,
    llama3_tied_sharded_case,
    llama_config,
    mha_case,
    mqa_case,
    printable_only,
    set_eos,
    smol_case,
)

pytestmark = pytest.mark.slow

BUDGET = 32  # max_num_batched_tokens: the 45-token prompt is prefilled in two chunks


@pytest.fixture(scope="module")
def mha(tmp_path_factory) -> Case:
    return mha_case(str(tmp_path_factory.mktemp("mha")))


@pytest.fixture(scope="module")
def gqa(tmp_path_factory) -> Case:
    return gqa_case(str(tmp_path_factory.mktemp("gqa")))


@pytest.fixture(scope="module")
def mqa(tmp_path_factory) -> Case:
    return mqa_case(str(tmp_path_factory.mktemp("mqa")))


@pytest.fixture(scope="module")
def llama3_tied_sharded(tmp_path_factory) -> Case:
    return llama3_tied_sharded_case(str(tmp_path_factory.mktemp("llama3")))


def run(case: Case, hetero: tuple[int, ...], part: tuple[int, ...], on_report=None, **engine_kw) -> dict:
    layout = Layout.build(case.cfg, hetero, part)
    engine = EngineConfig(**{"collect_logits": True, "cpu_kv_tokens": 2048,
                             "max_num_batched_tokens": BUDGET, **engine_kw})
    return run_offline(layout, ModelSpec(model_dir=case.model_dir), engine, case.requests, on_report=on_report)


@pytest.mark.parametrize(("fixture", "hetero", "part", "engine_kw"), [
    ("mha", (1,), (4,), {"max_num_batched_tokens": 2048}),  # one rank, whole prompts in one step
    ("mha", (2, 1), (3, 1), {}),  # asymmetric TP, uneven partition, MLP 45/45
    ("gqa", (1, 2, 1), (2, 1, 2), {}),  # three stages, TP 2 in the middle
    ("mqa", (3, 1), (3, 1), {}),  # KV head replicated over TP 3, MLP 34/33/33
    ("llama3_tied_sharded", (1, 2), (1, 3), {}),
], ids=["mha-1", "mha-2.1", "gqa-1.2.1", "mqa-3.1", "llama3-tied-sharded-1.2"])
def test_layout_matches_hugging_face(request, fixture, hetero, part, engine_kw):
    case: Case = request.getfixturevalue(fixture)
    assert max(LENGTHS) > BUDGET
    results = run(case, hetero, part, **engine_kw)
    check_against_hf(results, case.requests, case.hf, case.reference)


def test_tiny_kv_cache_preempts_and_stays_token_identical(gqa):
    """12 blocks of 8 tokens hold at most two of the four sequences: the rest are preempted and recomputed."""
    reports: list[RankReport] = []
    results = run(gqa, (2, 1), (3, 2), on_report=reports.append, num_kv_blocks=12, block_size=8)
    by_rank = {r.rank: r for r in reports}
    assert sorted(by_rank) == [0, 1, 2]
    assert (by_rank[0].preemptions or 0) > 0, "the KV cache was not small enough to force a preemption"
    assert by_rank[1].preemptions is None and by_rank[2].preemptions is None  # only the scheduler counts
    check_against_hf(results, gqa.requests, gqa.hf, gqa.reference)


# --- SmolLM2-135M (the embedded default model) -------------------------------------------------------

@pytest.fixture(scope="module")
def smol(default_model_dir) -> Case:
    case = smol_case(default_model_dir)
    lengths = [len(r.prompt_ids) for r in case.requests]
    assert lengths[-1] > BUDGET and len(set(lengths)) == len(lengths)
    return case


@pytest.mark.parametrize(("hetero", "part"), [((3, 1), (20, 10)), ((1, 3), (7, 23))], ids=["3.1", "1.3"])
def test_smollm2_layout_matches_hugging_face(smol, hetero, part):
    results = run(smol, hetero, part)
    check_against_hf(results, smol.requests, smol.hf, smol.reference)


# --- sampling, EOS and stop strings through the engine ---------------------------------------------------

@dataclass
class SamplingCase:
    model_dir: str
    tokenizer: object
    requests: list[Request]
    greedy: list[int]  # HF greedy continuation of the shared prompt, EOS ignored
    eos_at: int  # index in ``greedy`` of the token made EOS
    stop: str
    stop_tokens: int  # completion tokens up to and including the one completing the stop string
    runs: dict[str, dict]


@pytest.fixture(scope="module")
def sampling(tmp_path_factory, tiny_tokenizer) -> SamplingCase:
    """A tiny model with the tiny tokenizer whose EOS is a token greedy decoding reaches at step >= 3, run
    on two layouts with greedy, EOS, stop-string and seeded sampling requests."""
    tok = tiny_tokenizer
    config = llama_config(vocab_size=len(tok))
    model = build_llama(config, seed=21)
    printable_only(model, tok)
    path = str(tmp_path_factory.mktemp("sampling"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    prompt = tok.encode("Once upon a time there was")
    greedy = hf_greedy(model, prompt, N_NEW)
    eos_at = next(j for j in range(3, N_NEW) if greedy[j] not in greedy[:j])
    set_eos(path, greedy[eos_at])

    full = tok.decode(greedy)
    stop, stop_tokens = None, None
    for k in range(4, N_NEW):
        piece = tok.decode([greedy[k]])
        if len(piece.strip()) >= 2 and full.find(piece) == len(tok.decode(greedy[:k])):
            stop, stop_tokens = piece, k + 1
            break
    assert stop is not None, f"no usable stop string in {full!r}"

    greedy_p = SamplingParams(max_new_tokens=N_NEW)
    seeded = dict(max_new_tokens=24, temperature=1.0, top_p=0.95, top_k=100, ignore_eos=True)
    requests = [
        Request("eos", prompt, greedy_p),
        Request("ignore_eos", prompt, SamplingParams(max_new_tokens=N_NEW, ignore_eos=True)),
        Request("stop", prompt, SamplingParams(max_new_tokens=N_NEW, ignore_eos=True, stop=(stop, "never-seen"))),
        Request("seed1a", prompt, SamplingParams(seed=1234, **seeded)),
        Request("seed1b", tok.encode("hello"), SamplingParams(seed=1234, **seeded)),
        Request("seed1c", prompt, SamplingParams(seed=1234, **seeded)),
        Request("seed2", prompt, SamplingParams(seed=99, **seeded)),
    ]
    runs = {}
    for name, (hetero, part) in {"1": ((1,), (4,)), "2.1": ((2, 1), (1, 3))}.items():
        layout = Layout.build(ModelConfig.from_dir(path), hetero, part)
        runs[name] = run_offline(layout, ModelSpec(model_dir=path),
                                 EngineConfig(cpu_kv_tokens=1024, max_num_batched_tokens=BUDGET), requests)
    return SamplingCase(path, tok, requests, greedy, eos_at, stop, stop_tokens, runs)


def test_eos_ends_generation(sampling):
    for res in sampling.runs.values():
        c = res["eos"]
        assert c.finish_reason == "eos"
        assert c.token_ids == sampling.greedy[:sampling.eos_at + 1]  # the EOS id is reported, not its text
        assert c.text == sampling.tokenizer.decode(sampling.greedy[:sampling.eos_at], skip_special_tokens=True)
        ignored = res["ignore_eos"]
        assert ignored.finish_reason == "length" and ignored.token_ids == sampling.greedy


def test_stop_string_ends_generation(sampling):
    full = sampling.tokenizer.decode(sampling.greedy)
    for res in sampling.runs.values():
        c = res["stop"]
        assert c.finish_reason == "stop"
        assert c.token_ids == sampling.greedy[:sampling.stop_tokens]
        assert c.text == full[:full.index(sampling.stop)]
        assert sampling.stop not in c.text


def test_text_is_the_decoded_completion(sampling):
    for res in sampling.runs.values():
        c = res["ignore_eos"]
        assert c.text == sampling.tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_same_seed_gives_same_tokens_across_requests_runs_and_layouts(sampling):
    one, two = sampling.runs["1"], sampling.runs["2.1"]
    a = one["seed1a"].token_ids
    assert len(a) == 24 and one["seed1a"].finish_reason == "length"
    assert one["seed1c"].token_ids == a  # same seed, same prompt, same batch
    assert two["seed1a"].token_ids == a and two["seed1c"].token_ids == a  # another run, another layout
    assert two["seed1b"].token_ids == one["seed1b"].token_ids
    assert one["seed1b"].token_ids != a  # the prompt matters
    assert one["seed2"].token_ids != a and two["seed2"].token_ids == one["seed2"].token_ids
    assert a != sampling.greedy[:24]  # really sampled, not greedy
