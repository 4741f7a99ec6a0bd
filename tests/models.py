"""Tiny random Llama checkpoints in Hugging Face format, and the Hugging Face reference to check against.

Every weight (norms included) is drawn from a seeded generator, large enough (std 0.3) that greedy
outputs vary and top-2 logit gaps stay far above float32 noise, so a loader that swaps two layers, two
shards or a norm for another is caught by the logits comparison.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from hexgen.config import ModelConfig
from hexgen.engine.offline import Completion
from hexgen.engine.types import Request, SamplingParams

# Per-step logits of our engine and HF's full forward differ by float32 rounding only.
LOGITS_ATOL = 2e-4
LOGITS_RTOL = 1e-4

# Llama-3 rope scaling with a small original context, so that most frequencies get scaled.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def llama_config(**overrides: Any):
    """A tiny LlamaConfig (GQA 8 q / 2 kv heads, 4 layers, vocab 320, intermediate 100) with overrides.

    ``rope_scaling`` (a dict) is turned into transformers 5 ``rope_parameters``.
    """
    from transformers import LlamaConfig

    kw: dict[str, Any] = dict(vocab_size=320, hidden_size=64, intermediate_size=100, num_hidden_layers=4,
                              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                              rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    rope_theta = overrides.pop("rope_theta", 10000.0)
    scaling = overrides.pop("rope_scaling", None)
    kw.update(overrides)
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta} if scaling is None else \
        {**scaling, "rope_theta": rope_theta}
    return LlamaConfig(**kw)


def build_llama(config, seed: int = 0, std: float = 0.3):
    """A float32 LlamaForCausalLM with every parameter drawn from N(0, std) (norm weights around 1)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def printable_only(model, tokenizer) -> None:
    """Zero the LM-head rows of special tokens and of tokens that don't decode to printable ASCII, so that
    greedy and sampled texts of a random model are plain text (no U+FFFD from stray UTF-8 bytes)."""
    special = set(tokenizer.all_special_ids)
    with torch.no_grad():
        for i in range(model.config.vocab_size):
            s = tokenizer.decode([i]) if i < len(tokenizer) else ""
            if i in special or not s or not s.isascii() or not s.isprintable():
                model.lm_head.weight[i] = 0


def save_llama(path: str, config, seed: int = 0, max_shard_size: str | int | None = None,
               tokenizer=None, eos_token_id: int | None = None) -> str:
    """Build a random tiny Llama and save it (safetensors) into ``path``; returns ``path``.

    ``max_shard_size`` splits the checkpoint into several files with an index. ``tokenizer`` (a HF
    tokenizer) is saved beside it, and the model made to emit printable tokens only (``printable_only``).
    ``eos_token_id`` rewrites config.json's EOS after saving.
    """
    model = build_llama(config, seed)
    if tokenizer is not None:
        printable_only(model, tokenizer)
    os.makedirs(path, exist_ok=True)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kw)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    if eos_token_id is not None:
        set_eos(path, eos_token_id)
    return path


def set_eos(path: str, eos_token_id: int) -> None:
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path, encoding="utf-8") as f:
        d = json.load(f)
    d["eos_token_id"] = eos_token_id
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(d, f)


def load_hf(path: str):
    """The Hugging Face reference model of ``path`` in float32 with eager attention."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def make_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Random prompts of the given lengths over ids [3, vocab) (clear of BOS/EOS/pad)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Hugging Face ``generate`` greedy continuation of one prompt, never stopping at EOS."""
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # generate() would merge it into ``gen``
    try:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    finally:
        model.generation_config.eos_token_id = saved
    tokens = out[0, len(prompt):].tolist()
    assert len(tokens) == max_new_tokens, "generate stopped early"
    return tokens


@torch.no_grad()
def hf_logits(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """Reference logits [len(generated), vocab] that predicted each generated token (one full forward)."""
    ids = torch.tensor([prompt + generated])
    logits = model(ids).logits[0].float()  # [len, vocab]
    return logits[len(prompt) - 1:len(prompt) - 1 + len(generated)]


def greedy_requests(prompts: list[list[int]], max_new_tokens: int, prefix: str = "r") -> list[Request]:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    return [Request(f"{prefix}{i}", p, params) for i, p in enumerate(prompts)]


def check_against_hf(results: dict[str, Completion], requests: list[Request], model,
                     reference: dict[str, list[int]] | None = None, check_logits: bool = True,
                     logits_atol: float = LOGITS_ATOL) -> None:
    """Assert each completion's greedy tokens equal HF ``generate`` and its per-step logits equal HF's.

    ``reference`` (request id -> HF greedy tokens) is computed when not given.
    """
    for req in requests:
        c = results[req.request_id]
        n = req.params.max_new_tokens
        want = reference[req.request_id] if reference else hf_greedy(model, req.prompt_ids, n)
        assert c.finish_reason == "length", (req.request_id, c.finish_reason)
        assert c.token_ids == want, f"{req.request_id}: tokens differ from HF generate\n ours {c.token_ids}" \
                                    f"\n   hf {want}"
        if check_logits:
            assert len(c.logits) == n, f"{req.request_id}: {len(c.logits)} logit rows for {n} tokens"
            got = torch.stack(c.logits)  # [n, vocab]
            torch.testing.assert_close(got, hf_logits(model, req.prompt_ids, c.token_ids),
                                       atol=logits_atol, rtol=LOGITS_RTOL,
                                       msg=lambda m: f"{req.request_id}: logits differ from HF\n{m}")


# --- the layout matrix's models (shared by the CPU and GPU layout tests) --------------------------------

N_NEW = 32
LENGTHS = [5, 12, 45, 27]  # one prompt longer than a 32-token step budget


@dataclass
class Case:
    """A saved checkpoint, its Hugging Face reference, the requests and HF's greedy tokens for them."""

    model_dir: str
    hf: Any
    requests: list[Request]
    reference: dict[str, list[int]]

    @property
    def cfg(self) -> ModelConfig:
        return ModelConfig.from_dir(self.model_dir)


def make_case(path: str, config, seed: int, **save_kw: Any) -> Case:
    model_dir = save_llama(path, config, seed=seed, **save_kw)
    hf = load_hf(model_dir)
    requests = greedy_requests(make_prompts(config.vocab_size, LENGTHS, seed=seed), N_NEW)
    reference = {r.request_id: hf_greedy(hf, r.prompt_ids, N_NEW) for r in requests}
    return Case(model_dir, hf, requests, reference)


def mha_case(path: str) -> Case:
    """Multi-head attention (4 q = 4 kv heads), intermediate 90."""
    return make_case(path, llama_config(num_attention_heads=4, num_key_value_heads=4, intermediate_size=90), 11)


def gqa_case(path: str) -> Case:
    """Grouped-query attention (8 q / 2 kv heads), 5 layers, intermediate 100."""
    return make_case(path, llama_config(num_hidden_layers=5), 12)


def mqa_case(path: str) -> Case:
    """One KV head for 6 query heads: TP 3 replicates it; intermediate 100 splits 34/33/33."""
    return make_case(path, llama_config(hidden_size=48, num_attention_heads=6, num_key_value_heads=1), 13)


def llama3_tied_sharded_case(path: str) -> Case:
    """Llama-3 rope scaling (rope_parameters), tied embeddings, a checkpoint split over several files."""
    return make_case(path, llama_config(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, tie_word_embeddings=True),
                     14, max_shard_size="100KB")


SMOL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old clockmaker "
    "who had never once left the valley where he was born. Every morning he",
]


def smol_case(model_dir: str) -> Case:
    """The embedded SmolLM2 with three prompts of different lengths (the last longer than a 32-token budget)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = load_hf(model_dir)
    requests = greedy_requests([tok.encode(p) for p in SMOL_PROMPTS], N_NEW, prefix="smol")
    reference = {r.request_id: hf_greedy(hf, r.prompt_ids, N_NEW) for r in requests}
    return Case(model_dir, hf, requests, reference)
