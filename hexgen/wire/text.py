"""The one conversion of a Redis reply value to text."""

from __future__ import annotations

from typing import Any


def as_text(v: Any) -> str:
    """A Redis reply value as str, undecodable bytes replaced (clients may or may not decode responses)."""
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
