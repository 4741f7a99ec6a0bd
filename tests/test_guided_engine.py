"""Guided decoding in the engine on CPU with the embedded SmolLM2: constrained answers validate, the
asynchronous loop (masks filled while the next step is already in flight, matchers caught up on the step
before) gives the same tokens as the synchronous loop, and a request resumed with the tokens it already
produced (failover) continues exactly as the uninterrupted one did."""
from __future__ import annotations

import json
import re

import pytest
import torch

from hexgen.config import EngineConfig, Layout, ModelConfig
from hexgen.engine.offline import run_offline
from hexgen.engine.runner import ModelSpec
from hexgen.engine.types import Request, SamplingParams
from hexgen.head.structured import GrammarCompiler, parse_structured

pytestmark = pytest.mark.slow

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
REGEX = r"[0-9]{3}-[0-9]{4}"
RESUME_AT = 4


@pytest.fixture(scope="module")
def setup(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    comp = GrammarCompiler(tok)
    schema = comp.compile(parse_structured({"guided_json": json.dumps(SCHEMA)}, chat=False), None)
    regex = comp.compile(parse_structured({"guided_regex": REGEX}, chat=False), None)

    def chat(text: str) -> list[int]:
        prompt = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False)
        return tok(prompt, add_special_tokens=False)["input_ids"]

    requests = [
        Request("json-greedy", chat("Invent a person."), SamplingParams(max_new_tokens=32, grammar=schema)),
        Request("json-sampled", chat("Invent a person."),
                SamplingParams(max_new_tokens=32, temperature=1.0, seed=5, grammar=schema)),
        Request("regex", chat("A phone number?"),
                SamplingParams(max_new_tokens=12, temperature=0.7, seed=9, grammar=regex)),
        Request("free", chat("Say hi."), SamplingParams(max_new_tokens=8)),
    ]
    return default_model_dir, tok, requests


def run(model_dir: str, requests: list[Request], **engine_kw):
    cfg = ModelConfig.from_dir(model_dir)
    layout = Layout.build(cfg, (1,), (cfg.num_layers,))
    engine = EngineConfig(**{"cpu_kv_tokens": 4096, **engine_kw})
    return run_offline(layout, ModelSpec(model_dir=model_dir), engine, requests)


@pytest.fixture(scope="module")
def fast(setup):
    """The asynchronous loop (the default for one stage)."""
    model_dir, _, requests = setup
    return run(model_dir, requests)


def test_constrained_answers_validate(fast):
    for rid in ("json-greedy", "json-sampled"):
        assert fast[rid].finish_reason == "eos", fast[rid].text
        person = json.loads(fast[rid].text)
        assert set(person) == {"name", "age"} and isinstance(person["age"], int) and len(person["name"]) <= 20
    assert re.fullmatch(REGEX, fast["regex"].text), fast["regex"].text


def test_synchronous_loop_and_a_resumed_request_agree(setup, fast):
    """The synchronous loop, plus the sampled JSON request resumed after RESUME_AT of its tokens."""
    model_dir, _, requests = setup
    done = fast["json-sampled"].token_ids
    base = next(r for r in requests if r.request_id == "json-sampled")
    resumed = Request("json-resumed", base.prompt_ids, base.params, output_ids=done[:RESUME_AT])
    slow = run(model_dir, [*requests, resumed], async_steps=False)
    assert {k: v.token_ids for k, v in slow.items() if k != "json-resumed"} == \
        {k: v.token_ids for k, v in fast.items()}
    assert slow["json-resumed"].token_ids == done[RESUME_AT:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_answers_validate_and_a_resumed_request_agrees(setup):
    """The device path: masks copied to the GPU and applied there, with CUDA graphs and asynchronous steps.
    The resumed request is the greedy one (a batch of another size may move float32 logits by rounding)."""
    model_dir, _, requests = setup
    first = run(model_dir, requests, device="cuda", dtype="float32")
    test_constrained_answers_validate(first)
    done = first["json-greedy"].token_ids
    base = next(r for r in requests if r.request_id == "json-greedy")
    again = run(model_dir, [*requests, Request("json-resumed", base.prompt_ids, base.params,
                                               output_ids=done[:RESUME_AT])], device="cuda", dtype="float32")
    assert again["json-resumed"].token_ids == done[RESUME_AT:]
