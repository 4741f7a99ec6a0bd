"""`hexgen generate`: offline generation on a local asymmetric pipeline (one process per rank)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from hexgen.cli.flags import add_engine_flags, engine_fields, env_log_level
from hexgen.config import KV_CACHE_DTYPES, PRESETS, EngineConfig, Layout, check_devices, preset
from hexgen.engine.offline import run_offline
from hexgen.engine.runner import ModelSpec
from hexgen.engine.types import Request, SamplingParams
from hexgen.errors import HexGenError
from hexgen.quantization import QUANTIZATIONS


def add_layout_args(p: argparse.ArgumentParser) -> None:
    """Model and layout flags shared by generate and bench (original underscore spellings accepted)."""
    p.add_argument("--model", help="Hugging Face model directory (default: the embedded SmolLM2)")
    p.add_argument("--preset", help=f"model shape preset: {', '.join(sorted(PRESETS))} (with --random-weights)")
    p.add_argument("--random-weights", action="store_true", help="random weights instead of a checkpoint")
    p.add_argument(
        "--hetero-config",
        "--hetero_config",
        dest="hetero_config",
        type=int,
        nargs="+",
        metavar="TP",
        help="TP degree of each stage, e.g. 3 1",
    )
    p.add_argument(
        "--pp-partition",
        "--pp_partition",
        dest="pp_partition",
        type=int,
        nargs="+",
        metavar="LAYERS",
        help="layers of each stage, e.g. 20 10 (default: in proportion to TP)",
    )
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_engine_flags(p)
    p.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default="auto",
        help="KV cache storage: auto (the model dtype) or fp8 (e4m3, scales per layer and KV head)",
    )
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default="auto",
        help="weights: auto (the checkpoint's own: bf16, or FP8 for a compressed-tensors FP8 checkpoint) or fp8 "
        "(e4m3 with per-row scales, quantized at load)",
    )


def resolve_model(args: argparse.Namespace) -> ModelSpec:
    if args.preset:
        preset(args.preset)
        return ModelSpec(preset=args.preset, random_weights=args.random_weights)
    if args.model:
        return ModelSpec(model_dir=args.model, random_weights=args.random_weights)
    from hexgen.cli.fetch import ensure_default_model

    return ModelSpec(model_dir=ensure_default_model())


def resolve_engine(args: argparse.Namespace, layout: Layout, **extra) -> EngineConfig:
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_devices(layout, device, torch.cuda.device_count() if device == "cuda" else 0)
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    extra.setdefault("kv_cache_dtype", getattr(args, "kv_cache_dtype", "auto"))
    extra.setdefault("quantization", getattr(args, "quantization", "auto"))
    return EngineConfig(dtype=dtype, device=device, log_level=env_log_level(), **engine_fields(args), **extra)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hexgen generate", description=__doc__)
    add_layout_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0)
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")
    return p


def _encode(model: ModelSpec, prompts: list[str], chat: bool, vocab: int) -> list[list[int]]:
    from hexgen.engine.last_stage import load_model_tokenizer

    tok = load_model_tokenizer(model)
    if tok is None:  # random-weight presets: a deterministic id per prompt byte
        return [[3 + b % (vocab - 3) for b in p.encode()] for p in prompts]
    if chat:
        return [
            list(
                tok.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
            for p in prompts
        ]
    return [tok.encode(p) for p in prompts]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        model = resolve_model(args)
        cfg = model.config()
        layout = Layout.build(cfg, args.hetero_config, args.pp_partition)
        engine = resolve_engine(args, layout)
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=tuple(args.stop),
            ignore_eos=args.ignore_eos,
        )
        ids = _encode(model, args.prompt, args.chat, cfg.vocab_size)
        for i in ids:
            if len(i) + params.max_new_tokens > cfg.max_position_embeddings:
                raise HexGenError(
                    f"max_new_tokens: prompt ({len(i)} tokens) + {params.max_new_tokens} exceeds "
                    f"the model's context of {cfg.max_position_embeddings}"
                )
        requests = [Request(str(n), p, params) for n, p in enumerate(ids)]
    except HexGenError as e:
        print(f"hexgen generate: {e}", file=sys.stderr)
        return 2
    stream = len(requests) == 1 and not args.json
    t0 = time.perf_counter()
    stamps: dict[str, list[float]] = {r.request_id: [] for r in requests}

    def on_output(o) -> None:
        stamps[o.request_id].append(time.perf_counter() - t0)
        if stream and o.text:
            print(o.text, end="", flush=True)

    results = run_offline(layout, model, engine, requests, on_output=on_output)
    wall = time.perf_counter() - t0
    for r in requests:
        c, ts = results[r.request_id], stamps[r.request_id]
        if args.json:
            decode = (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] else None
            print(
                json.dumps(
                    {
                        "text": c.text,
                        "token_ids": c.token_ids,
                        "finish_reason": c.finish_reason,
                        "prompt_tokens": len(r.prompt_ids),
                        "completion_tokens": len(c.token_ids),
                        "layout": layout.describe(),
                        "timings": {
                            "wall_s": round(wall, 4),
                            "first_token_s": round(ts[0], 4) if ts else None,
                            "decode_tokens_per_s": round(decode, 2) if decode else None,
                        },
                    }
                )
            )
        elif stream:
            print()
        else:
            print(f"[{r.request_id}] {c.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
