"""Accuracy of FP8 weights against the model-dtype weights (``hexgen bench weight-accuracy``).

The reference run (``quantization="auto"`` on a bf16/fp32 checkpoint) generates n greedy tokens r_1..r_n from
each prompt of the fixed set (``hexgen.bench.kv_accuracy.prompt_ids``) with its next-token logits L_1..L_n.
The FP8 run (``quantization="fp8"``, the same checkpoint quantized at load) is teacher-forced on those
contexts: one request per prefix prompt + r_1..r_{t-1}, each sampling one token, gives M_t on exactly the
context of L_t. Reported over all prompts and steps:

- top-1 agreement: the share of steps with argmax M_t = argmax L_t (= r_t);
- mean KL(P_ref ‖ P_fp8) of the next-token distributions softmax(L_t), softmax(M_t), in nats (and its max);
- the greedy agreement of a free-running FP8 generation is not measured here (``kv_accuracy.compare`` gives it
  for any two runs).
"""

from __future__ import annotations

import dataclasses

import torch

from hexgen.bench.kv_accuracy import _generate
from hexgen.config import EngineConfig, Layout
from hexgen.engine.runner import ModelSpec


def compare(ref_logits: list[torch.Tensor], fp8_logits: list[torch.Tensor]) -> dict:
    """Top-1 agreement and KL(ref ‖ fp8) over paired next-token logits [vocab] (module docstring)."""
    agree, kls = 0, []
    for lr, lq in zip(ref_logits, fp8_logits, strict=True):
        lr64, lq64 = lr.double(), lq.double()
        agree += int(lr64.argmax().item() == lq64.argmax().item())
        p_log, q_log = torch.log_softmax(lr64, -1), torch.log_softmax(lq64, -1)
        kls.append(float((p_log.exp() * (p_log - q_log)).sum().item()))
    n = max(1, len(kls))
    return {
        "steps": len(kls),
        "top1_agreement": round(agree / n, 4),
        "mean_kl_nats": round(sum(kls) / n, 6),
        "max_kl_nats": round(max(kls, default=0.0), 6),
    }


def weight_accuracy(
    layout: Layout,
    model: ModelSpec,
    engine: EngineConfig,
    prompts: list[list[int]],
    new_tokens: int = 32,
    devices: list[int] | None = None,
) -> dict:
    """FP8 weights (quantized at load) against the checkpoint's own weights (module docstring). ``engine``
    gives every other knob; both runs use it with only ``quantization`` changed."""
    base = dataclasses.replace(engine, collect_logits=True)
    ref = _generate(layout, model, dataclasses.replace(base, quantization="auto"), prompts, new_tokens, devices)
    prefixes = [p + toks[:t] for p, (toks, _) in zip(prompts, ref) for t in range(len(toks))]
    fp8_engine = dataclasses.replace(base, quantization="fp8")
    fp8 = _generate(layout, model, fp8_engine, prefixes, 1, devices)
    return {
        "weights": "fp8 (e4m3, per-row scales, quantized at load) vs the checkpoint's",
        "dtype": engine.dtype,
        "device": engine.device,
        "kv_cache_dtype": engine.kv_cache_dtype,
        "prompts": len(prompts),
        "tokens_per_prompt": new_tokens,
        **compare([lg for _, logits in ref for lg in logits], [logits[0] for _, logits in fp8]),
    }


def format_weight_accuracy(res: dict) -> str:
    return (
        f"FP8 weights vs {res['dtype']} weights on {res['device']}: {res['prompts']} prompts x "
        f"{res['tokens_per_prompt']} teacher-forced steps ({res['steps']} compared)\n"
        f"top-1 agreement {res['top1_agreement']:.2%}, mean KL {res['mean_kl_nats']:.5f} nats "
        f"(max {res['max_kl_nats']:.4f})"
    )
