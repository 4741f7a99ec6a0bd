"""Tests for hexgen.config: parsing Hugging Face configs, presets, layouts and their validation.

Every rejected configuration raises ConfigError whose message names the bad value and what is allowed.
"""
from __future__ import annotations

import json

import pytest

from hexgen.config import (PRESETS, EngineConfig, Layout, ModelConfig, check_devices, default_partition,
                           normalize_dtype, preset, valid_tp_degrees)
from hexgen.errors import ConfigError

SMOL = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                   num_kv_heads=3, max_position_embeddings=8192)
GQA = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=100, num_layers=5, num_heads=8,
                  num_kv_heads=2)


def hf_dict(**overrides) -> dict:
    d = {"model_type": "llama", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 100,
         "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
         "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2,
         "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    d.update(overrides)
    return d


# --- ModelConfig ---------------------------------------------------------------------------------------

def test_from_hf_dict_reads_transformers5_config():
    cfg = ModelConfig.from_hf_dict(hf_dict(tie_word_embeddings=True, eos_token_id=[2, 7]))
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 8, 2, 8)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == ()
    assert cfg.rms_norm_eps == 1e-6 and cfg.tie_word_embeddings
    assert cfg.eos_token_ids == (2, 7)


def test_from_hf_dict_llama3_rope_parameters_become_scaling():
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = ModelConfig.from_hf_dict(hf_dict(rope_parameters=rope))
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling_dict == {k: v for k, v in rope.items() if k != "rope_theta"}


def test_from_hf_dict_defaults_kv_heads_and_explicit_head_dim():
    d = hf_dict(head_dim=32)
    del d["num_key_value_heads"]
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.num_kv_heads == 8 and cfg.head_dim == 32
    assert ModelConfig.from_hf_dict(hf_dict(eos_token_id=None)).eos_token_ids == ()


def test_from_dir_reads_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_dict()))
    assert ModelConfig.from_dir(str(tmp_path)).num_layers == 4


def test_from_dir_without_config_names_the_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"model: .*has no config.json"):
        ModelConfig.from_dir(str(tmp_path))


@pytest.mark.parametrize(("overrides", "match"), [
    ({"model_type": "gpt2"}, r"model_type 'gpt2' is not supported; expected 'llama'"),
    ({"attention_bias": True}, r"attention_bias: true is not supported"),
    ({"mlp_bias": True}, r"mlp_bias: true is not supported"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported; expected 'silu'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     r"rope_scaling type 'yarn' is not supported; supported: default, llama3"),
    ({"num_key_value_heads": 3}, r"num_key_value_heads 3 must divide num_attention_heads 8"),
    ({"hidden_size": 60}, r"hidden_size 60 is not divisible by num_attention_heads 8; set head_dim"),
    ({"num_hidden_layers": 0}, r"num_layers: 0 must be a positive integer"),
    ({"vocab_size": -5}, r"vocab_size: -5 must be a positive integer"),
])
def test_bad_model_configs_are_rejected(overrides, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_dict(hf_dict(**overrides))


# --- presets and dtypes -----------------------------------------------------------------------------------

def test_preset_is_exact_name():
    assert preset("tiny") is PRESETS["tiny"]
    assert preset("llama-2-70b").num_kv_heads == 8


@pytest.mark.parametrize("name", ["llama-2-7B", "Tiny", "llama2-7b", "llama-2", ""])
def test_unknown_preset_lists_the_known_ones(name):
    with pytest.raises(ConfigError) as info:
        preset(name)
    msg = str(info.value)
    assert f"preset: {name!r} is unknown" in msg
    assert all(k in msg for k in PRESETS)


@pytest.mark.parametrize(("name", "want"), [("fp32", "float32"), ("FP16", "float16"), ("bf16", "bfloat16"),
                                            ("bfloat16", "bfloat16"), ("half", "float16"),
                                            ("float", "float32")])
def test_dtype_spellings(name, want):
    assert normalize_dtype(name) == want
    assert EngineConfig(dtype=name).dtype == want


@pytest.mark.parametrize("name", ["fp8", "int8", "float64", "", "bfloat"])
def test_bad_dtype_names_value_and_choices(name):
    with pytest.raises(ConfigError, match=rf"dtype: {name!r} is not supported; use one of fp32, fp16, bf16"):
        EngineConfig(dtype=name)


# --- TP degrees and layouts ------------------------------------------------------------------------------

def test_valid_tp_degrees():
    assert valid_tp_degrees(SMOL) == [1, 3, 9]
    assert valid_tp_degrees(GQA) == [1, 2, 4, 8]  # 4 and 8 replicate the 2 KV heads
    mqa = ModelConfig(vocab_size=8, hidden_size=48, intermediate_size=8, num_layers=2, num_heads=6,
                      num_kv_heads=1)
    assert valid_tp_degrees(mqa) == [1, 2, 3, 6]
    odd = ModelConfig(vocab_size=8, hidden_size=48, intermediate_size=8, num_layers=2, num_heads=6,
                      num_kv_heads=2)
    assert valid_tp_degrees(odd) == [1, 2, 6]  # 3 neither divides nor is a multiple of 2 KV heads


def test_layout_build_with_explicit_partition():
    layout = Layout.build(SMOL, [3, 1], [20, 10])
    assert layout.world_size == 4 and layout.num_stages == 2
    s0, s1 = layout.stages()
    assert (s0.ranks, s0.layer_start, s0.layer_end, s0.is_first, s0.is_last) == ([0, 1, 2], 0, 20, True, False)
    assert (s1.ranks, s1.layer_start, s1.layer_end, s1.leader, s1.is_last) == ([3], 20, 30, 3, True)
    assert [layout.stage_of_rank(r).index for r in range(4)] == [0, 0, 0, 1]
    assert layout.describe() == "hetero-config 3 1 / pp-partition 20 10"


def test_layout_build_default_partition_follows_tp():
    layout = Layout.build(SMOL, [3, 1])
    assert sum(layout.pp_partition) == 30 and layout.pp_partition[0] > layout.pp_partition[1]
    assert Layout.build(SMOL, None).hetero_config == (1,)


@pytest.mark.parametrize(("layers", "hetero"), [
    (30, (3, 1)), (30, (1, 1, 1)), (5, (1, 2, 1)), (4, (1, 1, 1, 1)), (7, (9, 1, 1)), (80, (8, 4, 2, 1)),
    (3, (1, 8, 1)),
])
def test_default_partition_covers_every_layer(layers, hetero):
    parts = default_partition(layers, hetero)
    assert len(parts) == len(hetero) and sum(parts) == layers and min(parts) >= 1


def test_stage_of_rank_outside_world():
    with pytest.raises(ConfigError, match=r"rank 4 is outside world size 4"):
        Layout.build(SMOL, [3, 1], [20, 10]).stage_of_rank(4)


@pytest.mark.parametrize(("hetero", "part", "match"), [
    ([3, 1], [20, 11], r"pp-partition: 20 11 sums to 31 but the model has 30 layers"),
    ([3, 1], [10, 10], r"pp-partition: 10 10 sums to 20 but the model has 30 layers"),
    ([3, 1], [30, 0], r"pp-partition: layer count 0 must be an integer ≥ 1 \(every stage needs at least one layer\)"),
    ([1, 1], [31, -1], r"pp-partition: layer count -1 must be an integer ≥ 1"),
    ([3, 1], [10, 10, 10], r"pp-partition: 3 stages given but hetero-config has 2; give one layer count per stage"),
    ([1, 3, 1], [15, 15], r"pp-partition: 2 stages given but hetero-config has 3"),
    ([2, 1], [20, 10], r"hetero-config: TP degree 2 is not valid for this model \(9 query heads, 3 KV heads\); "
                       r"valid degrees: 1, 3, 9"),
    ([3, 4], [20, 10], r"hetero-config: TP degree 4 is not valid .* valid degrees: 1, 3, 9"),
    ([0, 1], [20, 10], r"hetero-config: TP degree 0 must be ≥ 1"),
    ([3, -1], None, r"hetero-config: TP degree -1 must be ≥ 1"),
])
def test_bad_layouts_name_value_and_what_is_allowed(hetero, part, match):
    with pytest.raises(ConfigError, match=match):
        Layout.build(SMOL, hetero, part)


def test_more_stages_than_layers():
    with pytest.raises(ConfigError, match=r"hetero-config: 6 stages but the model has only 5 layers"):
        Layout.build(GQA, [1] * 6)


def test_empty_hetero_config_direct():
    with pytest.raises(ConfigError, match=r"hetero-config: give at least one TP degree"):
        Layout((), ())


def test_tp_that_does_not_divide_intermediate_is_allowed():
    """Uneven MLP shards are supported: SmolLM2's 1536 is not divisible by 9."""
    assert Layout.build(SMOL, [9], [30]).hetero_config == (9,)


# --- devices and engine knobs --------------------------------------------------------------------------------

def test_check_devices():
    layout = Layout.build(SMOL, [3, 1], [20, 10])
    check_devices(layout, "cuda", 4)
    check_devices(layout, "cpu", 0)  # CPU ranks need no devices
    with pytest.raises(ConfigError, match=r"hetero-config: world size 4 \(sum of TP degrees\) needs 4 GPUs "
                                          r"but 2 are available"):
        check_devices(layout, "cuda", 2)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"device": "tpu"}, r"device: 'tpu' must be 'cpu' or 'cuda'"),
    ({"block_size": 0}, r"block_size: 0 must be in \[1, 1024\]"),
    ({"max_num_seqs": 0}, r"max_num_seqs: 0 must be ≥ 1"),
    ({"max_num_batched_tokens": 0}, r"max_num_batched_tokens: 0 must be ≥ 1"),
    ({"gpu_memory_fraction": 1.5}, r"gpu_memory_fraction: 1.5 must be in \[0.05, 1.0\]"),
    ({"kernels": "fast"}, r"kernels: 'fast' must be a KernelConfig"),
    ({"log_level": "LOUD"}, r"log_level: 'LOUD' must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ({"num_kv_blocks": -1}, r"num_kv_blocks: -1 must be ≥ 0"),
    ({"max_model_len": -8}, r"max_model_len: -8 must be ≥ 0"),
    ({"micro_batches": -1}, r"micro_batches: -1 must be ≥ 0"),
    ({"cpu_kv_tokens": 0}, r"cpu_kv_tokens: 0 must be ≥ 1"),
])
def test_bad_engine_configs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig(**kwargs)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        EngineConfig(dtype="fp8")
