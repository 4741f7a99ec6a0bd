"""Plain-Python references for the sampler's logit processors (one row, token by token, vLLM's order)."""
from __future__ import annotations

import math

from hexgen.engine.types import SamplingParams


def reference_logits(logits: list[float], p: SamplingParams, prompt: list[int], output: list[int], step: int,
                     eos: tuple[int, ...]) -> list[float]:
    """Repetition penalty (prompt and output), frequency/presence penalties (output), logit bias, min_tokens."""
    x = list(logits)
    seen = set(prompt) | set(output)
    for t in range(len(x)):
        if t in seen:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        n = output.count(t)
        x[t] -= p.frequency_penalty * n + p.presence_penalty * (1 if n else 0)
    for t, b in p.logit_bias:
        x[t] += b
    if step < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
            x[t] = -math.inf
    return x
