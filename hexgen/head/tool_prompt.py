"""Tools in the prompt: which tool-call format a chat template speaks, the messages and tool list handed to
it, and the JSON schema of a tool call in that format (for ``tool_choice`` required or a named function).

Formats:

- ``llama3``: templates that render ``tools`` themselves and speak Llama 3.1's JSON tool calls (their
  source mentions ``<|python_tag|>`` or ``ipython``); a call is the whole answer,
  ``{"name": ..., "parameters": {...}}``.
- ``hermes``: templates that render ``tools`` themselves and wrap each call in
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Qwen, Hermes).
- ``smollm2``: ChatML templates that do not render tools (SmolLM2's): the tools go into a system message in
  SmolLM2's own function-calling prompt, and calls come back as
  ``<tool_call>[{"name": ..., "arguments": {...}}, ...]</tool_call>``. Earlier calls in the history are
  written back in that form; ``tool`` messages keep their role.

Any other template has no known tool support: a request with tools gets ``invalid_request``.
"""

from __future__ import annotations

import json
from typing import Any

from hexgen.wire.protocol import InvalidRequest

FORMATS = ("llama3", "hermes", "smollm2")

SMOLLM2_TOOL_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
    "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n"
    "If none of the functions can be used, point it out and refuse to answer.\n"
    "If the given question lacks the parameters required by the function, also point it out.\n\n"
    "You have access to the following tools:\n<tools>{tools}</tools>\n\n"
    "The output MUST strictly adhere to the following format, and NO other text MUST be included.\n"
    "The example format is as follows. Please make sure the parameter type is correct. If no function call "
    "is needed, please make the tool calls an empty list '[]'.\n"
    "<tool_call>[\n"
    '{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}},\n'
    "... (more tool calls as required)\n"
    "]</tool_call>"
)


def tool_format(chat_template: Any) -> str:
    """The tool-call format of a chat template (InvalidRequest naming ``tools`` when it has none)."""
    source = chat_template if isinstance(chat_template, str) else json.dumps(chat_template or "")
    if "tools" in source:
        if "<|python_tag|>" in source or "ipython" in source:
            return "llama3"
        if "<tool_call>" in source:
            return "hermes"
    elif "<|im_start|>" in source:
        return "smollm2"
    raise InvalidRequest(
        "tools: this model's chat template does not render tools (known formats: Llama 3.1 JSON tool calls, "
        "Hermes <tool_call> tags, and ChatML templates such as SmolLM2's)"
    )


def _arguments(call: dict[str, Any]) -> Any:
    """A history tool call's arguments as an object (OpenAI sends them as a JSON string)."""
    args = call["function"].get("arguments", "{}")
    if isinstance(args, str):
        try:
            return json.loads(args or "{}")
        except ValueError:
            return args
    return args


def render(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]], fmt: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(messages, extra keyword arguments of apply_chat_template)`` for ``fmt``."""
    if fmt == "smollm2":
        out: list[dict[str, Any]] = []
        for m in messages:
            calls = m.get("tool_calls")
            if calls:
                body = [{"name": c["function"]["name"], "arguments": _arguments(c)} for c in calls]
                text = (m.get("content") or "") + "<tool_call>" + json.dumps(body, ensure_ascii=False) + "</tool_call>"
                out.append({"role": m["role"], "content": text})
            else:
                out.append({"role": m["role"], "content": m.get("content") or ""})
        if tools:
            listing = json.dumps([t["function"] for t in tools], ensure_ascii=False)
            prompt = SMOLLM2_TOOL_PROMPT.format(tools=listing)
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": prompt + "\n\n" + out[0]["content"]}
            else:
                out.insert(0, {"role": "system", "content": prompt})
        return out, {}
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {
                    "id": c.get("id"),
                    "type": "function",
                    "function": {"name": c["function"]["name"], "arguments": _arguments(c)},
                }
                for c in m["tool_calls"]
            ]
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out, ({"tools": tools} if tools else {})


def call_schema(tools: list[dict[str, Any]], names: list[str], fmt: str) -> dict[str, Any]:
    """JSON schema of one call to any function in ``names``, in ``fmt``'s shape."""
    key = "parameters" if fmt == "llama3" else "arguments"
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    options = []
    for name in names:
        params = by_name[name].get("parameters") or {"type": "object", "properties": {}}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, key: params},
                "required": ["name", key],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def call_grammar(tools: list[dict[str, Any]], names: list[str], fmt: str, single: bool) -> str:
    """A Lark grammar (llguidance) for the answer of a request that must call a tool: one call (``single``,
    a named function) or one or more."""
    one = call_schema(tools, names, fmt)
    if fmt == "llama3":
        return "start: %json " + json.dumps(one)
    if fmt == "hermes":
        rule = '"<tool_call>" %json ' + json.dumps(one) + ' "</tool_call>"'
        return f"start: {rule}" if single else f"start: call+\ncall: {rule}"
    calls = {"type": "array", "items": one, "minItems": 1, **({"maxItems": 1} if single else {})}
    return 'start: "<tool_call>" %json ' + json.dumps(calls) + ' "</tool_call>"'
