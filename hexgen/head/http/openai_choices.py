"""One choice of an OpenAI answer, built from its HexGen request's token events: text, echo, logprobs.

Logprobs come from the model's raw logits (before temperature, penalties and logit bias), as the engine
computes them (:mod:`hexgen.engine.logprobs`). A token's text is its id decoded alone; ``bytes`` (chat) are
that text's UTF-8 bytes. In completions' shape ``top_logprobs`` holds the chosen token and the top
alternatives (as vLLM returns them), ``text_offset`` each token's character offset in the choice's text
(the echoed prompt included); the first prompt token has no logprob (``null``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hexgen.wire.protocol import TokenEvent, TokenLogprob


class TokenTexts:
    """Token id -> its text, decoded once (``token_id:<id>`` without a tokenizer); ``decoder`` (default: the
    same tokenizer) decodes whole texts such as an echoed token-id prompt."""

    def __init__(self, tokenizer: Any, decoder: Any = None) -> None:
        self.tokenizer = tokenizer
        self.decoder = decoder if decoder is not None else tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            if self.tokenizer is None:
                text = f"token_id:{token_id}"
            else:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if len(self._cache) < 200_000:
                self._cache[token_id] = text
        return text

    def decode(self, ids: list[int]) -> str:
        if self.decoder is None:
            return ""
        return self.decoder.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class Choice:
    """The state of one choice while its events arrive; ``delta`` shapes a stream chunk's part of it."""

    def __init__(self, index: int, chat: bool, texts: TokenTexts, logprobs: bool, echo: Any, drop: bool) -> None:
        self.index = index
        self.chat = chat
        self.texts = texts
        self.want_logprobs = logprobs
        self.echo = echo  # the prompt as given when it is echoed (str or token ids), else None
        self.drop = drop  # max_tokens 0: generated tokens are not returned
        self.text_parts: list[str] = []
        self.lp: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.content: list[dict[str, Any]] = []
        self.offset = 0
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0  # of prompt_tokens, supplied by the pipeline's prefix cache

    # ---- events ----

    def first_text(self, ev: TokenEvent | None) -> tuple[str, Any]:
        """Text and logprobs of the echoed prompt (completions with echo), from the first event."""
        if self.echo is None:
            return "", None
        text = self.echo if isinstance(self.echo, str) else self.texts.decode(list(self.echo))
        if ev is None or ev.prompt_ids is None or ev.prompt_logprobs is None or not self.want_logprobs:
            self.offset += len(text)
            return text, None
        return text, self._completion_lps(list(ev.prompt_ids), list(ev.prompt_logprobs))

    def add(self, ev: TokenEvent) -> tuple[str, Any]:
        """The text and logprobs (in this endpoint's shape, None when not asked for) ``ev`` adds."""
        if self.drop:
            return "", None
        self.text_parts.append(ev.text)
        if not self.want_logprobs or ev.logprobs is None:
            return ev.text, None
        ids, lps = list(ev.ids), list(ev.logprobs)
        if self.chat:
            entries = [self._chat_entry(t, lp) for t, lp in zip(ids, lps)]
            self.content.extend(entries)
            return ev.text, {"content": entries}
        return ev.text, self._completion_lps(ids, lps)

    # ---- shapes ----

    def _chat_entry(self, token_id: int, lp: TokenLogprob) -> dict[str, Any]:
        def one(t: int, v: float) -> dict[str, Any]:
            s = self.texts(t)
            return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}

        return {**one(token_id, lp[0]), "top_logprobs": [one(t, v) for t, v in lp[1]]}

    def _completion_lps(self, ids: list[int], lps: Sequence[TokenLogprob | None]) -> dict[str, list[Any]]:
        part: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp in zip(ids, lps):
            s = self.texts(t)
            part["tokens"].append(s)
            part["text_offset"].append(self.offset)
            self.offset += len(s)
            if lp is None:
                part["token_logprobs"].append(None)
                part["top_logprobs"].append(None)
                continue
            part["token_logprobs"].append(lp[0])
            top = {self.texts(a): v for a, v in lp[1]}
            top.setdefault(s, lp[0])
            part["top_logprobs"].append(top)
        for k, v in part.items():
            self.lp[k].extend(v)
        return part

    def whole(self, echo_text: str) -> dict[str, Any]:
        """The choice of a non-streamed answer."""
        text = echo_text + "".join(self.text_parts)
        if self.chat:
            logprobs = {"content": self.content} if self.want_logprobs else None
            return {
                "index": self.index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": self.finish_reason,
            }
        return {
            "index": self.index,
            "text": text,
            "logprobs": self.lp if self.want_logprobs else None,
            "finish_reason": self.finish_reason,
        }
