"""The official openai SDK against a real deployment of the embedded SmolLM2 (redis-server, head with HTTP,
one CPU worker with a 16-token chunked-prefill budget): logprobs and prompt logprobs against Hugging Face's
fp32 model, n choices with a seed, penalties and the other sampling fields against a reference, /tokenize."""
from __future__ import annotations

import httpx
import pytest
import torch

from hexgen.engine.types import SamplingParams
from tests.http_harness import PipelineSpec, start_http_deployment
from tests.sampling_reference import reference_logits

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(1200)  # a 30-layer model on a shared CPU, the server and the reference

TOL = 1e-3
PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


@pytest.fixture(scope="module")
def dep(tmp_path_factory, default_model_dir):
    d = start_http_deployment(str(tmp_path_factory.mktemp("scoring")), [PipelineSpec("p0", (1,), (30,))],
                              model_dir=default_model_dir, ready_timeout_s=400,
                              worker_args=("--max-num-batched-tokens", "16", "--kv-tokens", "8192"))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def hf(default_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def client(dep):
    return openai.OpenAI(base_url=dep.base_url + "/v1", api_key="none", max_retries=0, timeout=120)


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the fp32 model's logits at every position of ``ids``: [len(ids), vocab]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def hf_greedy(model, ids: list[int], n: int, params: SamplingParams | None = None, eos=()) -> list[int]:
    """Greedy continuation, with ``params``' penalties applied by the plain reference."""
    out: list[int] = []
    for step in range(n):
        with torch.no_grad():
            row = model(torch.tensor([ids + out])).logits[0, -1].float().tolist()
        if params is not None:
            row = reference_logits(row, params, ids, out, step, eos)
        out.append(max(range(len(row)), key=row.__getitem__))
    return out


def as_ids(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


def test_completion_logprobs_with_echo_equal_hf(client, hf):
    model, tok = hf
    prompt_ids = tok(PROMPT)["input_ids"]
    assert len(prompt_ids) > 16  # the prefill is chunked
    r = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=6, temperature=0, logprobs=3,
                                  echo=True, extra_body={"return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    ids = as_ids(lp.tokens)
    assert ids[: len(prompt_ids)] == prompt_ids
    generated = ids[len(prompt_ids):]
    assert generated == hf_greedy(model, prompt_ids, 6)
    ref = hf_logprobs(model, ids)  # [len(ids), vocab]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - float(ref[i - 1, ids[i]])) < TOL, i
        top = ref[i - 1].topk(3)
        got = lp.top_logprobs[i]
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(got[f"token_id:{t}"] - v) < TOL
    assert lp.text_offset == sorted(lp.text_offset)
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == 6


def test_prompt_logprobs_with_max_tokens_zero(client, hf):
    model, tok = hf
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, temperature=0, logprobs=1, echo=True)
    c = r.choices[0]
    prompt_ids = tok(PROMPT)["input_ids"]
    assert c.text == PROMPT and len(c.logprobs.tokens) == len(prompt_ids) and r.usage.completion_tokens == 0
    ref = hf_logprobs(model, prompt_ids)
    want = [None] + [float(ref[i - 1, prompt_ids[i]]) for i in range(1, len(prompt_ids))]
    assert c.logprobs.token_logprobs[0] is None
    assert all(abs(g - w) < TOL for g, w in zip(c.logprobs.token_logprobs[1:], want[1:]))
    assert "".join(c.logprobs.tokens) == PROMPT


def test_chat_logprobs_streamed_and_not_equal_hf(client, hf):
    model, tok = hf
    messages = [{"role": "user", "content": "Name a colour."}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]  # as the head tokenizes chat
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    generated = hf_greedy(model, prompt_ids, len(content))
    ref = hf_logprobs(model, prompt_ids + generated)
    for k, entry in enumerate(content):
        assert abs(entry.logprob - float(ref[len(prompt_ids) - 1 + k, generated[k]])) < TOL
        assert entry.token == tok.decode([generated[k]]) and bytes(entry.bytes) == entry.token.encode()
        assert len(entry.top_logprobs) == 2
    streamed = []
    for chunk in client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                                logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]


def test_n_choices_with_a_seed_are_reproducible(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=12,
              temperature=1.0, n=3, seed=1234)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    texts = [c.message.content for c in sorted(a.choices, key=lambda c: c.index)]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # the choices are seeded apart
    streamed = {0: "", 1: "", 2: ""}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert [streamed[i] for i in range(3)] == texts
    assert a.usage.completion_tokens == b.usage.completion_tokens > 0


@pytest.mark.parametrize(("fields", "changes"), [
    ({"frequency_penalty": 1.5}, False),  # this prompt's first 10 greedy tokens stay the same with it alone
    ({"presence_penalty": 2.0}, True),
    ({"repetition_penalty": 1.8}, True),
    ({"frequency_penalty": 0.8, "presence_penalty": 0.5, "repetition_penalty": 1.3}, True),
])
def test_penalties_match_the_reference(client, hf, fields, changes):
    model, tok = hf
    prompt_ids = tok("a a a a a a a a a a a a")["input_ids"]  # greedy goes on repeating " a"
    r = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=10, temperature=0, logprobs=0,
                                  extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True, **fields})
    got = as_ids(r.choices[0].logprobs.tokens)
    params = SamplingParams(ignore_eos=True, **fields)
    assert got == hf_greedy(model, prompt_ids, 10, params)
    if changes:
        assert got != hf_greedy(model, prompt_ids, 10)  # the penalty changed the output


def test_logit_bias_min_tokens_and_stop_token_ids(client, hf):
    model, tok = hf
    prompt_ids = tok(PROMPT)["input_ids"]
    plain = hf_greedy(model, prompt_ids, 4)
    body = {"return_tokens_as_token_ids": True}
    r = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=4, temperature=0, logprobs=0,
                                  logit_bias={str(plain[0]): -100}, extra_body=body)
    got = as_ids(r.choices[0].logprobs.tokens)
    assert got == hf_greedy(model, prompt_ids, 4, SamplingParams(logit_bias=((plain[0], -100.0),)))
    assert got[0] != plain[0]
    r = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=4, temperature=0,
                                  extra_body={"stop_token_ids": [plain[2]]})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == tok.decode(plain[:2])
    eos = tok.eos_token_id
    r = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=4, temperature=0, logprobs=0,
                                  extra_body={"min_tokens": 4, "stop_token_ids": [plain[1]], **body})
    got = as_ids(r.choices[0].logprobs.tokens)
    assert got == hf_greedy(model, prompt_ids, 4, SamplingParams(min_tokens=4, stop_token_ids=(plain[1],)), (eos,))
    assert plain[1] not in got and r.choices[0].finish_reason == "length"
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=1.0, seed=3,
                                  extra_body={"min_p": 1.0})  # only the top token survives: greedy
    assert r.choices[0].text == tok.decode(plain)


def test_prompt_lists_and_errors_in_openai_terms(client, dep):
    r = client.completions.create(model="tiny", prompt=["Hello", "Goodbye"], max_tokens=2, temperature=0, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", stop=[""], max_tokens=2)
    assert e.value.body["param"] == "stop" and "non-empty" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"logit_bias": {"99999999": 1}})
    assert e.value.body["param"] == "logit_bias"


def test_tokenize_detokenize_version(dep, hf):
    _, tok = hf
    r = httpx.post(dep.base_url + "/tokenize", json={"prompt": PROMPT}).json()
    assert r["tokens"] == tok(PROMPT)["input_ids"] and r["count"] == len(r["tokens"]) and r["max_model_len"] > 0
    assert httpx.post(dep.base_url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == PROMPT
    assert httpx.get(dep.base_url + "/version").json()["version"]
    assert httpx.post(dep.base_url + "/detokenize", json={"tokens": [-1]}).status_code == 400
