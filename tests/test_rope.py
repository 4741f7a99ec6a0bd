"""Tests for hexgen.model.rope: inverse frequencies (default and Llama-3 scaled), cos/sin tables and the
rotation itself, each against transformers' own implementation."""
from __future__ import annotations

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from hexgen.config import ModelConfig
from hexgen.model.rope import RotaryCache, apply_rotary, inv_frequencies
from tests.models import LLAMA3_ROPE, llama_config

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def ours(hf_config) -> ModelConfig:
    return ModelConfig.from_hf_dict(hf_config.to_dict())


@pytest.mark.parametrize(("head_dim", "theta"), [(8, 10000.0), (64, 100000.0), (128, 500000.0)])
def test_default_inv_freq_matches_transformers(head_dim, theta):
    hf = llama_config(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2, rope_theta=theta)
    cfg = ours(hf)
    assert cfg.rope_scaling == ()
    torch.testing.assert_close(inv_frequencies(cfg), LlamaRotaryEmbedding(hf).inv_freq, rtol=0, atol=0)


@pytest.mark.parametrize(("scaling", "head_dim", "theta"), [
    (LLAMA31_ROPE, 128, 500000.0),  # Llama 3.1 8B
    (LLAMA3_ROPE, 8, 10000.0),  # the tiny test models: most frequencies in the scaled/smoothed bands
    ({**LLAMA3_ROPE, "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
      "original_max_position_embeddings": 256}, 64, 10000.0),
])
def test_llama3_inv_freq_matches_transformers(scaling, head_dim, theta):
    hf = llama_config(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2, rope_theta=theta,
                      rope_scaling=scaling)
    cfg = ours(hf)
    assert cfg.rope_scaling_dict["rope_type"] == "llama3"
    want, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    assert attention_factor == 1.0
    got = inv_frequencies(cfg)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    # the scaling must actually change something for these parameters, or the test proves nothing
    plain = inv_frequencies(ModelConfig.from_hf_dict({**hf.to_dict(), "rope_parameters": {"rope_theta": theta}}))
    assert not torch.allclose(got, plain)


def test_old_style_rope_scaling_key_is_read():
    hf = llama_config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, rope_scaling=LLAMA3_ROPE)
    d = hf.to_dict()
    old = {k: v for k, v in d.items() if k != "rope_parameters"}
    old["rope_theta"] = 10000.0
    old["rope_scaling"] = dict(LLAMA3_ROPE)  # transformers 4 spelling
    torch.testing.assert_close(inv_frequencies(ModelConfig.from_hf_dict(old)), inv_frequencies(ours(hf)))


@pytest.mark.parametrize("scaling", [None, LLAMA3_ROPE])
def test_cos_sin_tables_match_transformers(scaling):
    hf = llama_config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_scaling=scaling)
    cache = RotaryCache(ours(hf), 300, torch.device("cpu"))
    positions = torch.tensor([0, 1, 2, 17, 63, 64, 65, 299])
    cos, sin = cache.lookup(positions, torch.float32)  # [tokens, 1, head_dim]
    ref_cos, ref_sin = LlamaRotaryEmbedding(hf)(torch.zeros(1, dtype=torch.float32), positions[None])
    torch.testing.assert_close(cos[:, 0], ref_cos[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin[:, 0], ref_sin[0], rtol=1e-6, atol=1e-6)


def test_cos_sin_lookup_casts_to_dtype():
    cache = RotaryCache(ours(llama_config()), 16, torch.device("cpu"))
    cos, sin = cache.lookup(torch.tensor([3, 4]), torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.bfloat16
    assert cos.shape == sin.shape == (2, 1, 8)


def test_apply_rotary_matches_transformers():
    hf = llama_config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_scaling=LLAMA3_ROPE)
    cache = RotaryCache(ours(hf), 64, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([5, 0, 1, 2, 40])  # ragged: two sequences flattened
    q = torch.randn(5, 4, 16, generator=g)  # [tokens, n_q, d]
    k = torch.randn(5, 2, 16, generator=g)  # [tokens, n_kv, d]
    cos, sin = cache.lookup(positions, torch.float32)
    got_q, got_k = apply_rotary(q, k, cos, sin)
    # transformers layout: [batch=1, heads, tokens, d] with cos [1, tokens, d]
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[:, 0][None],
                                        sin[:, 0][None])
    torch.testing.assert_close(got_q, ref_q[0].transpose(0, 1))
    torch.testing.assert_close(got_k, ref_k[0].transpose(0, 1))
    # position 0 is the identity rotation
    torch.testing.assert_close(got_q[1], q[1])
