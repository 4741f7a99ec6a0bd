"""The Llama-3.1 presets: the same shapes as the published config.json files, usable by plan, simulate, bench
and generate; and the Hugging Face baseline of ``--model DIR --random-weights`` built from DIR's config only."""
from __future__ import annotations

import json

import pytest
import torch

from hexgen.cli import plan as plan_cli
from hexgen.config import Layout, ModelConfig, preset
from hexgen.model.rope import inv_frequencies

# meta-llama/Llama-3.1-8B and -70B config.json, the fields a Llama config carries (transformers 4.43 layout)
_LLAMA31_COMMON = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "mlp_bias": False,
    "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001, "max_position_embeddings": 131072,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "vocab_size": 128256, "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
HF_CONFIGS = {
    "llama-3.1-8b": {**_LLAMA31_COMMON, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_attention_heads": 32, "num_hidden_layers": 32},
    "llama-3.1-70b": {**_LLAMA31_COMMON, "hidden_size": 8192, "intermediate_size": 28672,
                      "num_attention_heads": 64, "num_hidden_layers": 80},
}


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_preset_equals_the_published_config(name, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIGS[name]))
    assert ModelConfig.from_dir(str(tmp_path)) == preset(name)
    cfg = preset(name)
    assert (cfg.num_kv_heads, cfg.vocab_size, cfg.head_dim) == (8, 128256, 128)


def test_preset_rope_matches_transformers_llama3():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from hexgen.bench.hf_baseline import hf_config

    cfg = preset("llama-3.1-8b")
    hf = hf_config(cfg)
    assert isinstance(hf, LlamaConfig) and hf.num_key_value_heads == 8
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    torch.testing.assert_close(inv_frequencies(cfg), want.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(inv_frequencies(cfg), inv_frequencies(preset("llama-2-7b")))


@pytest.mark.parametrize("name,hetero,part", [("llama-3.1-8b", [2, 1], [20, 12]),
                                              ("llama-3.1-70b", [4, 2, 2], [40, 20, 20])])
def test_preset_layouts_validate_and_plan(name, hetero, part, capsys):
    layout = Layout.build(preset(name), hetero, part)
    assert layout.world_size == sum(hetero)
    with pytest.raises(ValueError, match="valid degrees: 1, 2, 4, 8, 16, 32"):
        Layout.build(preset(name), [3, 1])
    assert plan_cli.main(["--preset", name, "--random-weights", "--hetero-config", *map(str, hetero),
                          "--pp-partition", *map(str, part)]) == 0
    assert f"stage {len(hetero) - 1}: TP {hetero[-1]}" in capsys.readouterr().out


def test_cluster_plan_with_a_llama31_preset(capsys):
    code = plan_cli.main(["--cluster", "config/clusters/h200x2.toml", "--preset", "llama-3.1-8b",
                          "--workload-prompt", "256", "--workload-output", "64", "--time-budget", "2", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    for replica in out["plan"]["replicas"]:
        assert sum(replica["pp_partition"]) == 32
        assert all(s["kv_tokens"] > 0 for s in replica["stages"])


def test_hf_baseline_random_weights_reads_only_the_config(tmp_path):
    """A directory with a config.json and no weights: the baseline builds the model from the config."""
    from hexgen.bench.hf_baseline import load_hf_model
    from tests.models import llama_config

    llama_config(num_key_value_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 64}
                 ).save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    cfg = ModelConfig.from_dir(str(tmp_path))
    model = load_hf_model(str(tmp_path), cfg, torch.float32, torch.device("cpu"), random_weights=True)
    assert model.config.num_key_value_heads == 2 and model.config.num_hidden_layers == cfg.num_layers
    assert model.config.rope_parameters["rope_type"] == "llama3"
    with pytest.raises(OSError):  # without random_weights it looks for the checkpoint, as before
        load_hf_model(str(tmp_path), cfg, torch.float32, torch.device("cpu"))


def test_simulate_a_llama31_70b_layout(capsys):
    from hexgen.cli import simulate as simulate_cli

    assert simulate_cli.main(["--preset", "llama-3.1-70b", "--hetero-config", "4", "2", "2", "--pp-partition",
                              "40", "20", "20", "--gpu", "H200", "--rate", "2", "--num-requests", "20",
                              "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["replicas"][0]["pp_partition"] == [40, 20, 20]
