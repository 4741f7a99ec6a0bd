"""Structured outputs and tool calls over HTTP: the OpenAI parameters that become the request's structured
fields, the tool-related keys of chat messages, and the tool calls parsed out of an answer's text.

The head renders the tools into the prompt (:mod:`hexgen.head.tool_prompt`) and, for ``tool_choice``
``required`` or a named function, constrains the answer to a call. Here the answer's text is read back:
``<tool_call>...</tool_call>`` blocks (one call object or a list of them), or an answer that is one JSON
call object ``{"name": ..., "parameters" | "arguments": {...}}`` naming one of the tools (Llama 3.1's
format), become ``message.tool_calls`` with ``finish_reason: tool_calls``. A streamed answer that starts like
a tool call is held back and sent as tool-call deltas once complete; any other answer streams as content.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from hexgen.head.http.errors import invalid, unsupported
from hexgen.wire.protocol import STRUCTURED_FIELDS

CHAT_ONLY = ("tools", "tool_choice")
TOOL_KEYS = ("tool_calls", "tool_call_id", "name")  # a chat message's keys besides role and content
_TAG = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"


# parameter -> (the JSON types it takes, what the error says it must be)
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "response_format": ((dict,), 'an object such as {"type": "json_object"}'),
    "guided_json": ((dict, bool, str), "a JSON schema"),
    "guided_regex": ((str,), "a regular expression (a string)"),
    "guided_choice": ((list,), "a list of strings"),
    "guided_grammar": ((str,), "a grammar (a string)"),
    "tools": ((list,), "a list of function tools"),
    "tool_choice": ((str, dict), '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}'),
}
_NO_OP = {"response_format": {"type": "text"}, "tools": []}


def structured_params(body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """The structured-output and tool parameters of an OpenAI body, checked for their JSON types (the
    head checks the rest); ``response_format: {"type": "text"}`` and empty ``tools`` are dropped."""
    out: dict[str, Any] = {}
    for name in STRUCTURED_FIELDS:
        value = body.get(name)
        if value is None or (name in _NO_OP and value == _NO_OP[name]):
            continue
        if endpoint != "chat" and name in CHAT_ONLY:
            raise unsupported(name, "is only for /v1/chat/completions")
        types, what = _TYPES[name]
        if not isinstance(value, types):
            raise invalid(f"{name}: must be {what}", name)
        out[name] = value
    if "tools" not in out and out.get("tool_choice") in ("none", "auto"):
        del out["tool_choice"]
    return out


def message_keys(i: int, m: dict[str, Any]) -> dict[str, Any]:
    """A chat message's tool-related keys (``tool_calls``, ``tool_call_id``, ``name``) as the wire takes them."""
    out: dict[str, Any] = {}
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise invalid(f"messages[{i}].tool_calls: must be a list of tool calls", f"messages[{i}].tool_calls")
        if calls:
            out["tool_calls"] = calls
    for key in TOOL_KEYS[1:]:
        if m.get(key) is not None:
            out[key] = m[key]
    return out


def tools_active(params: dict[str, Any]) -> bool:
    """Whether the answer is read for tool calls."""
    return bool(params.get("tools")) and params.get("tool_choice") != "none"


def _call(obj: Any, names: set[str] | None) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if names is not None and obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {
        "id": "call_" + uuid.uuid4().hex[:24],
        "type": "function",
        "function": {
            "name": obj["name"],
            "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False),
        },
    }


def parse_tool_calls(text: str, tools: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """``(content, tool_calls)`` of an answer: the text outside tool calls (None when empty) and the calls
    in OpenAI's shape. No calls: ``(text, [])``."""
    names = {t.get("function", {}).get("name") for t in tools if isinstance(t, dict)}
    calls: list[dict[str, Any]] = []
    if "<tool_call>" in text:
        for block in _TAG.findall(text):
            try:
                obj = json.loads(block)
            except ValueError:
                return text, []
            for item in obj if isinstance(obj, list) else [obj]:
                call = _call(item, names)
                if call is None:
                    return text, []
                calls.append(call)
        rest = _TAG.sub("", text).strip()
        return (rest or None, calls) if calls else (text, [])
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG) :].strip()
    if body.startswith("{"):
        try:
            obj = json.loads(body)
        except ValueError:
            return text, []
        call = _call(obj, names) if ("parameters" in obj or "arguments" in obj) else None
        if call is not None:
            return None, [call]
    return text, []


def might_be_call(text: str) -> bool:
    """Whether a streamed answer beginning with ``text`` may still turn out to be a tool call."""
    head = text.lstrip()
    for prefix in ("<tool_call>", _PYTHON_TAG):
        if head.startswith(prefix) or prefix.startswith(head):
            return True
    return head.startswith("{")


def call_deltas(calls: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The ``delta.tool_calls`` of the chunks that stream ``calls``: per call, its id and name with empty
    arguments, then its arguments."""
    out = []
    for i, c in enumerate(calls):
        fn = c["function"]
        out.append([{"index": i, "id": c["id"], "type": "function", "function": {"name": fn["name"], "arguments": ""}}])
        out.append([{"index": i, "function": {"arguments": fn["arguments"]}}])
    return out


class ToolStream:
    """A streamed answer's text while tools are active: passed on as content once it cannot be a tool call
    any more, else held back until the end and parsed (``finish``)."""

    def __init__(self, tools: list[dict[str, Any]]) -> None:
        self.tools = tools
        self.held = ""
        self.content = False  # decided: the answer is content, streamed as it comes

    def feed(self, text: str) -> str | None:
        """The content to send now for this delta (None: held back)."""
        if self.content:
            return text
        self.held += text
        if might_be_call(self.held):
            return None
        self.content = True
        out, self.held = self.held, ""
        return out

    def finish(self) -> tuple[str | None, list[dict[str, Any]]]:
        """``(content still to send, tool calls)`` at the end of the answer."""
        if self.content:
            return None, []
        return parse_tool_calls(self.held, self.tools)
