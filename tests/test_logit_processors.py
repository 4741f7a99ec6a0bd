"""Tests for hexgen.engine.logit_processors and the sampler's min-p, each against a plain-Python reference."""
from __future__ import annotations

import random

import pytest
import torch

from hexgen.engine.logit_processors import History, process_logits
from hexgen.engine.logprobs import hidden_logprobs, token_logprobs
from hexgen.engine.output import OutputProcessor
from hexgen.engine.sampler import filter_probs, sample
from hexgen.engine.types import Request, SamplingParams
from hexgen.errors import ConfigError
from tests.sampling_reference import reference_logits

VOCAB = 12
EOS = (11,)


def reference(logits: list[float], p: SamplingParams, prompt: list[int], output: list[int], step: int) -> list[float]:
    return reference_logits(logits, p, prompt, output, step, EOS)


def test_process_logits_matches_the_reference_for_a_mixed_batch():
    rng = random.Random(0)
    params = [
        SamplingParams(),
        SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4, repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.8, logit_bias=((3, 5.0), (4, -100.0))),
        SamplingParams(min_tokens=3, stop_token_ids=(2,), frequency_penalty=1.5),
        SamplingParams(min_tokens=3, ignore_eos=True, stop_token_ids=(5,)),
        SamplingParams(min_tokens=1),  # step 2: no longer masked
    ]
    steps = [0, 4, 1, 2, 0, 2]
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 6))] for _ in params]
    outputs = [[rng.randrange(VOCAB) for _ in range(s)] for s in steps]
    logits = torch.randn(len(params), VOCAB, generator=torch.Generator().manual_seed(1)) * 3  # [6, VOCAB]
    pen = [i for i, p in enumerate(params) if p.penalized]
    history = History(rows=pen, prompt=[prompts[i] for i in pen], output=[outputs[i] for i in pen])
    got = process_logits(logits.clone(), params, steps, history, EOS)
    want = torch.tensor([reference(logits[i].tolist(), p, prompts[i], outputs[i], steps[i])
                         for i, p in enumerate(params)])
    torch.testing.assert_close(got, want)


def test_pending_device_tokens_count_as_generated():
    """A token of a step still in flight (on the device only) is penalized as if it were in the history."""
    p = SamplingParams(frequency_penalty=1.0, presence_penalty=0.5)
    logits = torch.zeros(2, VOCAB)
    in_flight = torch.tensor([7, 3])  # ids of the previous step's rows; row 1 of it is our row 0
    h = History(rows=[0, 1], prompt=[[1], [1]], output=[[3], []], pending=(in_flight, [1, 0], [0, 1]))
    got = process_logits(logits, [p, p], [2, 1], h)
    want0 = torch.tensor(reference([0.0] * VOCAB, p, [1], [3, 3], 2))
    want1 = torch.tensor(reference([0.0] * VOCAB, p, [1], [7], 1))
    torch.testing.assert_close(got, torch.stack([want0, want1]))


def test_greedy_follows_processed_logits():
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.0]])  # argmax 0
    assert sample(logits, [SamplingParams(logit_bias=((2, 10.0),))], [0]).tolist() == [2]
    assert sample(logits, [SamplingParams(min_tokens=1)], [0], eos_ids=(0,)).tolist() == [1]
    h = History(rows=[0], prompt=[[0]], output=[[]])
    # repetition 10 on the prompt token 0: 5 / 10 = 0.5 < 1.0
    assert sample(logits, [SamplingParams(repetition_penalty=10.0)], [0], h).tolist() == [1]


def test_min_p_keeps_tokens_above_a_fraction_of_the_top_probability():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -3.0])
    for t, min_p in ((1.0, 0.3), (0.7, 0.5), (2.0, 0.05), (1.0, 1.0)):
        probs = torch.softmax(logits / t, dim=-1)
        keep = probs >= min_p * probs.max()
        want = torch.where(keep, probs, torch.zeros_like(probs))
        torch.testing.assert_close(filter_probs(logits, t, min_p=min_p), want / want.sum())


def test_min_p_sampling_draws_only_kept_tokens():
    logits = torch.tensor([2.0, 1.9, 0.0, -1.0]).expand(400, -1)
    params = [SamplingParams(temperature=1.0, min_p=0.5, seed=s) for s in range(400)]
    ids = sample(logits, params, [0] * 400)
    assert set(ids.tolist()) == {0, 1}


def test_token_logprobs_equal_log_softmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([4, 0, 49])
    rows = token_logprobs(logits, ids, 5)
    ref = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(rows.chosen, ref.gather(1, ids[:, None])[:, 0])
    top = ref.sort(dim=-1, descending=True)
    torch.testing.assert_close(rows.top_values, top.values[:, :5])
    host = rows.to_host([0, 2, 5])
    assert [len(h[1]) for h in host] == [0, 2, 5] and host[1][1][0][0] == int(top.indices[1, 0])


def test_hidden_logprobs_are_computed_in_chunks_with_the_same_result(monkeypatch):
    import hexgen.engine.logprobs as lp

    head = torch.nn.Linear(8, 30)
    hidden = torch.randn(11, 8, generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, 30, (11,), generator=torch.Generator().manual_seed(4))
    whole = token_logprobs(head(hidden), targets, 3)
    monkeypatch.setattr(lp, "ROW_CHUNK", 4)
    chunked = hidden_logprobs(head, hidden, targets, 3)
    torch.testing.assert_close(chunked.chosen, whole.chosen)
    torch.testing.assert_close(chunked.top_ids, whole.top_ids)


def test_stop_token_ids_finish_with_stop_and_no_text():
    proc = OutputProcessor(None, EOS)
    proc.add(Request("r", [1, 2], SamplingParams(max_new_tokens=9, stop_token_ids=(6,))))
    assert proc.step("r", 3).finish_reason is None
    out = proc.step("r", 6)
    assert out.finish_reason == "stop" and out.ids == [6]


@pytest.mark.parametrize(("kw", "msg"), [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"logit_bias": ((1, 101.0),)}, "logit_bias"),
    ({"stop_token_ids": (-1,)}, "stop_token_ids"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
])
def test_sampling_params_name_the_bad_field(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        SamplingParams(**kw)


def test_sampling_params_round_trip():
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.1, min_p=0.1, min_tokens=2,
                       logit_bias=((5, -1.0),), stop_token_ids=(7, 8), logprobs=3, prompt_logprobs=0)
    assert SamplingParams.from_dict(p.to_dict()) == p


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_processing_sampling_and_logprobs_on_cuda_match_the_cpu():
    """The same batch on the GPU: processed logits, greedy and seeded picks, and logprobs as on the CPU."""
    params = [SamplingParams(presence_penalty=0.7, frequency_penalty=0.3, repetition_penalty=1.2, seed=1,
                             temperature=0.8, min_p=0.05),
              SamplingParams(logit_bias=((3, 4.0),), min_tokens=2, stop_token_ids=(2,)),
              SamplingParams(temperature=1.0, top_k=5, seed=9)]
    steps = [3, 0, 1]
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(5)) * 4  # [3, 1000]

    def run(device: str):
        x = logits.to(device)
        pending = torch.tensor([9, 11], device=device)
        h = History(rows=[0], prompt=[[1, 2, 3]], output=[[4, 4, 5]], pending=(pending, [1], [0]))
        got = process_logits(x.clone(), params, steps, h, (999,))
        ids = sample(x, params, steps, h, (999,))
        return got.cpu(), ids.cpu(), token_logprobs(x, ids, 4).chosen.cpu()

    cpu, gpu = run("cpu"), run("cuda")
    torch.testing.assert_close(gpu[0], cpu[0])
    assert gpu[1].tolist() == cpu[1].tolist()
    torch.testing.assert_close(gpu[2], cpu[2], atol=1e-4, rtol=1e-4)
