"""OpenAI request bodies -> HexGen request fields: parameter names, types and the Redis path's validation.

:func:`translate` checks an OpenAI request body's parameters and turns it into the fields every HexGen client
sends, then runs the Redis path's own validation (:func:`hexgen.head.validation.parse_request`), so a bad
value is a 400 naming the parameter and its range before anything is queued. OpenAI's defaults apply to what
a request leaves out (``temperature`` 1), except ``max_tokens``, which defaults to the deployment's
``limits.default_max_new_tokens``.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any, cast

from hexgen.head.http.context import HttpContext
from hexgen.head.http.errors import APIError, from_request_error, invalid, unknown_model, unsupported
from hexgen.head.http.tools import TOOL_KEYS, message_keys, structured_params
from hexgen.head.validation import parse_request
from hexgen.wire.protocol import Fields, RequestError, request_fields

OPENAI_DEFAULT_TEMPERATURE = 1.0


# Parameters accepted at their no-op value only: anything else would change the output, so it is a 400.
# name -> (the values that do nothing, what the error says)
_INERT: dict[str, tuple[tuple[Any, ...], str]] = {
    "presence_penalty": ((None, 0, 0.0), "only 0 is supported"),
    "frequency_penalty": ((None, 0, 0.0), "only 0 is supported"),
    "repetition_penalty": ((None, 1, 1.0), "only 1 is supported"),
    "min_p": ((None, 0, 0.0), "only 0 is supported"),
    "logit_bias": ((None, {}), "is not supported (only null or {})"),
    "logprobs": ((None, False), "is not supported (only null or false)"),
    "top_logprobs": ((None, 0), "is not supported (only null or 0)"),
    "functions": ((None, []), "is not supported (function calling is not implemented)"),
    "function_call": ((None, "none", "auto"), "is not supported (function calling is not implemented)"),
    "modalities": ((None, ["text"]), 'is not supported (only ["text"])'),
    "audio": ((None,), "is not supported"),
    "prediction": ((None,), "is not supported"),
    "reasoning_effort": ((None,), "is not supported"),
    "web_search_options": ((None,), "is not supported"),
    "echo": ((None, False), "is not supported (only false)"),
    "suffix": ((None, ""), "is not supported (only null)"),
    "best_of": ((None, 1), "is not supported (only 1)"),
    "n": ((None, 1), "only 1 is supported (one choice per request)"),
}
# Accepted and without effect on the output.
_NO_EFFECT = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
_COMMON = (
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "top_k",
    "ignore_eos",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
    "logit_bias",
    "logprobs",
    "user",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)
CHAT_PARAMS = frozenset(
    _COMMON
    + (
        "messages",
        "max_completion_tokens",
        "top_logprobs",
        "tools",
        "functions",
        "tool_choice",
        "function_call",
        "response_format",
        "modalities",
        "audio",
        "prediction",
        "reasoning_effort",
        "web_search_options",
        "metadata",
        "store",
        "service_tier",
        "parallel_tool_calls",
    )
)
COMPLETION_PARAMS = frozenset(_COMMON + ("prompt", "echo", "suffix", "best_of", "response_format"))
_ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


@dataclass(frozen=True)
class Translated:
    """An OpenAI request as HexGen request fields, plus what shapes the answer."""

    endpoint: str  # chat | completions
    model: str
    params: dict[str, Any]  # HexGenClient.stream's keyword arguments
    fields: dict[str, str]  # the request fields they make (validated)
    request_id: str
    stream: bool
    include_usage: bool
    rename: dict[str, str] = field(default_factory=dict)  # wire field -> the request's parameter name


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _want(cond: bool, param: str, what: str, value: Any) -> None:
    if not cond:
        raise invalid(f"{param}: {json.dumps(value)[:60]} must be {what}", param)


def _content_text(i: int, content: Any) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise unsupported(
                    f"messages[{i}].content[{j}]", 'only text parts ({"type": "text", "text": "..."}) are supported'
                )
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"messages[{i}].content: must be a string or a list of text parts", f"messages[{i}].content")


def _messages(value: Any) -> list[dict[str, Any]]:
    _want(isinstance(value, list) and len(value) > 0, "messages", "a non-empty list of messages", value)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise invalid(f'messages[{i}]: must be an object {{"role": ..., "content": ...}}', f"messages[{i}]")
        for k, v in m.items():
            if k not in ("role", "content", *TOOL_KEYS) and v is not None:
                raise unsupported(f"messages[{i}].{k}", "is not supported (messages carry role and content)")
        role: Any = m.get("role")
        tool = message_keys(i, m)
        content = None if m.get("content") is None and "tool_calls" in tool else _content_text(i, m.get("content"))
        out.append({"role": _ROLE_ALIASES.get(role, role), "content": content, **tool})
    return out


def _prompt(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, list) and all(isinstance(p, str) for p in value):
        raise unsupported("prompt", f"a list of {len(value)} prompts is not supported; send one prompt per request")
    if isinstance(value, list):
        raise unsupported("prompt", "token-id prompts are not supported; send text")
    raise invalid("prompt: must be a string", "prompt")


def _check_names(body: dict[str, Any], endpoint: str) -> None:
    """Unknown parameters, and known ones at a value that would change the output, are 400s."""
    allowed, path = (
        (CHAT_PARAMS, "/v1/chat/completions") if endpoint == "chat" else (COMPLETION_PARAMS, "/v1/completions")
    )
    for k in body:
        if k not in allowed:
            raise unsupported(k, f"unknown parameter for {path}")
    for k, (ok, why) in _INERT.items():
        if k in body and body[k] not in ok:
            raise unsupported(k, why)


def _served_model(body: dict[str, Any], ctx: HttpContext) -> str:
    model = body.get("model", ctx.model)
    _want(isinstance(model, str) and model != "", "model", "a model name (GET /v1/models lists them)", model)
    if model not in ctx.models:
        raise unknown_model(model, ctx.models)
    return model


def _text_input(body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    if endpoint == "chat":
        if "messages" not in body:
            raise invalid("messages: missing; give the conversation as a list of {role, content}", "messages")
        return {"messages": _messages(body["messages"])}
    if "prompt" not in body:
        raise invalid("prompt: missing", "prompt")
    return {"prompt": _prompt(body["prompt"])}


def _length(body: dict[str, Any], kw: dict[str, Any]) -> str:
    """Set ``max_new_tokens`` from max_completion_tokens or max_tokens; returns the parameter's name."""
    name = next((p for p in ("max_completion_tokens", "max_tokens") if body.get(p) is not None), None)
    if name is None:
        return "max_tokens"
    _want(_is_int(body[name]), name, "an integer ≥ 1", body[name])
    kw["max_new_tokens"] = body[name]
    return name


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    """temperature (OpenAI's default when left out), top_p, seed, top_k, stop, ignore_eos: types only; the
    ranges are the Redis path's validation's."""
    t = body.get("temperature")
    if t is not None:
        _want(_is_num(t), "temperature", "a number (0 = greedy)", t)
    kw: dict[str, Any] = {"temperature": float(OPENAI_DEFAULT_TEMPERATURE if t is None else t)}
    if body.get("top_p") is not None:
        _want(_is_num(body["top_p"]), "top_p", "a number with 0 < top_p ≤ 1", body["top_p"])
        kw["top_p"] = float(body["top_p"])
    for name in ("seed", "top_k"):
        if body.get(name) is not None:
            _want(_is_int(body[name]), name, "an integer", body[name])
            kw[name] = body[name]
    stop = body.get("stop")
    if stop is not None:
        ok = isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
        _want(ok, "stop", "a string or a list of strings", stop)
        if stop != []:
            kw["stop"] = stop
    if body.get("ignore_eos") is not None:
        _want(isinstance(body["ignore_eos"], bool), "ignore_eos", "true or false", body["ignore_eos"])
        kw["ignore_eos"] = body["ignore_eos"]
    return kw


def _streaming(body: dict[str, Any]) -> tuple[bool, bool]:
    """``(stream, include_usage)``."""
    stream = body.get("stream")
    _want(stream is None or isinstance(stream, bool), "stream", "true or false", stream)
    opts = body.get("stream_options")
    if opts is None:
        return bool(stream), False
    _want(isinstance(opts, dict), "stream_options", 'an object such as {"include_usage": true}', opts)
    for k in opts:
        if k != "include_usage":
            raise unsupported(f"stream_options.{k}", "unknown option (only include_usage)")
    iu = opts.get("include_usage")
    _want(iu is None or isinstance(iu, bool), "stream_options.include_usage", "true or false", iu)
    if not stream:
        raise invalid("stream_options: only allowed with stream: true", "stream_options")
    return True, bool(iu)


def translate(body: Any, endpoint: str, ctx: HttpContext) -> Translated:
    """Check an OpenAI request body's parameters and turn it into HexGen request fields (APIError if not)."""
    if not isinstance(body, dict):
        raise invalid("request body: must be a JSON object", None)
    _check_names(body, endpoint)
    model = _served_model(body, ctx)
    kw: dict[str, Any] = {"model": model, **_text_input(body, endpoint)}
    rename = {"max_new_tokens": _length(body, kw)}
    kw.update(_sampling(body))
    kw.update(structured_params(body, endpoint))
    stream, include_usage = _streaming(body)
    request_id = uuid.uuid4().hex
    fields = request_fields(request_id=request_id, **kw)
    try:  # the Redis path's validation, before anything is queued
        parse_request(cast(Fields, fields), request_id, ctx.settings.limits.request_limits())
    except RequestError as e:
        raise rename_error(e, rename, endpoint) from None
    return Translated(endpoint, model, kw, fields, request_id, stream, include_usage, rename)


def rename_error(e: RequestError, rename: dict[str, str], endpoint: str) -> APIError:
    out = from_request_error(e, rename)
    if endpoint == "chat" and out.message.startswith("prompt, "):  # the head's context check on chat
        out.message = "messages, " + out.message[len("prompt, ") :]
    return out
