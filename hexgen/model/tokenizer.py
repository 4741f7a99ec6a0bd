"""Loading a model's Hugging Face tokenizer: the one place the head, the engine and the benches do it."""

from __future__ import annotations

import os
from typing import Any

from hexgen.errors import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def has_tokenizer(path: str | None) -> bool:
    """Whether ``path`` is a directory holding a tokenizer."""
    return path is not None and any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)


def load_tokenizer(path: str | None, *, field: str = "model.tokenizer", local_only: bool = True) -> Any:
    """The tokenizer at ``path`` (a directory; a hub name too unless ``local_only``); a missing or unreadable
    one is a ConfigError naming ``field``."""
    if not path:
        raise ConfigError(f"{field}: a tokenizer is needed; set model.path or model.tokenizer (a preset has none)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{field}: cannot load a tokenizer from {path!r}: {e}") from e
