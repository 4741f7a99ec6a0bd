"""`hexgen profile`: time one decoder layer on this machine's device and write a calibration JSON file.

The planner's cost model (hexgen.planner.costmodel) uses the file in place of its datasheet estimate for that
device. TP > 1 points time one rank's shard shapes without the all-reduce (the cost model adds it from the link).
"""

from __future__ import annotations

import argparse
import json
import sys

from hexgen.config import PRESETS, ModelConfig, preset
from hexgen.errors import HexGenError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hexgen profile", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help=f"model shape preset: {', '.join(sorted(PRESETS))}")
    src.add_argument("--model-path", "--model", dest="model_path", help="Hugging Face model directory (config.json)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--device-name", help="device spec name to record (default: from the CUDA device name; CPU)")
    p.add_argument("--tp-degrees", type=int, nargs="+", default=[1], metavar="TP")
    p.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[1, 8, 32, 128],
        metavar="B",
        help="decode batch sizes (sequences per step)",
    )
    p.add_argument(
        "--context", type=int, nargs="+", default=[128, 1024], metavar="C", help="decode: cached positions per sequence"
    )
    p.add_argument(
        "--prefill",
        type=int,
        nargs="+",
        default=[128, 512, 2048],
        metavar="L",
        help="prefill prompt lengths (one sequence)",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU: torch intra-op threads (default 0: torch's default; match the engine's setting)",
    )
    p.add_argument(
        "--no-graphs",
        action="store_true",
        help="time decode points eagerly (default on CUDA: CUDA-graph replays, as the engine decodes)",
    )
    p.add_argument(
        "--emulate",
        default="",
        metavar="SMS:GIB",
        help="profile a cut-down GPU: this many SMs and GiB (0 keeps that resource; "
        "hexgen/engine/emulation.py); name it with --device-name so the cluster file can refer to it",
    )
    p.add_argument("--out", help="output JSON file (default: print to stdout)")
    p.add_argument("--quiet", action="store_true", help="no per-point progress on stderr")
    return p


def _device_name(device: str, given: str | None) -> str:
    import torch

    from hexgen.planner.devices import device_spec, guess_device_name

    if given:  # a built-in's canonical name, or a device the cluster file defines in [devices.NAME]
        try:
            return device_spec(given).name
        except HexGenError:
            return given
    if device.startswith("cuda"):
        label = torch.cuda.get_device_name(torch.device(device))
        name = guess_device_name(label)
        if name is None:
            raise HexGenError(f"device-name: {label!r} is not a built-in device; pass --device-name NAME")
        return name
    return "CPU"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import torch

        from hexgen.config import normalize_dtype
        from hexgen.planner.calibration import (
            ProfileConfig,
            calibration_to_dict,
            measure,
            save_calibration,
        )

        cfg = preset(args.preset) if args.preset else ModelConfig.from_dir(args.model_path)
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise HexGenError(f"device: {device!r} asked for but CUDA is not available")
        dtype = normalize_dtype(args.dtype or ("bf16" if device.startswith("cuda") else "fp32"))
        prof = ProfileConfig(
            tuple(args.tp_degrees),
            tuple(args.batch),
            tuple(args.context),
            tuple(args.prefill),
            args.warmup,
            args.reps,
            seed=args.seed,
            graphs=not args.no_graphs,
        )
        name = _device_name(device, args.device_name)
        if args.threads < 0:
            raise HexGenError(f"threads: {args.threads} must be >= 0 (0: torch's default)")
        if args.threads:
            torch.set_num_threads(args.threads)
        log = (lambda m: None) if args.quiet else (lambda m: print(f"hexgen profile: {m}", file=sys.stderr))
        from hexgen.config import parse_limits
        from hexgen.engine.emulation import limited_device

        limit = parse_limits(f"0={args.emulate}")[0] if args.emulate else None
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        with limited_device(limit, dev):
            cal = measure(cfg, device, dtype, name, prof, log=log)
    except HexGenError as e:
        print(f"hexgen profile: {e}", file=sys.stderr)
        return 2
    if args.out:
        save_calibration(cal, args.out)
        print(f"hexgen profile: {len(cal.points)} points for {cal.device} written to {args.out}", file=sys.stderr)
    else:
        print(json.dumps(calibration_to_dict(cal), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
