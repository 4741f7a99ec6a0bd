"""Fill one stage's parameters straight from a Hugging Face checkpoint, reading only its slices.

The stage module is built on the meta device, given real storage with ``to_empty``, then each parameter is
filled from safetensors slices (``safe_open(...).get_slice(name)[rows]``): a rank never materialises a
tensor it doesn't own, and never reads another stage's layers.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Callable

import torch
from safetensors import safe_open
from tqdm import tqdm

from hexgen.config import KernelConfig, ModelConfig, StageSpec
from hexgen.errors import LoadError
from hexgen.kernels import fp8_linear
from hexgen.kernels.choice import resolve
from hexgen.model.llama import LlamaStage
from hexgen.parallel.groups import TPContext

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointReader:
    """Maps tensor names to safetensors files (single or sharded) and reads slices lazily."""

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir
        index = os.path.join(model_dir, INDEX_FILE)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                self.weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(model_dir, SINGLE_FILE)):
            with safe_open(os.path.join(model_dir, SINGLE_FILE), framework="pt") as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise LoadError(f"model: {model_dir!r} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        self._handles: dict[str, object] = {}
        self.read: list[str] = []  # names of tensors touched, in order (for tests and logging)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise LoadError(f"checkpoint {self.model_dir!r} has no tensor {name!r}")
        fname = self.weight_map[name]
        if fname not in self._handles:
            path = os.path.join(self.model_dir, fname)
            try:
                self._handles[fname] = safe_open(path, framework="pt")
            except OSError as e:
                raise LoadError(f"cannot open checkpoint shard {path!r}: {e}") from e
        self.read.append(name)
        return self._handles[fname]

    def slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        sl = self._handle(name).get_slice(name)
        return sl[start:stop] if dim == 0 else sl[:, start:stop]

    def full(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def _stage_loaders(
    model: LlamaStage, reader: CheckpointReader, cfg: ModelConfig
) -> list[tuple[str, Callable[[], None]]]:
    """(checkpoint tensor name, fill function) for every tensor this stage needs."""
    out: list[tuple[str, Callable[[], None]]] = []
    st = model.stage

    def sl(name: str):
        return lambda dim, a, b: reader.slice(name, dim, a, b)

    def sc(name: str):  # an fp8 checkpoint's weight_scale rows of weight ``name`` (None: it has none)
        s = name.removesuffix("weight") + "weight_scale"
        return (lambda a, b: fp8_linear.scale_rows(reader.full(s), a, b)) if reader.has(s) else None

    if model.embed is not None:
        name = "model.embed_tokens.weight"
        out.append((name, lambda: model.embed.weight.copy_(reader.full(name))))
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{st.layer_start + i}."
        out += [
            (
                p + "input_layernorm.weight",
                lambda m=layer, n=p + "input_layernorm.weight": m.input_norm.weight.copy_(reader.full(n)),
            ),
            (
                p + "post_attention_layernorm.weight",
                lambda m=layer, n=p + "post_attention_layernorm.weight": m.post_norm.weight.copy_(reader.full(n)),
            ),
        ]
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            n = p + f"self_attn.{proj}.weight"
            out.append((n, lambda m=layer, j=j, n=n: m.attn.qkv_proj.load_section(j, sl(n), sc(n))))
        n = p + "self_attn.o_proj.weight"
        out.append((n, lambda m=layer, n=n: m.attn.o_proj.load(sl(n), sc(n))))
        for j, proj in enumerate(("gate_proj", "up_proj")):
            n = p + f"mlp.{proj}.weight"
            out.append((n, lambda m=layer, j=j, n=n: m.mlp.gate_up.load_section(j, sl(n), sc(n))))
        n = p + "mlp.down_proj.weight"
        out.append((n, lambda m=layer, n=n: m.mlp.down.load(sl(n), sc(n))))
    if model.lm_head is not None:
        out.append(("model.norm.weight", lambda: model.norm.weight.copy_(reader.full("model.norm.weight"))))
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        out.append((head, lambda: model.lm_head.load(None, lambda: reader.full(head))))
    return out


def build_stage(
    cfg: ModelConfig,
    stage: StageSpec,
    tp: TPContext,
    dtype: torch.dtype,
    device: torch.device,
    with_head: bool = True,
    kernels: KernelConfig | None = None,
) -> LlamaStage:
    """The stage module with uninitialised storage on ``device`` (built on meta: no full-size init). The dtype
    is set on meta first, so the device never holds an fp32 copy (twice the bf16 size: a 60-layer 70B stage
    would not fit an H200). ``kernels`` (default: every fast path) is resolved for ``device`` here. With
    ``cfg.quantization`` "fp8" the decoder linears hold e4m3 weights and per-row scales (embedding and LM head
    stay in ``dtype``)."""
    kernels = resolve(kernels or KernelConfig(), device)
    with torch.device("meta"):
        model = LlamaStage(cfg, stage, tp, kernels, with_head=with_head)
    model = model.to(dtype)
    if cfg.quantization == "fp8":
        fp8_linear.convert(model)
    return model.to_empty(device=device).eval()


def load_stage(model: LlamaStage, model_dir: str, progress: bool = True) -> list[str]:
    """Fill ``model`` from the checkpoint; returns the checkpoint tensor names read."""
    reader = CheckpointReader(model_dir)
    loaders = _stage_loaders(model, reader, model.cfg)
    missing = [n for n, _ in loaders if not reader.has(n)]
    if missing:
        raise LoadError(
            f"checkpoint {model_dir!r} lacks {len(missing)} tensor(s) this stage needs, e.g. {missing[0]!r}"
        )
    desc = f"stage {model.stage.index} layers {model.stage.layer_start}-{model.stage.layer_end - 1}"
    with torch.no_grad():
        for _, fill in tqdm(loaders, desc=desc, unit="tensor", disable=not progress, leave=False):
            fill()
    reader.close()
    return reader.read


def init_random(model: LlamaStage, seed: int, tp_rank: int) -> None:
    """Deterministic random weights (benchmarks at real sizes without a checkpoint)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            if name.endswith("weight_scale"):  # filled with its fp8 weight
                continue
            g = torch.Generator(device=param.device)
            g.manual_seed(zlib.crc32(f"{seed}/{model.stage.index}/{tp_rank}/{name}".encode()))
            if param.dtype == fp8_linear.FP8:  # drawn in the model dtype, then quantized per row
                dtype = model.layers[0].input_norm.weight.dtype
                fp8_linear.random_fill(param, model.get_parameter(name + "_scale"), dtype, g)
                continue
            param.normal_(0.0, 0.02, generator=g)
