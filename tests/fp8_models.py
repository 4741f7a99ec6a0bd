"""Tiny FP8 checkpoints in the compressed-tensors layout (the hub's "-FP8" Llama checkpoints), built from a
random tiny Llama, and the float32 Hugging Face model on their dequantized weights to check against."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from hexgen.kernels.fp8_linear import FP8, FP8_MAX
from tests.models import build_llama

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantization_config(strategy: str = "channel", dynamic: bool = True) -> dict:
    """A compressed-tensors quantization_config: 8-bit float weights scaled per ``strategy``, activations
    dynamic per token (or static per tensor with ``input_scale``), the LM head left out."""
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": dynamic,
            "strategy": "token" if dynamic else "tensor"}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy},
            "input_activations": acts,
        }},
    }


def _quantize(w: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, weight_scale) as the checkpoints store them: [N, 1] per channel, [1] per tensor."""
    amax = w.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w.abs().amax().reshape(1)
    scale = amax.float() / FP8_MAX
    q = (w.float() / (scale if strategy == "channel" else scale[0])).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def save_fp8_llama(path: str, config, seed: int = 0, strategy: str = "channel", dynamic: bool = True):
    """Save a random tiny Llama as an FP8 checkpoint into ``path``; returns the float32 HF model whose
    decoder linears are the dequantized FP8 weights (the reference)."""
    model = build_llama(config, seed)
    model.save_pretrained(path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(".weight") and name.split(".")[-2] in LINEARS:
            q, s = _quantize(t, strategy)
            base = name.removesuffix("weight")
            out[name], out[base + "weight_scale"] = q, s
            if not dynamic:
                out[base + "input_scale"] = torch.ones(1)
            with torch.no_grad():
                model.get_parameter(name).copy_(q.float() * (s if strategy == "channel" else s[0]))
        else:
            out[name] = t.contiguous()
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path, encoding="utf-8") as f:
        d = json.load(f)
    d["quantization_config"] = quantization_config(strategy, dynamic)
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(d, f)
    return model


def dequantized_copy(model):
    """A copy of HF ``model`` whose decoder linears are quantized per output row and dequantized (what
    ``--quantization fp8`` computes with at TP 1 on CPU)."""
    import copy

    from hexgen.kernels.fp8_linear import dequantize, quantize_rows

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(".weight") and name.split(".")[-2] in LINEARS:
                p.copy_(dequantize(*quantize_rows(p), torch.float32))
    return ref
