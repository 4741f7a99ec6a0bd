"""Where HexGen keeps converted models: the cache folder and the embedded default model's place in it."""

from __future__ import annotations

import os

CACHE_ENV_VAR = "HEXGEN_MODEL_CACHE"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = ".hexgen-complete"


def model_cache_dir() -> str:
    """Root folder of HexGen's model cache: $HEXGEN_MODEL_CACHE, else ~/.cache/hexgen/models."""
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return os.path.abspath(os.path.expanduser(override))
    return os.path.join(os.path.expanduser("~"), ".cache", "hexgen", "models")


def default_model_dir(cache_dir: str | None = None) -> str:
    """Folder the converted default model lives in: <cache>/SmolLM2-135M-Instruct."""
    return os.path.join(cache_dir or model_cache_dir(), DEFAULT_MODEL_NAME)


def is_converted(model_dir: str) -> bool:
    """Whether `model_dir` holds a finished conversion (its completion marker is written last)."""
    return os.path.isfile(os.path.join(model_dir, COMPLETE_MARKER))
