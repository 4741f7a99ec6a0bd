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
    "functions": ((None, []), "is not supported (function calling is not implemented)"),
    "function_call": ((None, "none", "auto"), "is not supported (function calling is not implemented)"),
    "modalities": ((None, ["text"]), 'is not supported (only ["text"])'),
    "audio": ((None,), "is not supported"),
    "prediction": ((None,), "is not supported"),
    "reasoning_effort": ((None,), "is not supported"),
    "web_search_options": ((None,), "is not supported"),
    "suffix": ((None, ""), "is not supported (only null)"),
    "best_of": ((None, 1), "is not supported (only 1)"),
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
    "deadline_s",
    "min_tokens",
    "stop_token_ids",
    "return_tokens_as_token_ids",
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
MAX_N = 16
MAX_LOGPROBS = 20
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Job:
    """One HexGen request of an OpenAI request: one choice (``index``) of one prompt."""

    index: int  # the choice's index: prompt number * n + sequence number
    request_id: str
    params: dict[str, Any]  # HexGenClient.stream's keyword arguments
    fields: dict[str, str]  # the request fields they make (validated)
    prompt: str | list[int] | None  # completions: the prompt as given (echo)


@dataclass(frozen=True)
class Translated:
    """An OpenAI request as HexGen requests (one per choice), plus what shapes the answer."""

    endpoint: str  # chat | completions
    model: str
    jobs: tuple[Job, ...]
    request_id: str
    stream: bool
    include_usage: bool
    rename: dict[str, str] = field(default_factory=dict)  # wire field -> the request's parameter name
    logprobs: int | None = None  # top alternatives per generated token (None: no logprobs)
    echo: bool = False  # completions: the prompt comes back before the completion
    drop_generated: bool = False  # max_tokens 0: the one token generated is not returned
    n: int = 1  # choices per prompt
    tokens_as_ids: bool = False  # logprobs name tokens "token_id:<id>" (vLLM's return_tokens_as_token_ids)

    @property
    def params(self) -> dict[str, Any]:
        return self.jobs[0].params

    @property
    def fields(self) -> dict[str, str]:
        return self.jobs[0].fields


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


def _is_ids(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_is_int(t) and t >= 0 for t in v)


def _prompts(value: Any) -> list[str | list[int]]:
    """``prompt``: a string, a list of strings, a list of token ids, or a list of lists of token ids."""
    if isinstance(value, str):
        return [value]
    if _is_ids(value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str) or _is_ids(p) for p in value):
        return list(value)
    raise invalid(
        "prompt: must be a string, a list of strings, a list of token ids or a list of lists of token ids", "prompt"
    )


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


def _inputs(body: dict[str, Any], endpoint: str) -> list[dict[str, Any]]:
    """One ``{"messages"}``, or one ``{"prompt"}`` / ``{"prompt_ids"}`` per prompt."""
    if endpoint == "chat":
        if "messages" not in body:
            raise invalid("messages: missing; give the conversation as a list of {role, content}", "messages")
        return [{"messages": _messages(body["messages"])}]
    if "prompt" not in body:
        raise invalid("prompt: missing", "prompt")
    return [{"prompt": p} if isinstance(p, str) else {"prompt_ids": p} for p in _prompts(body["prompt"])]


def _length(body: dict[str, Any], kw: dict[str, Any], endpoint: str) -> tuple[str, bool]:
    """Set ``max_new_tokens`` from max_completion_tokens or max_tokens; returns the parameter's name and
    whether it is 0 (completions only: one token is generated and dropped, for echo)."""
    name = next((p for p in ("max_completion_tokens", "max_tokens") if body.get(p) is not None), None)
    if name is None:
        return "max_tokens", False
    zero_ok = endpoint == "completions"
    _want(_is_int(body[name]), name, "an integer ≥ 0" if zero_ok else "an integer ≥ 1", body[name])
    if body[name] == 0 and zero_ok:
        kw["max_new_tokens"] = 1
        return name, True
    kw["max_new_tokens"] = body[name]
    return name, False


def _processing(body: dict[str, Any]) -> dict[str, Any]:
    """presence/frequency/repetition penalties, min_p, min_tokens, logit_bias, stop_token_ids: types only."""
    kw: dict[str, Any] = {}
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
        if body.get(name) is not None:
            _want(_is_num(body[name]), name, "a number", body[name])
            kw[name] = float(body[name])
    if body.get("min_tokens") is not None:
        _want(_is_int(body["min_tokens"]), "min_tokens", "an integer ≥ 0", body["min_tokens"])
        kw["min_tokens"] = body["min_tokens"]
    bias = body.get("logit_bias")
    if bias is not None:
        ok = isinstance(bias, dict) and all(_is_num(v) for v in bias.values())
        _want(ok, "logit_bias", 'an object mapping token ids to biases, such as {"1234": -100}', bias)
        if bias:
            kw["logit_bias"] = bias
    ids = body.get("stop_token_ids")
    if ids is not None:
        _want(ids == [] or _is_ids(ids), "stop_token_ids", "a list of token ids", ids)
        if ids:
            kw["stop_token_ids"] = ids
    return kw


def _logprobs(body: dict[str, Any], endpoint: str) -> tuple[int | None, bool]:
    """(top alternatives per generated token or None, echo)."""
    lp = body.get("logprobs")
    if endpoint == "chat":
        _want(lp is None or isinstance(lp, bool), "logprobs", "true or false", lp)
        top = body.get("top_logprobs")
        if top is not None:
            _want(_is_int(top) and 0 <= top <= MAX_LOGPROBS, "top_logprobs", f"an integer in [0, {MAX_LOGPROBS}]", top)
            if not lp:
                raise invalid("top_logprobs: requires logprobs: true", "top_logprobs")
        return ((top or 0) if lp else None), False
    if lp is not None and lp is not False:
        _want(_is_int(lp) and 0 <= lp <= MAX_LOGPROBS, "logprobs", f"an integer in [0, {MAX_LOGPROBS}]", lp)
    echo = body.get("echo")
    _want(echo is None or isinstance(echo, bool), "echo", "true or false", echo)
    return (None if lp is None or lp is False else lp), bool(echo)


def _n(body: dict[str, Any]) -> int:
    n = body.get("n")
    if n is None:
        return 1
    _want(_is_int(n) and 1 <= n <= MAX_N, "n", f"an integer in [1, {MAX_N}]", n)
    return int(n)


def choice_seed(seed: int, i: int) -> int:
    """The seed of choice ``i`` of a request with ``seed``: the seed itself for the first, a SplitMix64 hash of
    (seed, i) for the others, so one seed reproduces all n choices and they differ from each other."""
    if i == 0:
        return seed
    x = (seed ^ (i * 0x9E3779B97F4A7C15)) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (x ^ (x >> 31)) & MAX_SEED


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
        nonempty = stop != "" if isinstance(stop, str) else "" not in stop
        _want(nonempty, "stop", "a non-empty string or a list of non-empty strings", stop)
        if stop != []:
            kw["stop"] = stop
    if body.get("ignore_eos") is not None:
        _want(isinstance(body["ignore_eos"], bool), "ignore_eos", "true or false", body["ignore_eos"])
        kw["ignore_eos"] = body["ignore_eos"]
    if body.get("deadline_s") is not None:
        _want(_is_num(body["deadline_s"]), "deadline_s", "a number of seconds > 0", body["deadline_s"])
        kw["deadline_s"] = float(body["deadline_s"])
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
    """Check an OpenAI request body's parameters and turn it into HexGen requests, one per prompt and choice
    (APIError if not)."""
    if not isinstance(body, dict):
        raise invalid("request body: must be a JSON object", None)
    _check_names(body, endpoint)
    model = _served_model(body, ctx)
    inputs = _inputs(body, endpoint)
    kw: dict[str, Any] = {"model": model}
    length_name, drop = _length(body, kw, endpoint)
    kw.update(_sampling(body))
    kw.update(_processing(body))
    logprobs, echo = _logprobs(body, endpoint)
    n = _n(body)
    as_ids = body.get("return_tokens_as_token_ids")
    _want(as_ids is None or isinstance(as_ids, bool), "return_tokens_as_token_ids", "true or false", as_ids)
    as_ids = bool(as_ids)
    lp_name = "top_logprobs" if endpoint == "chat" else "logprobs"
    rename = {"max_new_tokens": length_name, "prompt_logprobs": "logprobs", "logprobs": lp_name, "prompt_ids": "prompt"}
    if logprobs is not None:
        kw["logprobs"] = logprobs
    if echo and logprobs is not None:
        kw["prompt_logprobs"] = logprobs
    kw.update(structured_params(body, endpoint))
    stream, include_usage = _streaming(body)
    request_id = uuid.uuid4().hex
    limits = ctx.settings.limits.request_limits()
    jobs = []
    for p, source in enumerate(inputs):
        for i in range(n):
            params = {**kw, **source}
            if "seed" in kw:
                params["seed"] = choice_seed(kw["seed"], i)
            job_id = request_id if len(inputs) * n == 1 else f"{request_id}-{p * n + i}"
            fields = request_fields(request_id=job_id, **params)
            try:  # the Redis path's validation, before anything is queued
                parse_request(cast(Fields, fields), job_id, limits)
            except RequestError as e:
                raise rename_error(e, rename, endpoint) from None
            prompt = source.get("prompt", source.get("prompt_ids"))
            jobs.append(Job(p * n + i, job_id, params, fields, prompt))
    return Translated(
        endpoint,
        model,
        tuple(jobs),
        request_id,
        stream,
        include_usage,
        rename,
        logprobs=logprobs,
        echo=echo,
        drop_generated=drop,
        n=n,
        tokens_as_ids=as_ids,
    )


def rename_error(e: RequestError, rename: dict[str, str], endpoint: str) -> APIError:
    out = from_request_error(e, rename)
    if endpoint == "chat" and out.message.startswith("prompt, "):  # the head's context check on chat
        out.message = "messages, " + out.message[len("prompt, ") :]
    return out
