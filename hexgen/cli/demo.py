"""``hexgen demo``: private redis-server + head + an asymmetric CPU pipeline, streamed chat answers."""

from __future__ import annotations

import argparse
import sys

from hexgen.cli.flags import add_tp_ratio_flag
from hexgen.demo import DEFAULT_QUESTIONS, DemoOptions, run_demo
from hexgen.errors import HexGenError
from hexgen.shards import normalize_ratios


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hexgen demo", description=__doc__)
    p.add_argument(
        "--hetero-config",
        "--hetero_config",
        dest="hetero_config",
        type=int,
        nargs="+",
        default=[3, 1],
        metavar="TP",
        help="TP degree per stage (default: 3 1)",
    )
    p.add_argument(
        "--pp-partition",
        "--pp_partition",
        dest="pp_partition",
        type=int,
        nargs="+",
        default=[20, 10],
        metavar="LAYERS",
        help="layers per stage (default: 20 10)",
    )
    add_tp_ratio_flag(p)
    p.add_argument("--question", action="append", help="a question to ask (repeatable; default: three)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--model", dest="model_dir", help="Hugging Face model directory (default: embedded SmolLM2)")
    p.add_argument("--keep", action="store_true", help="keep serving after the answers until Ctrl-C")
    p.add_argument(
        "--http-port",
        type=int,
        default=0,
        help="the head's HTTP port: dashboard, /metrics, /v1 (default: a free one; the demo prints the address)",
    )
    p.add_argument("--log-dir", help="keep every process's log in this folder (default: a temporary one)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        opts = DemoOptions(
            hetero_config=tuple(args.hetero_config),
            pp_partition=tuple(args.pp_partition),
            tp_ratio=normalize_ratios(args.tp_ratio, args.hetero_config),
            questions=tuple(args.question or DEFAULT_QUESTIONS),
            max_new_tokens=args.max_new_tokens,
            model_dir=args.model_dir,
            keep=args.keep,
            log_dir=args.log_dir,
            http_port=args.http_port,
        )
        return run_demo(opts, say=lambda msg: print(msg, flush=True))
    except HexGenError as e:
        print(f"hexgen demo: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
