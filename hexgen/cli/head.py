"""``bin/head``: parse flags → Settings → :func:`hexgen.serving.head.run_head`."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from hexgen.errors import ConfigError
from hexgen.serving.head import run_head
from hexgen.serving.settings import add_settings_args, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="head", description="HexGen head: validate, tokenize and queue "
                                     "requests from hexgen:requests")
    add_settings_args(parser)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
    except ConfigError as e:
        print(f"head: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(run_head(settings))
    except ConfigError as e:
        print(f"head: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
