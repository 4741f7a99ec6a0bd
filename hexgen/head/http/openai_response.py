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


def usage(done: DoneEvent) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


class Answer:
    """Builds the JSON of one request's answer and stream chunks."""

    def __init__(self, tr: Translated) -> None:
        self.tr = tr
        self.chat = tr.endpoint == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + tr.request_id
        self.created = int(time.time())
        self.tools = ToolStream(tr.params["tools"]) if self.chat and tools_active(tr.params) else None

    def _head(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.tr.model,
            "system_fingerprint": None,
        }

    def full(self, text: str, done: DoneEvent) -> dict[str, Any]:
        reason = openai_finish_reason(done.finish_reason)
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.tools is not None:
                content, calls = parse_tool_calls(text, self.tools.tools)
                if calls:
                    message = {"role": "assistant", "content": content, "tool_calls": calls}
                    reason = "tool_calls"
            choice = {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": reason,
            }
            out = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            out = self._head("text_completion")
        out.update(choices=[choice], usage=usage(done))
        return out

    def text_chunks(self, text: str) -> list[str]:
        """The chunks of one token event's text (none while a possible tool call is held back)."""
        if self.tools is None:
            return [self.chunk(text)]
        content = self.tools.feed(text)
        return [] if content is None else [self.chunk(content)]

    def end_chunks(self, reason: str) -> list[str]:
        """The last chunks: held-back content or tool-call deltas, then the finish reason."""
        out = []
        if self.tools is not None:
            content, calls = self.tools.finish()
            if content:
                out.append(self.chunk(content))
            out += [self.chunk(None, tool_calls=d) for d in call_deltas(calls)]
            reason = "tool_calls" if calls else reason
        return [*out, self.chunk(None, reason)]

    def chunk(
        self, text: str | None, reason: str | None = None, first: bool = False, tool_calls: list | None = None
    ) -> str:
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if tool_calls is not None:
                delta["tool_calls"] = tool_calls
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
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
