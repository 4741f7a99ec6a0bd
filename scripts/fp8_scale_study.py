"""How the FP8 KV cache's scale choice changes the K/V it stores, on a real checkpoint (default: SmolLM2).

K (before rotary; its per-pair norms, which set the scale, do not change under rotary) and V of every layer
are taken from a Hugging Face forward over each prompt of ``hexgen.bench.kv_accuracy.PROMPTS``. Each scale
rule quantizes them as the cache would (``hexgen.model.kv_quant``), and the script prints, per rule, the
relative error sqrt(Σ|x̂ - x|²) / sqrt(Σ|x|²) over all layers and prompts, and the share of values clipped
at 448 · scale. Rules: unit scales (1.0, no calibration); write-time scales fixed by the first prompt with
headroom H (``amax · H / 448``) for several H; and per-prompt scales from each prompt's own amax (the best
a per-layer, per-head scale can do for that prompt, headroom 1).

    PYTHONPATH=. python scripts/fp8_scale_study.py [--model DIR]
"""
from __future__ import annotations

import argparse
import math

import torch

from hexgen.bench.kv_accuracy import PROMPTS
from hexgen.model import kv_quant


def capture(model_dir: str) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per prompt, per layer: (k, v) [tokens, n_kv, d] float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    n_kv, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    out = []
    for text in PROMPTS:
        layers: list[list[torch.Tensor]] = [[None, None] for _ in range(cfg.num_hidden_layers)]
        hooks = []
        for i, layer in enumerate(model.model.layers):
            for j, proj in enumerate((layer.self_attn.k_proj, layer.self_attn.v_proj)):
                def hook(_m, _inp, o, i=i, j=j, layers=layers):
                    layers[i][j] = o[0].detach().view(-1, n_kv, d)
                hooks.append(proj.register_forward_hook(hook))
        with torch.no_grad():
            model(torch.tensor([tok.encode(text)]))
        for h in hooks:
            h.remove()
        out.append([tuple(kv) for kv in layers])
    return out


def _scale_of(k: torch.Tensor, v: torch.Tensor, headroom: float) -> tuple[torch.Tensor, torch.Tensor]:
    ks, vs = torch.zeros(k.shape[1]), torch.zeros(v.shape[1])
    saved = kv_quant.HEADROOM
    kv_quant.HEADROOM = headroom
    try:
        kv_quant.update_scales(ks, vs, k, v)
    finally:
        kv_quant.HEADROOM = saved
    return ks, vs


def study(data) -> list[dict]:
    n_layers = len(data[0])
    rules: dict[str, callable] = {"unit scales (1.0)": lambda p, i: (torch.ones(data[p][i][0].shape[1]),) * 2}
    for h in (1.0, 2.0, 8.0, 32.0, 128.0):
        rules[f"first write, headroom {h:g}"] = lambda p, i, h=h: _scale_of(*data[0][i], h)
    rules["each prompt's own amax"] = lambda p, i: _scale_of(*data[p][i], 1.0)
    rows = []
    for name, rule in rules.items():
        err = ref = 0.0
        clipped = total = 0
        for p in range(len(data)):
            for i in range(n_layers):
                ks, vs = rule(p, i)
                for x, s in zip(data[p][i], (ks, vs)):
                    back = kv_quant.round_trip(x, s)
                    err += (back - x).pow(2).sum().item()
                    ref += x.pow(2).sum().item()
                    clipped += int((x.abs() > kv_quant.FP8_MAX * kv_quant._safe(s)[None, :, None]).sum())
                    total += x.numel()
        rows.append({"rule": name, "rel_rms_error": math.sqrt(err / ref), "clipped": clipped / total})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="Hugging Face directory (default: the embedded SmolLM2)")
    args = ap.parse_args()
    if args.model is None:
        from hexgen.model.fetch import ensure_default_model
        args.model = ensure_default_model()
    data = capture(args.model)
    for row in study(data):
        print(f"{row['rule']:<28} relative RMS error {row['rel_rms_error']:.5f}   clipped {row['clipped']:.2e}")


if __name__ == "__main__":
    main()
