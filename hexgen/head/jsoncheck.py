"""Checks on a decoded JSON value that ``json.loads`` does not make: nesting depth and lone surrogates.

JSON may escape a UTF-16 surrogate on its own (``"\\ud800"``); Python decodes it into a ``str`` that cannot be
encoded as UTF-8, so it would fail later, far from the field that carried it. Deep nesting would make every
recursive consumer (encoders, the chat template) fail the same way. :func:`check_json` walks the value
without recursion and raises :class:`~hexgen.wire.protocol.InvalidRequest` naming the field.
"""

from __future__ import annotations

import json
from typing import Any

from hexgen.wire.protocol import InvalidRequest

MAX_JSON_DEPTH = 32  # containers inside containers; an OpenAI chat body needs 4


def _path(base: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{base}[{key}]"
    return f"{base}.{key}" if base else str(key)


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:64]


def check_json(value: Any, name: str = "", max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise InvalidRequest when ``value`` nests deeper than ``max_depth`` or holds a lone surrogate; the
    message names the field (``name`` is the path of ``value`` itself, "" for a whole request body)."""
    stack: list[tuple[Any, str, int]] = [(value, name, 0)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, str):
            _check_text(v, path or "request body")
        elif isinstance(v, (dict, list)):
            if depth >= max_depth:
                raise InvalidRequest(f"{path or 'request body'}: JSON nested deeper than {max_depth} levels")
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, item in items:
                if isinstance(k, str):
                    _check_text(k, _path(path, "<key>"))
                stack.append((item, _path(path, k if not isinstance(k, str) else _printable(k)), depth + 1))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start : e.start + 1].encode("unicode_escape").decode("ascii")
        raise InvalidRequest(
            f"{path}: holds a lone UTF-16 surrogate ({bad} at character {e.start}); text must be valid Unicode"
        ) from None


def loads(raw: str | bytes, name: str = "", max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses NaN/Infinity, deep nesting and lone surrogates (InvalidRequest naming the
    field; ``name`` prefixes the message of a value that is not JSON)."""
    label = name or "request body"
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:  # the decoder recurses once per level of nesting
        raise InvalidRequest(f"{label}: JSON nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"{label}: not valid JSON ({e})") from None
    check_json(value, name, max_depth)
    return value


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not allowed")
