"""OpenAI response bodies: the JSON of a whole answer and the server-sent-event chunks of a streamed one."""

from __future__ import annotations

import json
import time
from typing import Any

from hexgen.head.http.openai_request import Translated
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
        out.update(choices=choices, usage=usage(done))
        return out

    def chunk(
        self,
        text: str | None,
        reason: str | None = None,
        first: bool = False,
        index: int = 0,
        logprobs: dict[str, Any] | None = None,
    ) -> str:
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
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
