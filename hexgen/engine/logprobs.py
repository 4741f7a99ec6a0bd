"""Log-probabilities of tokens under the model's raw logits, and the most likely alternatives.

They come from the logits the model produced, before temperature, penalties, logit bias or any filter
(vLLM's default and OpenAI's definition): ``log_softmax(logits)`` in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROW_CHUNK = 256  # prompt rows turned into vocabulary-wide logits at once (bounds the float32 temporaries)

TokenLogprob = tuple[float, list[tuple[int, float]]]  # (the token's logprob, [(alternative id, logprob)])


@dataclass
class LogprobRows:
    """Device tensors for some rows: the chosen tokens' logprobs and the top ``k`` alternatives."""

    chosen: torch.Tensor  # [rows] float32
    top_values: torch.Tensor  # [rows, k] float32, descending
    top_ids: torch.Tensor  # [rows, k] int64

    def to_host(self, ks: list[int]) -> list[TokenLogprob]:
        """Per row i, ``(chosen, the first ks[i] alternatives)`` as Python numbers (syncs the device)."""
        chosen = self.chosen.cpu().tolist()
        values = self.top_values.cpu().tolist()
        ids = self.top_ids.cpu().tolist()
        return [(c, list(zip(i[:k], v[:k]))) for c, v, i, k in zip(chosen, values, ids, ks)]


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, k: int) -> LogprobRows:
    """Logprobs of ``ids`` [n] under ``logits`` [n, vocab] and the ``k`` most likely tokens of each row."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
    chosen = logp.gather(1, ids.reshape(-1, 1).long())[:, 0]  # [n]
    top = torch.topk(logp, k, dim=-1) if k > 0 else None
    if top is None:
        empty = logp.new_zeros(logp.shape[0], 0)
        return LogprobRows(chosen, empty, empty.long())
    return LogprobRows(chosen, top.values, top.indices)


def hidden_logprobs(lm_head, hidden: torch.Tensor, targets: torch.Tensor, k: int) -> LogprobRows:
    """:func:`token_logprobs` of ``targets`` [t] under ``lm_head(hidden)`` for hidden [t, dim], computed
    ROW_CHUNK rows at a time so that at most [ROW_CHUNK, vocab] logits exist at once."""
    parts = [
        token_logprobs(lm_head(hidden[s : s + ROW_CHUNK]), targets[s : s + ROW_CHUNK], k)
        for s in range(0, hidden.shape[0], ROW_CHUNK)
    ]
    return LogprobRows(
        torch.cat([p.chosen for p in parts]),
        torch.cat([p.top_values for p in parts]),
        torch.cat([p.top_ids for p in parts]),
    )
