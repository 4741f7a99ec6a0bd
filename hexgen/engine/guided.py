"""Guided decoding on the last stage: one llguidance grammar matcher per constrained request, a token bitmask
per step filled on the host, applied to the logits on the device before sampling.

A request is constrained when its ``SamplingParams.grammar`` is set: an llguidance grammar (the JSON form of
its ``TopLevelGrammar``, built and validated by the head, :mod:`hexgen.head.structured`). Matchers are built
from a per-grammar template, compiled once and cached by the grammar's hash, and copied per request.

Per step (``LastStage.sample``): the rows of constrained requests get their allowed-token bitmask, filled by
llguidance's thread pool (it releases the GIL) while the device still runs the step's forward pass, copied
to the device and applied to those rows' logits (disallowed tokens -> -inf). Each sampled token advances its
request's matcher (``advance``, idempotent by token index, so the asynchronous steps of a one-stage pipeline
can catch a matcher up on the step before while the next step is already in flight). A request resumed
after failover or preemption carries the tokens it already produced (``Request.output_ids``): its new
matcher consumes them before its first mask, so it continues exactly where the old one stopped.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

BITS = 32  # tokens per int32 word of a bitmask row
TEMPLATE_CACHE = 64  # compiled grammars kept per last stage (least recently used dropped)


def bitmask_words(vocab: int) -> int:
    """int32 words per bitmask row for ``vocab`` tokens."""
    return (vocab + BITS - 1) // BITS


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` with every token whose bit is 0 set to -inf (a new tensor; the input is untouched).

    logits [n, vocab] float, any device; bitmask [n, words] int32 on the same device, bit ``j % 32`` of word
    ``j // 32`` set when token j is allowed. Tokens beyond ``32 * words`` are disallowed.
    """
    n, vocab = logits.shape
    shifts = torch.arange(BITS, device=bitmask.device, dtype=torch.int32)  # [32]
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(n, -1)  # [n, 32 * words]
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    return logits.masked_fill(~allowed[:, :vocab], float("-inf"))  # [n, vocab]


def grammar_key(grammar: str) -> str:
    return hashlib.sha256(grammar.encode("utf-8")).hexdigest()


@dataclass
class _Guide:
    matcher: Any  # llguidance.LLMatcher
    consumed: int  # completion tokens the matcher has consumed (the index of the next one)
    failed: bool = False  # a token the grammar refused (logged once; the request then runs unconstrained)


class GuidedDecoding:
    """The matchers of one last stage's constrained requests, keyed by sequence id."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.vocab_size = vocab_size
        self.words = bitmask_words(vocab_size)
        self._guides: dict[int, _Guide] = {}
        self._templates: OrderedDict[str, Any] = OrderedDict()
        self._llt: Future | None = None
        self._executor: Any = None
        if tokenizer is not None:  # the llguidance tokenizer takes a moment: built in the background
            pool = ThreadPoolExecutor(1, thread_name_prefix="guided-tokenizer")
            self._llt = pool.submit(_llg_tokenizer, tokenizer, vocab_size, list(eos_token_ids))
            pool.shutdown(wait=False)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._guides

    def __len__(self) -> int:
        return len(self._guides)

    def _matcher(self, grammar: str) -> Any:
        import llguidance

        key = grammar_key(grammar)
        template = self._templates.get(key)
        if template is None:
            if self._llt is None:
                raise ValueError("guided decoding needs the model's tokenizer; this model directory has none")
            template = llguidance.LLMatcher(self._llt.result(), grammar, log_level=1)
            if template.is_error():
                raise ValueError(f"grammar does not compile: {template.get_error()}")
            self._templates[key] = template
            while len(self._templates) > TEMPLATE_CACHE:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(key)
        return template.deep_copy()

    def add(self, seq_id: int, request_id: str, grammar: str, output_ids: list[int]) -> None:
        """Start guiding ``seq_id``; ``output_ids`` (a resumed request's tokens so far) are consumed first."""
        try:
            matcher = self._matcher(grammar)
        except ValueError as e:  # the head validated the grammar: only a head/engine mismatch gets here
            log.error("request %s: guided decoding is off for it: %s", request_id, e)
            return
        guide = _Guide(matcher, 0)
        self._guides[seq_id] = guide
        for i, tok in enumerate(output_ids):
            self.advance(seq_id, i, tok)

    def remove(self, seq_id: int) -> None:
        self._guides.pop(seq_id, None)

    def consumed(self, seq_id: int) -> int:
        return self._guides[seq_id].consumed

    def advance(self, seq_id: int, index: int, token: int) -> None:
        """The request's completion token number ``index`` is ``token``; consumed once, in order."""
        guide = self._guides.get(seq_id)
        if guide is None or index != guide.consumed:
            return
        guide.consumed += 1
        if guide.failed:
            return
        if not guide.matcher.consume_token(token):
            guide.failed = True
            log.error(
                "sequence %d: token %d at index %d is outside its grammar (%s); the rest is unconstrained",
                seq_id,
                token,
                index,
                guide.matcher.get_error(),
            )

    def fill(self, seq_ids: list[int | None]) -> torch.Tensor:
        """The bitmask [len(seq_ids), words] int32 on the host for these rows (None, an unguided or a failed
        sequence: every token allowed; a finished grammar allows the end-of-sequence tokens only). Filled by
        llguidance's threads, without the GIL."""
        mask = torch.full((len(seq_ids), self.words), -1, dtype=torch.int32)  # [rows, words]
        work = []
        for row, sid in enumerate(seq_ids):
            guide = self._guides.get(sid) if sid is not None else None
            if guide is not None and not guide.failed:
                work.append((guide.matcher, row))
        if work:
            if self._executor is None:
                import llguidance

                self._executor = llguidance.LLExecutor()
            # llguidance.torch.fill_next_token_bitmask_par's call, without importing that module (it compiles
            # a torch kernel at import): each matcher writes its row of ``mask``.
            self._executor.unsafe_compute_mask_ptr(work, mask.data_ptr(), self.words * 4, len(seq_ids))
        return mask


def _llg_tokenizer(tokenizer: Any, vocab_size: int, eos: list[int]) -> Any:
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos or None)
