"""The workers' check of a decoded work item, at the trust boundary: anyone who may XADD to the work stream
can put an item there, so a pipeline checks what the head checked before the model sees it.

:func:`decode_work_item` already rebuilt the request through :class:`~hexgen.engine.types.SamplingParams`,
which checks each sampling value's type and range (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
``seed``, ``stop``). :func:`check_work_item` adds what the engine indexes with: the request id's characters,
token ids (integers in ``[0, vocab_size)``), the prompt's length against the model's context, and the
deployment's own caps (``limits.max_new_tokens``; ``top_k`` as the head allows it). Every problem raises
:class:`~hexgen.wire.protocol.InvalidRequest` naming the field.
"""

from __future__ import annotations

import re
from typing import Any

from hexgen.engine.types import Request
from hexgen.wire import keys as C
from hexgen.wire.protocol import InvalidRequest

MAX_TOP_K = 2**31 - 1  # as the head's validation allows

_ID_RE = re.compile(C.ID_PATTERN)


def _token_ids(name: str, ids: Any, vocab_size: int, max_len: int) -> None:
    if not isinstance(ids, list):
        raise InvalidRequest(f"{name}: must be a list of token ids")
    if len(ids) > max_len:
        raise InvalidRequest(f"{name}: {len(ids)} tokens exceeds the model's context of {max_len} tokens")
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise InvalidRequest(f"{name}[{i}]: {t!r} must be an integer token id in [0, {vocab_size - 1}]")


def check_work_item(req: Request, *, vocab_size: int, max_model_len: int, max_new_tokens: int) -> None:
    """Raise InvalidRequest naming the field when ``req`` is not something the head would have queued."""
    if not isinstance(req.request_id, str) or not _ID_RE.fullmatch(req.request_id):
        raise InvalidRequest(f"request_id: {str(req.request_id)[:40]!r} is not allowed; use {C.ID_ALLOWED_CHARS}")
    if not req.prompt_ids:
        raise InvalidRequest("prompt_ids: must hold at least one token id")
    _token_ids("prompt_ids", req.prompt_ids, vocab_size, max_model_len)
    _token_ids("output_ids", req.output_ids, vocab_size, max_model_len)
    p = req.params
    if p.max_new_tokens > max_new_tokens:
        raise InvalidRequest(f"max_new_tokens: {p.max_new_tokens} is out of range; allowed: [1, {max_new_tokens}]")
    if p.top_k > MAX_TOP_K:
        raise InvalidRequest(f"top_k: {p.top_k} is out of range; allowed: [0, {MAX_TOP_K}]")
    if not isinstance(p.ignore_eos, bool):
        raise InvalidRequest(f"ignore_eos: {p.ignore_eos!r} must be true or false")
