"""OpenAI response bodies: the JSON of a whole answer and the server-sent-event chunks of a streamed one."""

from __future__ import annotations

import json
import time
from typing import Any

from hexgen.head.http.openai_request import Translated
from hexgen.head.http.tools import ToolStream, call_deltas, parse_tool_calls, tools_active
from hexgen.wire.protocol import DoneEvent


def openai_finish_reason(reason: str) -> str:
    """Ours -> OpenAI's: eos and stop strings are ``stop``; ``length`` as is; ``cancelled`` (by a
    ``hexgen:cancel`` from elsewhere) is passed through."""
    return "stop" if reason in ("eos", "stop") else reason


def usage(done: DoneEvent) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


class Answer:
    """Builds the JSON of one request's answer and stream chunks (one or more choices)."""

    def __init__(self, tr: Translated) -> None:
        self.tr = tr
        self.chat = tr.endpoint == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + tr.request_id
        self.created = int(time.time())
        self.tools = tr.params["tools"] if self.chat and tools_active(tr.params) else None
        self._held: dict[int, ToolStream] = {}  # choice index -> its answer held back while it may be a call

    def _head(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.tr.model,
            "system_fingerprint": None,
        }

    def full(self, choices: list[dict[str, Any]], done: DoneEvent) -> dict[str, Any]:
        out = self._head("chat.completion" if self.chat else "text_completion")
        if self.tools is not None:
            choices = [self._with_calls(c) for c in choices]
        out.update(choices=choices, usage=usage(done))
        return out

    def _with_calls(self, choice: dict[str, Any]) -> dict[str, Any]:
        """A chat choice whose answer is a tool call: ``message.tool_calls``, finish reason ``tool_calls``."""
        content, calls = parse_tool_calls(choice["message"]["content"] or "", self.tools or [])
        if not calls:
            return choice
        return {
            **choice,
            "message": {"role": "assistant", "content": content, "tool_calls": calls},
            "finish_reason": "tool_calls",
        }

    def text_chunks(self, text: str | None, index: int = 0, logprobs: dict[str, Any] | None = None) -> list[str]:
        """The chunks of one token event's text for choice ``index`` (none while a possible tool call is held
        back; held-back text goes out without logprobs)."""
        if self.tools is None:
            return [self.chunk(text, index=index, logprobs=logprobs)]
        held = self._held.setdefault(index, ToolStream(self.tools))
        content = held.feed(text or "")
        return [] if content is None else [self.chunk(content, index=index)]

    def end_chunks(self, reason: str, index: int = 0) -> list[str]:
        """Choice ``index``'s last chunks: held-back content or tool-call deltas, then its finish reason."""
        out = []
        held = self._held.pop(index, None)
        if held is not None:
            content, calls = held.finish()
            if content:
                out.append(self.chunk(content, index=index))
            out += [self.chunk(None, index=index, tool_calls=d) for d in call_deltas(calls)]
            reason = "tool_calls" if calls else reason
        return [*out, self.chunk(None, reason, index=index)]

    def chunk(
        self,
        text: str | None,
        reason: str | None = None,
        first: bool = False,
        index: int = 0,
        logprobs: dict[str, Any] | None = None,
        tool_calls: list | None = None,
    ) -> str:
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if tool_calls is not None:
                delta["tool_calls"] = tool_calls
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
            out = self._head("text_completion")
        out["choices"] = [choice]
        if self.tr.include_usage:
            out["usage"] = None
        return sse(out)

    def usage_chunk(self, done: DoneEvent) -> str:
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        out.update(choices=[], usage=usage(done))
        return sse(out)


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


DONE_LINE = "data: [DONE]\n\n"
