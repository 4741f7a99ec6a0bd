"""Accuracy of the FP8 KV cache against the model-dtype cache on the same weights (``hexgen bench kv-accuracy``).

Both runs generate greedily from the same fixed prompts with per-step logits collected. For prompt p the
reference (``kv_cache_dtype="auto"``) makes tokens r_1..r_n with logits L_1..L_n, the FP8 run f_1..f_n with
logits M_1..M_n, and m_p is the number of leading tokens they share (n when all do). Reported:

- greedy agreement: Σ_p m_p / Σ_p n (the share of tokens generated before the runs part), the share of
  prompts whose n tokens are identical, and the share whose first token is;
- logit error over the steps whose contexts are still identical, t ≤ min(m_p + 1, n) (step m_p + 1 is the
  first that differs in its choice, not its context): max_t ‖M_t − L_t‖∞, that relative to max_t ‖L_t‖∞,
  and the mean of |M_t − L_t| over those steps and the vocabulary.
"""

from __future__ import annotations

import dataclasses

import torch

from hexgen.config import EngineConfig, Layout
from hexgen.engine.offline import run_offline
from hexgen.engine.runner import ModelSpec
from hexgen.engine.types import Request, SamplingParams

PROMPTS = (
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain how a binary search works, step by step.",
    "Once upon a time, in a village at the edge of a great forest, there lived",
    "List three prime numbers greater than 100 and explain why each is prime.",
    "Translate into French: The weather is nice today, so we will walk to the market.",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Summarize the causes of the First World War in two sentences.",
)


def prompt_ids(model: ModelSpec, vocab_size: int, num_prompts: int = len(PROMPTS), seed: int = 0) -> list[list[int]]:
    """The fixed prompt set: ``PROMPTS`` through the model's tokenizer, or (no tokenizer: random-weight presets)
    seeded random ids of lengths 16, 48, 80, ... over [3, vocab)."""
    from hexgen.engine.last_stage import load_model_tokenizer

    tok = load_model_tokenizer(model)
    if tok is not None:
        texts = [PROMPTS[i % len(PROMPTS)] for i in range(num_prompts)]
        return [tok.encode(t) for t in texts]
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (16 + 32 * i,), generator=g).tolist() for i in range(num_prompts)]


def _generate(
    layout: Layout,
    model: ModelSpec,
    engine: EngineConfig,
    prompts: list[list[int]],
    new_tokens: int,
    devices: list[int] | None,
) -> list[tuple[list[int], list[torch.Tensor]]]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    requests = [Request(f"acc-{i}", p, params) for i, p in enumerate(prompts)]
    results = run_offline(layout, model, engine, requests, devices=devices)
    return [(results[r.request_id].token_ids, results[r.request_id].logits) for r in requests]


def compare(ref: list[tuple[list[int], list[torch.Tensor]]], other: list[tuple[list[int], list[torch.Tensor]]]) -> dict:
    """The module docstring's figures from two runs' (tokens, per-step logits [vocab]) per prompt."""
    shared = total = identical = first = 0
    max_abs = max_ref = abs_sum = 0.0
    elems = steps = 0
    for (r_tok, r_log), (o_tok, o_log) in zip(ref, other):
        n = len(r_tok)
        m = next((t for t, (a, b) in enumerate(zip(r_tok, o_tok)) if a != b), min(n, len(o_tok)))
        shared += m
        total += n
        identical += int(m == n and len(o_tok) == n)
        first += int(m > 0)
        for t in range(min(m + 1, n, len(o_log))):  # same context up to and including step m + 1
            diff = (o_log[t].float() - r_log[t].float()).abs()
            max_abs = max(max_abs, diff.max().item())
            max_ref = max(max_ref, r_log[t].float().abs().max().item())
            abs_sum += diff.sum().item()
            elems += diff.numel()
            steps += 1
    return {
        "prompts": len(ref),
        "tokens_per_prompt": total // max(1, len(ref)),
        "greedy_agreement": round(shared / max(1, total), 4),
        "identical_sequences": round(identical / max(1, len(ref)), 4),
        "first_token_agreement": round(first / max(1, len(ref)), 4),
        "logit_steps_compared": steps,
        "logit_max_abs_error": round(max_abs, 5),
        "logit_max_rel_error": round(max_abs / max_ref, 5) if max_ref else None,
        "logit_mean_abs_error": round(abs_sum / max(1, elems), 6),
    }


def kv_accuracy(
    layout: Layout,
    model: ModelSpec,
    engine: EngineConfig,
    prompts: list[list[int]],
    new_tokens: int = 32,
    devices: list[int] | None = None,
) -> dict:
    """FP8 cache against the ``auto`` (model dtype) cache: greedy agreement and logit error (module docstring).
    ``engine`` gives every other knob; both runs use it with only ``kv_cache_dtype`` changed."""
    base = dataclasses.replace(engine, collect_logits=True)
    ref = _generate(layout, model, dataclasses.replace(base, kv_cache_dtype="auto"), prompts, new_tokens, devices)
    fp8 = _generate(layout, model, dataclasses.replace(base, kv_cache_dtype="fp8"), prompts, new_tokens, devices)
    return {
        "kv_cache": "fp8 (e4m3, per layer and KV head scales) vs auto",
        "dtype": engine.dtype,
        "device": engine.device,
        **compare(ref, fp8),
    }


def format_accuracy(res: dict) -> str:
    return "\n".join(
        [
            f"FP8 KV cache vs {res['dtype']} cache on {res['device']}: {res['prompts']} prompts x "
            f"{res['tokens_per_prompt']} greedy tokens",
            f"greedy agreement {res['greedy_agreement']:.2%} (identical sequences {res['identical_sequences']:.0%}, "
            f"first token {res['first_token_agreement']:.0%})",
            f"logits over {res['logit_steps_compared']} same-context steps: max |error| {res['logit_max_abs_error']} "
            f"({res['logit_max_rel_error']} of the largest logit), mean |error| {res['logit_mean_abs_error']}",
        ]
    )
