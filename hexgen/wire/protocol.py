"""Typed codecs for everything HexGen puts in Redis; the only module that touches msgpack.

- Work items (``hexgen:work:<model>``): fields ``id`` (readable request id), ``model`` (readable) and ``data``
  (msgpack of ``Request.to_dict()`` plus ``model``).
- Result events (``hexgen:result:<id>``): flat string fields, the public wire protocol (README)::

      event token seq <n> ids <comma-separated ids> text <delta>
            [logprobs <JSON>] [prompt_ids <comma-separated ids> prompt_logprobs <JSON>]
      event done finish_reason length|stop|eos|cancelled prompt_tokens <n> completion_tokens <n> cached_tokens <n>
      event error code invalid_request|overloaded|not_found|internal|timeout|no_ready_pipeline message <text>

- Requests (``hexgen:requests``): flat string fields; :func:`request_fields` builds them for clients,
  :mod:`hexgen.head.validation` parses them.
- Cancels (``hexgen:cancel``): ``id <request id>``.
- Registry records (``hexgen:worker:<id>``, ``hexgen:pipeline:<pid>``): hashes of plain strings so that
  ``redis-cli HGETALL`` stays readable.

A token event carries ``logprobs`` when the request asked for them: a JSON list with one
``[logprob, [[alternative id, logprob], ...]]`` per id. The request's first token event carries
``prompt_ids`` and ``prompt_logprobs`` when it asked for prompt logprobs: one entry per prompt id, ``null``
for the first, else as for ``logprobs``.

Field names and values may arrive as ``bytes`` (redis-py default) or ``str`` (``decode_responses=True``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from hexgen.engine.types import FINISH_REASONS, Request
from hexgen.errors import HexGenError

INVALID_REQUEST = "invalid_request"
OVERLOADED = "overloaded"
NOT_FOUND = "not_found"
INTERNAL = "internal"
TIMEOUT = "timeout"  # the request's deadline passed while a pipeline was serving its model
NO_READY_PIPELINE = "no_ready_pipeline"  # the deadline passed with no ready pipeline for the model
ERROR_CODES = (INVALID_REQUEST, OVERLOADED, NOT_FOUND, INTERNAL, TIMEOUT, NO_READY_PIPELINE)

Fields = Mapping[str | bytes, str | bytes | int | float]
# Structured-output and tool fields of a request (hexgen.head.structured parses them).
STRUCTURED_FIELDS = (
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "tools",
    "tool_choice",
)

MAX_WORK_ITEM_BYTES = 16 << 20  # a work item's ``data`` is refused above this, before it is decoded


class ProtocolError(HexGenError, ValueError):
    """A Redis entry does not follow HexGen's wire format (corrupt or foreign data)."""


class RequestError(HexGenError):
    """A request was refused or failed; ``code`` is one of ERROR_CODES, ``message`` names the field."""

    code: str = INTERNAL

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class InvalidRequest(RequestError):
    """A request field is missing, malformed or out of range (code ``invalid_request``)."""

    def __init__(self, message: str) -> None:
        super().__init__(INVALID_REQUEST, message)


class Overloaded(RequestError):
    """The work queue is too deep; retry later with a new id (code ``overloaded``)."""

    def __init__(self, message: str) -> None:
        super().__init__(OVERLOADED, message)


class NotFound(RequestError):
    """The requested model is not served here (code ``not_found``)."""

    def __init__(self, message: str) -> None:
        super().__init__(NOT_FOUND, message)


class InternalError(RequestError):
    """The server failed while handling the request (code ``internal``)."""

    def __init__(self, message: str) -> None:
        super().__init__(INTERNAL, message)


class DeadlineExceeded(RequestError):
    """The request's deadline passed before it finished (code ``timeout``)."""

    def __init__(self, message: str) -> None:
        super().__init__(TIMEOUT, message)


class NoReadyPipeline(RequestError):
    """The request's deadline passed while no pipeline of its model was ready (code ``no_ready_pipeline``)."""

    def __init__(self, message: str) -> None:
        super().__init__(NO_READY_PIPELINE, message)


_ERROR_CLASSES: dict[str, Callable[[str], RequestError]] = {  # each takes the message
    INVALID_REQUEST: InvalidRequest,
    OVERLOADED: Overloaded,
    NOT_FOUND: NotFound,
    INTERNAL: InternalError,
    TIMEOUT: DeadlineExceeded,
    NO_READY_PIPELINE: NoReadyPipeline,
}


def request_error(code: str, message: str) -> RequestError:
    """The RequestError subclass for ``code`` (unknown codes give a plain RequestError carrying that code)."""
    cls = _ERROR_CLASSES.get(code)
    return cls(message) if cls is not None else RequestError(code, message)


# ---- helpers ---------------------------------------------------------------------------------------------


def _s(v: Any) -> str:
    """A wire field as str; bytes that are not UTF-8 are a ProtocolError."""
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"field value is not valid UTF-8: {v[:40]!r}") from e
    return str(v)


def str_fields(fields: Fields) -> dict[str, str]:
    """Decode an entry's field names and values to ``str`` (ProtocolError on bad UTF-8)."""
    return {_s(k): _s(v) for k, v in fields.items()}


def _get(fields: Mapping[str, str], name: str, kind: str) -> str:
    try:
        return fields[name]
    except KeyError:
        raise ProtocolError(f"{kind}: field {name!r} is missing (fields: {sorted(fields)})") from None


def _int(fields: Mapping[str, str], name: str, kind: str) -> int:
    raw = _get(fields, name, kind)
    try:
        return int(raw)
    except ValueError as e:
        raise ProtocolError(f"{kind}: field {name!r} = {raw!r} is not an integer") from e


def _opt_int(fields: Mapping[str, str], name: str) -> int:
    raw = fields.get(name, "")
    return int(raw) if raw.strip().isdigit() else 0


# ---- work items ------------------------------------------------------------------------------------------


def encode_work_item(req: Request, model: str) -> dict[str, bytes]:
    """Fields of one work-stream entry for ``req`` on ``model``."""
    payload = req.to_dict()
    payload["model"] = model
    try:
        data = msgpack.packb(payload, use_bin_type=True)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"work item {req.request_id!r}: meta/params are not msgpack-able: {e}") from e
    return {"id": req.request_id.encode("utf-8"), "model": model.encode("utf-8"), "data": data}


def decode_work_item(fields: Fields) -> tuple[Request, str]:
    """Inverse of :func:`encode_work_item`: ``(Request, model)``; ProtocolError on anything malformed."""
    data = fields.get("data", fields.get(b"data"))
    if data is None:
        raise ProtocolError(f"work item: field 'data' is missing (fields: {sorted(map(_s, fields))})")
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if not isinstance(data, bytes) or len(data) > MAX_WORK_ITEM_BYTES:
        size = len(data) if isinstance(data, bytes) else type(data).__name__
        raise ProtocolError(f"work item: 'data' ({size} bytes) must be bytes of at most {MAX_WORK_ITEM_BYTES}")
    try:
        payload = msgpack.unpackb(data, raw=False, strict_map_key=True)
        model = payload.pop("model")
        req = Request.from_dict(payload)
    except (
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
    ) as e:
        raise ProtocolError(f"work item: 'data' is not a valid msgpack request: {e!r}") from e
    return req, str(model)


# ---- result events ---------------------------------------------------------------------------------------


TokenLogprob = tuple[float, tuple[tuple[int, float], ...]]  # (logprob, ((alternative id, logprob), ...))


@dataclass(frozen=True)
class TokenEvent:
    """``event token``: completion tokens ``ids`` starting at index ``seq``, and their UTF-8-safe text delta;
    with the logprobs the request asked for."""

    seq: int
    ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per id
    prompt_ids: tuple[int, ...] | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # one per prompt id (first: None)


@dataclass(frozen=True)
class DoneEvent:
    """``event done``: the request finished; no more events follow."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose K/V the pipeline's prefix cache supplied


@dataclass(frozen=True)
class ErrorEvent:
    """``event error``: the request failed; no more events follow."""

    code: str
    message: str

    def to_exception(self) -> RequestError:
        return request_error(self.code, self.message)


Event = TokenEvent | DoneEvent | ErrorEvent


def _ids(ids: Any) -> str:
    return ",".join(str(int(i)) for i in ids)


def _lp_json(entries: Any) -> str:
    return json.dumps(
        [None if e is None else [float(e[0]), [[int(i), float(v)] for i, v in e[1]]] for e in entries],
        separators=(",", ":"),
    )


def token_event(
    seq: int,
    ids: list[int] | tuple[int, ...],
    text: str,
    logprobs: Any = None,
    prompt_ids: Any = None,
    prompt_logprobs: Any = None,
) -> dict[str, str]:
    """Fields of a token event; ``logprobs``: one ``(logprob, [(id, logprob), ...])`` per id; ``prompt_ids``
    with ``prompt_logprobs`` (None for the first prompt token) on a request's first event."""
    if seq < 0:
        raise ProtocolError(f"token event: seq {seq} must be ≥ 0")
    out = {"event": "token", "seq": str(int(seq)), "ids": _ids(ids), "text": text}
    if logprobs is not None:
        out["logprobs"] = _lp_json(logprobs)
    if prompt_ids is not None and prompt_logprobs is not None:
        out["prompt_ids"] = _ids(prompt_ids)
        out["prompt_logprobs"] = _lp_json(prompt_logprobs)
    return out


def _parse_ids(raw: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in raw.split(",")) if raw else ()
    except ValueError as e:
        raise ProtocolError(f"token event: {name} {raw[:80]!r} must be comma-separated integers") from e


def _parse_lps(raw: str | None, name: str) -> tuple[Any, ...] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
        return tuple(None if e is None else (float(e[0]), tuple((int(i), float(v)) for i, v in e[1])) for e in value)
    except (ValueError, TypeError, IndexError) as e:
        raise ProtocolError(f"token event: {name} is not a JSON list of [logprob, [[id, logprob], ...]]") from e


def done_event(
    finish_reason: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
) -> dict[str, str]:
    """Fields of a done event; ``finish_reason`` is one of length, stop, eos, cancelled; ``cached_tokens``:
    prompt tokens the prefix cache supplied."""
    if finish_reason not in FINISH_REASONS:
        raise ProtocolError(f"done event: finish_reason {finish_reason!r} must be one of {', '.join(FINISH_REASONS)}")
    return {
        "event": "done",
        "finish_reason": finish_reason,
        "prompt_tokens": str(int(prompt_tokens)),
        "completion_tokens": str(int(completion_tokens)),
        "cached_tokens": str(int(cached_tokens)),
    }


def error_event(code: str, message: str) -> dict[str, str]:
    """Fields of an error event; ``code`` is one of ERROR_CODES."""
    if code not in ERROR_CODES:
        raise ProtocolError(f"error event: code {code!r} must be one of {', '.join(ERROR_CODES)}")
    return {"event": "error", "code": code, "message": message}


def parse_event(fields: Fields) -> Event:
    """Decode one result-stream entry into a TokenEvent, DoneEvent or ErrorEvent."""
    f = str_fields(fields)
    kind = _get(f, "event", "result event")
    if kind == "token":
        prompt_ids = f.get("prompt_ids")
        return TokenEvent(
            seq=_int(f, "seq", "token event"),
            ids=_parse_ids(f.get("ids", ""), "ids"),
            text=f.get("text", ""),
            logprobs=_parse_lps(f.get("logprobs"), "logprobs"),
            prompt_ids=None if prompt_ids is None else _parse_ids(prompt_ids, "prompt_ids"),
            prompt_logprobs=_parse_lps(f.get("prompt_logprobs"), "prompt_logprobs"),
        )
    if kind == "done":
        return DoneEvent(
            finish_reason=_get(f, "finish_reason", "done event"),
            prompt_tokens=_int(f, "prompt_tokens", "done event"),
            completion_tokens=_int(f, "completion_tokens", "done event"),
            cached_tokens=_opt_int(f, "cached_tokens"),  # absent from older pipelines' events: 0
        )
    if kind == "error":
        return ErrorEvent(code=_get(f, "code", "error event"), message=f.get("message", ""))
    raise ProtocolError(f"result event: event {kind!r} must be token, done or error")


# ---- requests and cancels --------------------------------------------------------------------------------


def request_fields(
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
    *,
    request_id: str | None = None,
    model: str | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | list[str] | tuple[str, ...] | None = None,
    ignore_eos: bool | None = None,
    deadline_s: float | None = None,
    prompt_ids: list[int] | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    repetition_penalty: float | None = None,
    min_p: float | None = None,
    min_tokens: int | None = None,
    logit_bias: dict[int | str, float] | None = None,
    stop_token_ids: list[int] | None = None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    **structured: Any,
) -> dict[str, str]:
    """Flat fields of a ``hexgen:requests`` entry; parameters left as None are omitted (server defaults).

    The head validates every field; this helper only serializes (JSON for ``messages``, a ``stop`` list,
    ``prompt_ids``, ``logit_bias`` and ``stop_token_ids``). ``structured``: the structured-output and tool
    fields (``response_format``, ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``,
    ``tools``, ``tool_choice``), strings as they are and other values as JSON.
    """
    out: dict[str, str] = {}
    if prompt is not None:
        out["prompt"] = prompt
    for name, obj in (("prompt_ids", prompt_ids), ("logit_bias", logit_bias), ("stop_token_ids", stop_token_ids)):
        if obj is not None:
            out[name] = json.dumps(obj, separators=(",", ":"))
    if messages is not None:
        out["messages"] = json.dumps(list(messages), ensure_ascii=False)
    for name, value in (
        ("id", request_id),
        ("model", model),
        ("max_new_tokens", max_new_tokens),
        ("temperature", temperature),
        ("top_k", top_k),
        ("top_p", top_p),
        ("seed", seed),
        ("deadline_s", deadline_s),
        ("presence_penalty", presence_penalty),
        ("frequency_penalty", frequency_penalty),
        ("repetition_penalty", repetition_penalty),
        ("min_p", min_p),
        ("min_tokens", min_tokens),
        ("logprobs", logprobs),
        ("prompt_logprobs", prompt_logprobs),
    ):
        if value is not None:
            out[name] = repr(float(value)) if isinstance(value, float) else str(value)
    if stop is not None:
        out["stop"] = stop if isinstance(stop, str) else json.dumps(list(stop), ensure_ascii=False)
    if ignore_eos is not None:
        out["ignore_eos"] = "1" if ignore_eos else "0"
    out.update(_structured_fields(structured))
    return out


def _structured_fields(structured: dict[str, Any]) -> dict[str, str]:
    """The structured-output and tool fields: strings as they are, other values as JSON."""
    out: dict[str, str] = {}
    for name, value in structured.items():
        if name not in STRUCTURED_FIELDS:
            raise TypeError(f"request_fields: unknown parameter {name!r}")
        if value is not None:
            out[name] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return out


def cancel_fields(request_id: str) -> dict[str, str]:
    """Fields of a ``hexgen:cancel`` entry (same as ``redis-cli XADD hexgen:cancel '*' id <id>``)."""
    return {"id": request_id}


def parse_cancel(fields: Fields) -> str:
    """Request id of a ``hexgen:cancel`` entry."""
    return _get(str_fields(fields), "id", "cancel entry")
