"""Turn sampled token ids into StepOutput events: incremental detokenization, stop strings, finishing.

Detokenization follows the prefix/read-offset scheme of text-generation-inference and vLLM. Each request
keeps ``ids`` (a few prompt tokens for context, then the completion) and two offsets: ``read_offset`` is
where the text already produced ends, ``prefix_offset`` a few tokens earlier. Every step decodes only
``ids[prefix_offset:]`` and emits what it adds beyond ``decode(ids[prefix_offset:read_offset])``. Decoding
with context on the left keeps SentencePiece leading spaces right, and a result ending in U+FFFD (an
incomplete UTF-8 character from byte tokens) is held back until the character completes. The window is a
handful of tokens whatever the output length.

Text that could still turn into a stop string is held back too (``pending``) until it either completes
one, so the output ends just before it, or stops matching. When a request resumes with ``output_ids``
already sent, the held-back state (an incomplete character, a possible stop-string start) is rebuilt from
those ids exactly as the earlier processor left it, so the two processors' texts join seamlessly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hexgen.engine.types import Request, StepOutput

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_TOKENS = 5  # tokens decoded ahead of the new ones so that context-dependent spacing is right
MAX_PARTIAL_TOKENS = 6  # a UTF-8 character spans at most 4 byte tokens; past this the U+FFFD is real
_TRIM_AT = 1024  # drop ids before prefix_offset once this many have piled up


@dataclass
class _Tracked:
    """One request's detokenizer and finishing state."""

    req: Request
    n_out: int  # completion tokens so far, resumed ones included
    ids: list[int]  # context tokens then completion tokens (empty without a tokenizer)
    n_context: int  # how many leading ids came from the prompt
    prefix_offset: int
    read_offset: int
    prefix_text: str  # decode(ids[prefix_offset:read_offset])
    pending: str = ""  # decoded, not yet sent: a tail that may begin a stop string
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied


def stop_prefix_len(text: str, stops: Iterable[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``stops``."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def find_stop(text: str, stops: Iterable[str]) -> int:
    """Index in ``text`` where the earliest occurrence of any of ``stops`` begins, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


class OutputProcessor:
    """Tracks the requests finishing on this (last) pipeline stage and builds their StepOutputs.

    ``tokenizer`` is a Hugging Face tokenizer, or None for random-weight models: then every text is ""
    and stop strings never match. A token in ``eos_token_ids`` finishes its request ("eos", its text not
    emitted) unless the request sets ``ignore_eos``; one of the request's ``stop_token_ids`` finishes it
    ("stop", its text not emitted).
    """

    def __init__(self, tokenizer: Any, eos_token_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self._tracked: dict[str, _Tracked] = {}

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._tracked

    def __len__(self) -> int:
        return len(self._tracked)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, req: Request, cached_tokens: int = 0) -> None:
        """Start tracking ``req``; its ``output_ids``, if any, were already sent to the client;
        ``cached_tokens``: prompt tokens the prefix cache supplied (reported on the final output)."""
        if req.request_id in self._tracked:
            raise ValueError(f"request_id: {req.request_id!r} is already tracked")
        n_out = len(req.output_ids)
        if self.tokenizer is None:
            self._tracked[req.request_id] = _Tracked(req, n_out, [], 0, 0, 0, "", cached_tokens=cached_tokens)
            return
        # Spare prompt tokens let the context window start on a character boundary.
        context = list(req.prompt_ids[-(CONTEXT_TOKENS + MAX_PARTIAL_TOKENS) :])
        ids = context + list(req.output_ids)
        # Back off over a resumed output's trailing incomplete character: the earlier processor held
        # those bytes back, so they are still to be sent.
        read = len(ids)
        prefix, prefix_text = self._window(ids, read)
        while (
            prefix_text.endswith(REPLACEMENT_CHAR) and read > len(context) and len(ids) - read < MAX_PARTIAL_TOKENS - 1
        ):
            read -= 1
            prefix, prefix_text = self._window(ids, read)
        if prefix_text.endswith(REPLACEMENT_CHAR):  # a prompt ending mid-character is no usable context
            prefix, prefix_text = read, ""
        t = _Tracked(req, n_out, ids, len(context), prefix, read, prefix_text, cached_tokens=cached_tokens)
        if req.params.stop and read > t.n_context:
            tail = self._generated_tail(t, max(len(s) for s in req.params.stop))
            t.pending = tail[len(tail) - stop_prefix_len(tail, req.params.stop) :]
        self._tracked[req.request_id] = t

    def _char_start(self, ids: list[int], start: int, end: int) -> int:
        """``start``, or up to a few tokens before it, where ``decode(ids[pos:end])`` starts on a whole
        character: a window that begins inside a byte-split character decodes to U+FFFD at its start
        (with SentencePiece byte fallback, its whole run of byte tokens does)."""
        pos = start
        while pos > 0 and start - pos < MAX_PARTIAL_TOKENS and self._decode(ids[pos:end]).startswith(REPLACEMENT_CHAR):
            pos -= 1
        return pos

    def _window(self, ids: list[int], read: int) -> tuple[int, str]:
        """(prefix_offset, its text) for a context window of about CONTEXT_TOKENS ending at ``read``."""
        prefix = self._char_start(ids, max(0, read - CONTEXT_TOKENS), read)
        return prefix, self._decode(ids[prefix:read])

    def _generated_tail(self, t: _Tracked, min_chars: int) -> str:
        """At least the last ``min_chars`` characters of the completion text up to ``t.read_offset``."""
        window = 16
        while True:
            start = max(t.n_context, t.read_offset - window)
            if start > t.n_context:
                start = max(t.n_context, self._char_start(t.ids, start, t.read_offset))
            base, head = self._window(t.ids, start)
            tail = self._decode(t.ids[base : t.read_offset])[len(head) :]
            if len(tail) >= min_chars or start == t.n_context:
                return tail
            window *= 4

    def _detokenize(self, t: _Tracked, flush: bool) -> str:
        """Text added by the ids past ``t.read_offset``; ``flush`` emits even an incomplete character."""
        new_text = self._decode(t.ids[t.prefix_offset :])
        unread = len(t.ids) - t.read_offset
        if (
            not flush
            and unread < MAX_PARTIAL_TOKENS
            and (new_text.endswith(REPLACEMENT_CHAR) or len(new_text) <= len(t.prefix_text))
        ):
            return ""
        delta = new_text[len(t.prefix_text) :]
        t.prefix_offset, t.read_offset = t.read_offset, len(t.ids)
        t.prefix_text = self._decode(t.ids[t.prefix_offset : t.read_offset])
        if t.prefix_offset >= _TRIM_AT:
            del t.ids[: t.prefix_offset]
            t.n_context = max(0, t.n_context - t.prefix_offset)
            t.read_offset -= t.prefix_offset
            t.prefix_offset = 0
        return delta

    def _finish_by_token(self, t: _Tracked, token_id: int) -> str | None:
        """ "eos", "stop" (a stop token id) or "length" when ``token_id`` ends the request, else None."""
        params = t.req.params
        if token_id in self.eos_token_ids and not params.ignore_eos:
            return "eos"
        if token_id in params.stop_token_ids:
            return "stop"
        if t.n_out >= params.max_new_tokens:
            return "length"
        return None

    def step(self, request_id: str, token_id: int) -> StepOutput:
        """Account for the token sampled for ``request_id``; the output is final when finish_reason is set.

        Raises KeyError for a request that is not tracked (never added, or already finished).
        """
        t = self._tracked.get(request_id)
        if t is None:
            raise KeyError(f"request {request_id!r} is not tracked by this OutputProcessor")
        params = t.req.params
        t.n_out += 1
        finish = self._finish_by_token(t, token_id)
        text = ""
        if self.tokenizer is not None:
            if finish is None or finish == "length":  # an EOS or stop token's text is not emitted
                t.ids.append(token_id)
            text = t.pending + self._detokenize(t, flush=finish is not None)
            t.pending = ""
            cut = find_stop(text, params.stop) if params.stop else -1
            if cut >= 0:
                text, finish = text[:cut], "stop"
            elif finish is None and params.stop:
                held = stop_prefix_len(text, params.stop)
                if held:
                    text, t.pending = text[: len(text) - held], text[len(text) - held :]
        if finish is not None:
            del self._tracked[request_id]
        return StepOutput(
            request_id=request_id,
            seq=t.n_out - 1,
            ids=[token_id],
            text=text,
            finish_reason=finish,
            prompt_tokens=len(t.req.prompt_ids),
            completion_tokens=t.n_out,
            meta=t.req.meta,
            cached_tokens=t.cached_tokens,
        )

    def cancel(self, request_id: str) -> StepOutput:
        """Stop tracking ``request_id`` and return its final "cancelled" output (no ids, no text).

        Raises KeyError for a request that is not tracked.
        """
        t = self._tracked.pop(request_id, None)
        if t is None:
            raise KeyError(f"request {request_id!r} is not tracked by this OutputProcessor")
        return StepOutput(
            request_id=request_id,
            seq=t.n_out,
            ids=[],
            text="",
            finish_reason="cancelled",
            prompt_tokens=len(t.req.prompt_ids),
            completion_tokens=t.n_out,
            meta=t.req.meta,
            cached_tokens=t.cached_tokens,
        )
