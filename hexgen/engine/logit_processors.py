"""Per-request changes to a batch of logits before sampling: penalties, logit bias, min_tokens.

Each processor works on the whole batch at once with tensors built from the rows that use it (a scatter of
the rows' token ids or (row, token) pairs), never with a Python loop over the vocabulary. They run in this
order, as vLLM applies them:

1. ``repetition_penalty`` r over the prompt and the generated tokens: a seen token's logit ``x`` becomes
   ``x / r`` when positive, ``x * r`` when not (CTRL's penalty).
2. ``frequency_penalty`` f and ``presence_penalty`` p over the generated tokens (OpenAI's definition):
   ``x - f * count - p * (count > 0)``.
3. ``logit_bias``: the bias is added to the token's logit (ids outside the vocabulary are ignored).
4. ``min_tokens``: until a request has that many completion tokens, its EOS ids and ``stop_token_ids`` are
   set to -inf (unless it ignores EOS, which then only masks ``stop_token_ids``).

A per-row allowed-token mask (structured outputs) slots in as one more step of :func:`process_logits`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from hexgen.engine.types import SamplingParams
from hexgen.kernels.staging import upload


@dataclass
class History:
    """The tokens the penalties count for the rows that need them.

    ``rows`` index the batch; ``prompt[j]`` and ``output[j]`` are row ``rows[j]``'s prompt ids and the
    completion ids known on the host. ``pending`` adds the tokens of a step still in flight on the device:
    ``(ids [k] int64 on the device, positions in ids, indices j)`` — one more generated token for each j.
    """

    rows: list[int]
    prompt: list[Sequence[int]]
    output: list[Sequence[int]]
    pending: tuple[torch.Tensor, list[int], list[int]] | None = None


def _padded(lists: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    """``lists`` as an int64 tensor [len(lists), longest] padded with ``pad`` (at least one column)."""
    width = max(1, max((len(x) for x in lists), default=0))
    host = torch.tensor([list(x) + [pad] * (width - len(x)) for x in lists], dtype=torch.int64)
    return upload(host, torch.int64, device)


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams], history: History) -> None:
    """Repetition, frequency and presence penalties on ``logits`` [n, vocab] float32, in place."""
    if not history.rows:
        return
    device, vocab = logits.device, logits.shape[-1]
    m = len(history.rows)
    rows = upload(history.rows, torch.int64, device)  # [m]
    out = _padded(history.output, vocab, device)  # [m, L_out]; vocab = padding, a column dropped below
    counts = torch.zeros(m, vocab + 1, device=device).scatter_add_(1, out, torch.ones_like(out, dtype=torch.float32))
    counts = counts[:, :vocab]  # [m, vocab] occurrences among the generated tokens
    if history.pending is not None:
        ids, src, dst = history.pending
        at = upload(src, torch.int64, device)  # [k]
        where = (upload(dst, torch.int64, device), ids.index_select(0, at))
        counts.index_put_(where, torch.ones(len(src), device=device), accumulate=True)
    prompt = _padded(history.prompt, vocab, device)  # [m, L_prompt]
    in_prompt = torch.zeros(m, vocab + 1, dtype=torch.bool, device=device).scatter_(1, prompt, True)[:, :vocab]
    picked = [params[i] for i in history.rows]
    rep = upload([float(p.repetition_penalty) for p in picked], torch.float32, device)[:, None]  # [m, 1]
    freq = upload([float(p.frequency_penalty) for p in picked], torch.float32, device)[:, None]  # [m, 1]
    pres = upload([float(p.presence_penalty) for p in picked], torch.float32, device)[:, None]  # [m, 1]
    x = logits.index_select(0, rows)  # [m, vocab]
    generated = counts > 0  # [m, vocab]
    x = torch.where(generated | in_prompt, torch.where(x > 0, x / rep, x * rep), x)
    x = x - freq * counts - pres * generated.float()
    logits.index_copy_(0, rows, x)


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """Add each row's ``logit_bias`` to ``logits`` [n, vocab] in place (ids ≥ vocab are ignored)."""
    vocab = logits.shape[-1]
    rows, toks, vals = [], [], []
    for i, p in enumerate(params):
        for t, b in p.logit_bias:
            if t < vocab:
                rows.append(i)
                toks.append(t)
                vals.append(b)
    if not rows:
        return
    d = logits.device
    logits.index_put_(
        (upload(rows, torch.int64, d), upload(toks, torch.int64, d)), upload(vals, torch.float32, d), accumulate=True
    )


def apply_min_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int], eos_ids: Collection[int]
) -> None:
    """Mask EOS and ``stop_token_ids`` to -inf in ``logits`` [n, vocab] for rows short of ``min_tokens``."""
    vocab = logits.shape[-1]
    rows, toks = [], []
    for i, (p, step) in enumerate(zip(params, steps)):
        if step >= p.min_tokens:
            continue
        banned = set(p.stop_token_ids) if p.ignore_eos else set(p.stop_token_ids) | set(eos_ids)
        for t in sorted(banned):
            if t < vocab:
                rows.append(i)
                toks.append(t)
    if not rows:
        return
    d = logits.device
    where = (upload(rows, torch.int64, d), upload(toks, torch.int64, d))
    logits.index_put_(where, torch.tensor(float("-inf"), device=d))


def needs_processing(params: Sequence[SamplingParams], steps: Sequence[int]) -> bool:
    """Whether any row's logits change before sampling (cheap host check)."""
    return any(p.penalized or p.logit_bias or step < p.min_tokens for p, step in zip(params, steps))


def process_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    steps: Sequence[int],
    history: History | None = None,
    eos_ids: Collection[int] = (),
) -> torch.Tensor:
    """The logits the sampler draws from: ``logits`` [n, vocab] (float32, changed in place) after every
    row's penalties, logit bias and min_tokens mask; returned for chaining."""
    if history is not None:
        apply_penalties(logits, params, history)
    apply_logit_bias(logits, params)
    apply_min_tokens(logits, params, steps, eos_ids)
    return logits
