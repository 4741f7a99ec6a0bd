"""Parse and validate one raw ``hexgen:requests`` entry (flat fields from XADD, ``bytes`` or ``str``).

Every problem raises :class:`~hexgen.wire.protocol.InvalidRequest` whose message names the wire field and
what is allowed. Sizes are checked before anything is decoded or parsed: the whole entry against
``max_request_bytes``, then each field against its own cap.

Policies:

- **Unknown fields are rejected** (``invalid_request`` naming the field and listing the allowed ones): a typo
  such as ``max_tokens`` would otherwise silently run with the default length.
- Accepted fields: ``prompt`` | ``messages`` | ``prompt_ids`` (exactly one; ``prompt_ids`` a JSON list of
  token ids), ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``seed``, ``stop``,
  ``stop_token_ids`` (JSON list of ids), ``presence_penalty``, ``frequency_penalty``, ``repetition_penalty``,
  ``logit_bias`` (JSON object ``{"<token id>": bias}``), ``min_tokens``, ``logprobs`` and ``prompt_logprobs``
  (how many top alternatives, 0–20; present = logprobs wanted), ``model``, ``id``, ``ignore_eos``
  (0/1/true/false) and ``deadline_s`` (seconds after queueing when an unfinished request ends with
  ``error timeout`` / ``no_ready_pipeline``; default ``limits.request_deadline_s``).
- ``stop`` is a JSON list of strings when its value starts with ``[``, else one literal stop string (so a
  stop string that itself starts with ``[`` must be sent as a JSON list).
- ``id`` defaults to the entry id XADD returned; an explicit id uses the characters in ``ID_ALLOWED_CHARS``.
- Numbers are plain decimal literals; NaN and infinities are rejected.
- JSON values (``messages``, a ``stop`` list) nested deeper than ``jsoncheck.MAX_JSON_DEPTH`` or holding a lone
  UTF-16 surrogate (``"\\ud800"``) are rejected, naming the field (:mod:`hexgen.head.jsoncheck`).
- A field given twice (redis-cli allows it): the last value counts, as for every reader that sees the entry
  as a map (redis-py included).
- ``messages`` items are objects with the keys ``role`` (system, user, assistant, tool) and ``content`` (a
  string); an assistant message may carry ``tool_calls`` instead of content, a tool message its
  ``tool_call_id`` (required) and ``name``.
- Structured outputs and tools (``response_format``, ``guided_json``, ``guided_regex``, ``guided_choice``,
  ``guided_grammar``, ``tools``, ``tool_choice``): :mod:`hexgen.head.structured`.

The prompt-length check needs the tokenizer, so it lives in :func:`check_context`, called after tokenizing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hexgen.engine.types import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_PENALTY,
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    SamplingParams,
)
from hexgen.errors import ConfigError
from hexgen.head import jsoncheck
from hexgen.head.structured import FIELDS as STRUCTURED_FIELDS
from hexgen.head.structured import Structured, parse_structured
from hexgen.wire import keys as C
from hexgen.wire.itemcheck import MAX_TOP_K
from hexgen.wire.protocol import Fields, InvalidRequest
from hexgen.wire.settings_tables import RequestLimits

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")
FIELDS = (
    "prompt",
    "messages",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stop",
    "model",
    "id",
    "ignore_eos",
    "deadline_s",
    "prompt_ids",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
    "min_tokens",
    "logit_bias",
    "stop_token_ids",
    "logprobs",
    "prompt_logprobs",
    *STRUCTURED_FIELDS,
)
MAX_TOKEN_ID = 2**31 - 1
MAX_TEMPERATURE = 100.0

_ID_RE = re.compile(C.ID_PATTERN)
_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request before tokenizing: exactly one of ``prompt`` / ``messages`` / ``prompt_ids`` is set."""

    request_id: str
    prompt: str | None
    messages: tuple[dict[str, Any], ...] | None
    params: SamplingParams
    model: str | None
    deadline_s: float | None = None  # None: the deployment's limits.request_deadline_s
    prompt_ids: tuple[int, ...] | None = None
    structured: Structured | None = None  # output constraint and tools (hexgen.head.structured)


def _field_cap(name: str, limits: RequestLimits) -> int:
    if name in ("prompt", "messages", "prompt_ids", "logit_bias", *STRUCTURED_FIELDS):
        return limits.max_field_bytes
    if name == "stop":
        return C.MAX_STOP_BYTES
    return C.MAX_SMALL_FIELD_BYTES


def _decode(name: str, value: Any) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequest(f"{name}: value is not valid UTF-8 (byte {e.start})") from e
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise InvalidRequest(f"{name}: value must be a string")


def _size(value: Any) -> int:
    if isinstance(value, bytes):
        return len(value)
    return len(str(value).encode("utf-8", "surrogatepass"))


def check_sizes(fields: Fields, limits: RequestLimits) -> None:
    """Byte caps on the whole entry and on every field; runs before any decoding or parsing."""
    total = 0
    for k, v in fields.items():
        total += _size(k) + _size(v)
    if total > limits.max_request_bytes:
        raise InvalidRequest(
            f"request: {total} bytes exceeds the limit of {limits.max_request_bytes} bytes for all fields together"
        )
    for k, v in fields.items():
        if _size(k) > 64:
            raise InvalidRequest(f"field name of {_size(k)} bytes: unknown field; allowed fields: {', '.join(FIELDS)}")
        name = _decode("field name", k)
        cap = _field_cap(name, limits)
        if _size(v) > cap:
            raise InvalidRequest(f"{name}: {_size(v)} bytes exceeds the limit of {cap} bytes")


def _int(name: str, raw: str, lo: int, hi: int) -> int:
    text = raw.strip()
    if not _INT_RE.fullmatch(text):
        raise InvalidRequest(f"{name}: {raw[:40]!r} must be an integer in [{lo}, {hi}]")
    value = int(text)
    if not lo <= value <= hi:
        raise InvalidRequest(f"{name}: {value} is out of range; allowed: [{lo}, {hi}]")
    return value


def _float(name: str, raw: str, allowed: str) -> float:
    text = raw.strip()
    if not _FLOAT_RE.fullmatch(text):
        raise InvalidRequest(f"{name}: {raw[:40]!r} must be a finite number in {allowed} (no NaN/inf)")
    value = float(text)
    if not math.isfinite(value):
        raise InvalidRequest(f"{name}: {raw[:40]!r} is not finite; allowed: {allowed}")
    return value


def _json(name: str, raw: str) -> Any:
    return jsoncheck.loads(raw, name)


def parse_request_id(fields: Mapping[str, str], entry_id: str) -> str:
    """The request id: the ``id`` field (checked against ID_ALLOWED_CHARS) or the entry id."""
    raw = fields.get("id")
    if raw is None:
        return entry_id
    if not _ID_RE.fullmatch(raw):
        raise InvalidRequest(f"id: {raw[:40]!r} is not allowed; use {C.ID_ALLOWED_CHARS}")
    return raw


def peek_request_id(fields: Fields, entry_id: str) -> str:
    """Where a request's events go, even when the rest of it is invalid: its ``id`` field when that is a
    valid id, else the entry id. Never raises."""
    raw = fields.get("id", fields.get(b"id"))
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return entry_id
    if isinstance(raw, str) and _ID_RE.fullmatch(raw):
        return raw
    return entry_id


def _tool_calls(i: int, calls: Any) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``: ``[{"id", "type": "function", "function": {"name", "arguments"}}]``."""
    if not isinstance(calls, list) or not calls:
        raise InvalidRequest(f"messages[{i}].tool_calls: must be a non-empty list of tool calls")
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequest(f"messages[{i}].tool_calls[{j}]: must be a tool call with function.name")
        if not isinstance(fn.get("arguments", ""), (str, dict)):
            raise InvalidRequest(f"messages[{i}].tool_calls[{j}].function.arguments: must be a JSON string")
    return calls


def _tool_keys(i: int, m: dict[str, Any], msg: dict[str, Any]) -> None:
    """Copy a message's ``tool_calls`` (assistant), ``tool_call_id`` (tool, required) and ``name`` into ``msg``."""
    role = msg["role"]
    if m.get("tool_calls") is not None:
        if role != "assistant":
            raise InvalidRequest(f"messages[{i}].tool_calls: only assistant messages carry tool calls")
        msg["tool_calls"] = _tool_calls(i, m["tool_calls"])
    for key in ("tool_call_id", "name"):
        if m.get(key) is not None:
            if not isinstance(m[key], str):
                raise InvalidRequest(f"messages[{i}].{key}: must be a string")
            msg[key] = m[key]
    if role == "tool" and not msg.get("tool_call_id"):
        raise InvalidRequest(f"messages[{i}].tool_call_id: a tool message must name the call it answers")
    if role != "tool" and "tool_call_id" in msg:
        raise InvalidRequest(f"messages[{i}].tool_call_id: only tool messages carry it")


def _message(i: int, m: Any) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise InvalidRequest(f'messages[{i}]: must be an object {{"role": ..., "content": ...}}')
    extra = sorted(set(m) - set(MESSAGE_KEYS))
    if extra:
        raise InvalidRequest(f"messages[{i}].{extra[0]}: unknown key; allowed keys: {', '.join(MESSAGE_KEYS)}")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        raise InvalidRequest(f"messages[{i}].role: {role!r} must be one of {', '.join(ROLES)}")
    msg: dict[str, Any] = {"role": role, "content": content}
    _tool_keys(i, m, msg)
    if not isinstance(content, str) and not (content is None and "tool_calls" in msg):
        raise InvalidRequest(f"messages[{i}].content: must be a string")
    return msg


def parse_messages(raw: str, limits: RequestLimits) -> tuple[dict[str, Any], ...]:
    """Parse ``messages``: a non-empty JSON list of ``{"role": ..., "content": ...}`` objects."""
    value = _json("messages", raw)
    if not isinstance(value, list) or not value:
        raise InvalidRequest('messages: must be a non-empty JSON list of {"role", "content"} objects')
    if len(value) > limits.max_messages:
        raise InvalidRequest(f"messages: {len(value)} messages exceeds the limit of {limits.max_messages}")
    return tuple(_message(i, m) for i, m in enumerate(value))


def parse_stop(raw: str, limits: RequestLimits) -> tuple[str, ...]:
    """Parse ``stop``: a JSON list of non-empty strings when it starts with ``[``, else one literal string."""
    if not raw.lstrip().startswith("["):
        if not raw:
            raise InvalidRequest("stop: must be a non-empty string or a JSON list of non-empty strings")
        return (raw,)
    value = _json("stop", raw)
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise InvalidRequest("stop: a value starting with '[' must be a JSON list of non-empty strings")
    if len(value) > limits.max_stop_strings:
        raise InvalidRequest(f"stop: {len(value)} strings exceeds the limit of {limits.max_stop_strings}")
    return tuple(value)


def _bool(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes"):
        return True
    if low in ("0", "false", "no"):
        return False
    raise InvalidRequest(f"{name}: {raw[:40]!r} must be one of 0, 1, true, false")


def _temperature(raw: str) -> float:
    t = _float("temperature", raw, f"[0, {MAX_TEMPERATURE:g}] (0 = greedy)")
    if not 0 <= t <= MAX_TEMPERATURE:
        raise InvalidRequest(f"temperature: {t:g} is out of range; allowed: [0, {MAX_TEMPERATURE:g}] (0 = greedy)")
    return t


def _top_p(raw: str) -> float:
    p = _float("top_p", raw, "0 < top_p ≤ 1")
    if not 0 < p <= 1:
        raise InvalidRequest(f"top_p: {p:g} is out of range; allowed: 0 < top_p ≤ 1")
    return p


def parse_token_ids(name: str, raw: str, limit: int) -> tuple[int, ...]:
    """A JSON list of token ids (integers in [0, 2^31 - 1]), at most ``limit`` of them."""
    value = _json(name, raw)
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InvalidRequest(f"{name}: must be a JSON list of token ids (integers ≥ 0)")
    if len(value) > limit:
        raise InvalidRequest(f"{name}: {len(value)} ids exceeds the limit of {limit}")
    for t in value:
        if not 0 <= t <= MAX_TOKEN_ID:
            raise InvalidRequest(f"{name}: token id {t} is out of range; allowed: [0, {MAX_TOKEN_ID}]")
    return tuple(value)


def parse_logit_bias(raw: str) -> tuple[tuple[int, float], ...]:
    """``logit_bias``: a JSON object mapping token ids (as strings) to biases in [-100, 100]."""
    value = _json("logit_bias", raw)
    if not isinstance(value, dict):
        raise InvalidRequest('logit_bias: must be a JSON object such as {"1234": -100}')
    out = []
    for k, b in value.items():
        if not isinstance(k, str) or not _INT_RE.fullmatch(k.strip()) or not 0 <= int(k) <= MAX_TOKEN_ID:
            raise InvalidRequest(f"logit_bias: key {str(k)[:20]!r} must be a token id (an integer ≥ 0)")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
            raise InvalidRequest(f"logit_bias: {k}: {str(b)[:20]} must be a number in [-100, 100]")
        out.append((int(k), float(b)))
    return tuple(out)


def _ranged(name: str, raw: str, lo: float, hi: float, lo_open: bool = False) -> float:
    allowed = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    v = _float(name, raw, allowed)
    if not ((lo < v) if lo_open else (lo <= v)) or v > hi:
        raise InvalidRequest(f"{name}: {v:g} is out of range; allowed: {allowed}")
    return v


def _processing_params(f: Mapping[str, str], kw: dict[str, Any], limits: RequestLimits) -> None:
    """The penalties, min_p, min_tokens, logit_bias, stop_token_ids and the logprob counts."""
    for name in ("presence_penalty", "frequency_penalty"):
        if name in f:
            kw[name] = _ranged(name, f[name], -MAX_PENALTY, MAX_PENALTY)
    if "repetition_penalty" in f:
        raw = f["repetition_penalty"]
        kw["repetition_penalty"] = _ranged("repetition_penalty", raw, 0, MAX_REPETITION_PENALTY, lo_open=True)
    if "min_p" in f:
        kw["min_p"] = _ranged("min_p", f["min_p"], 0, 1)
    if "min_tokens" in f:
        kw["min_tokens"] = _int("min_tokens", f["min_tokens"], 0, limits.max_new_tokens)
    if "logit_bias" in f:
        kw["logit_bias"] = parse_logit_bias(f["logit_bias"])
    if "stop_token_ids" in f:
        kw["stop_token_ids"] = parse_token_ids("stop_token_ids", f["stop_token_ids"], limits.max_stop_strings)
    for name in ("logprobs", "prompt_logprobs"):
        if name in f:
            kw[name] = _int(name, f[name], 0, MAX_LOGPROBS)


def parse_params(f: Mapping[str, str], limits: RequestLimits) -> SamplingParams:
    """SamplingParams from the request's fields; messages name the wire field and its range."""
    kw: dict[str, Any] = {"max_new_tokens": limits.default_max_new_tokens}
    if "max_new_tokens" in f:
        kw["max_new_tokens"] = _int("max_new_tokens", f["max_new_tokens"], 1, limits.max_new_tokens)
    if "temperature" in f:
        kw["temperature"] = _temperature(f["temperature"])
    if "top_k" in f:
        kw["top_k"] = _int("top_k", f["top_k"], 0, MAX_TOP_K)
    if "top_p" in f:
        kw["top_p"] = _top_p(f["top_p"])
    if "seed" in f:
        kw["seed"] = _int("seed", f["seed"], 0, MAX_SEED)
    if "stop" in f:
        kw["stop"] = parse_stop(f["stop"], limits)
    if "ignore_eos" in f:
        kw["ignore_eos"] = _bool("ignore_eos", f["ignore_eos"])
    _processing_params(f, kw, limits)
    try:
        return SamplingParams(**kw)
    except ConfigError as e:  # a rule SamplingParams has that the checks above don't
        raise InvalidRequest(str(e)) from e


def decode_fields(fields: Fields, limits: RequestLimits) -> dict[str, str]:
    """Size-check, decode to ``str`` and reject unknown fields."""
    check_sizes(fields, limits)
    out: dict[str, str] = {}
    for k, v in fields.items():
        name = _decode("field name", k)
        if name not in FIELDS:
            raise InvalidRequest(f"{name[:64]}: unknown field; allowed fields: {', '.join(FIELDS)}")
        out[name] = _decode(name, v)
    return out


def parse_request(fields: Fields, entry_id: str, limits: RequestLimits | None = None) -> ParsedRequest:
    """Validate a raw request entry; raise InvalidRequest naming the field and the allowed values."""
    limits = limits or RequestLimits()
    f = decode_fields(fields, limits)
    request_id = parse_request_id(f, entry_id)
    given = [k for k in ("prompt", "messages", "prompt_ids") if k in f]
    if len(given) != 1:
        raise InvalidRequest(
            "prompt, messages: give exactly one of them"
            + (f" (both were given: {', '.join(given)})" if given else " (neither was given; or prompt_ids)")
        )
    prompt = messages = prompt_ids = None
    if "prompt" in f:
        prompt = f["prompt"]
        if not prompt:
            raise InvalidRequest("prompt: must be a non-empty string")
    elif "prompt_ids" in f:
        prompt_ids = parse_token_ids("prompt_ids", f["prompt_ids"], limits.max_field_bytes)
        if not prompt_ids:
            raise InvalidRequest("prompt_ids: must be a non-empty JSON list of token ids")
    else:
        messages = parse_messages(f["messages"], limits)
    deadline_s = None
    if "deadline_s" in f:
        deadline_s = _float("deadline_s", f["deadline_s"], f"(0, {limits.max_deadline_s:g}]")
        if not 0 < deadline_s <= limits.max_deadline_s:
            raise InvalidRequest(f"deadline_s: {deadline_s:g} is out of range; allowed: (0, {limits.max_deadline_s:g}]")
    model = f.get("model")
    if model is not None and not _ID_RE.fullmatch(model):
        raise InvalidRequest(f"model: {model[:40]!r} is not a valid model name; use {C.ID_ALLOWED_CHARS}")
    return ParsedRequest(
        request_id=request_id,
        prompt=prompt,
        messages=messages,
        params=parse_params(f, limits),
        model=model,
        deadline_s=deadline_s,
        prompt_ids=prompt_ids,
        structured=parse_structured(f, chat=messages is not None),
    )


def check_context(prompt_tokens: int, max_new_tokens: int, max_model_len: int) -> None:
    """Reject a request whose prompt plus ``max_new_tokens`` does not fit the model's context."""
    if prompt_tokens < 1:
        raise InvalidRequest("prompt: tokenizes to 0 tokens; give some text")
    if prompt_tokens + max_new_tokens > max_model_len:
        raise InvalidRequest(
            f"prompt, max_new_tokens: prompt of {prompt_tokens} tokens + max_new_tokens "
            f"{max_new_tokens} = {prompt_tokens + max_new_tokens} exceeds the model's "
            f"context of {max_model_len} tokens"
        )
