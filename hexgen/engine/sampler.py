"""Token sampling: greedy, temperature, top-k and top-p (nucleus), reproducible per (seed, step).

Every sampled row draws exactly one uniform number ``u`` and picks the token by inverse CDF over the
filtered distribution, sorted by descending probability (ties: lower token id first). For a seeded request
``u`` is a SplitMix64 hash of ``(seed, step)`` computed with Python integers, so the token depends only on
the seed, the step and the logits: not on the batch, the device, the torch version or any RNG state, and a
request resumed on another machine continues the same stream. Unseeded rows take ``u`` from ``os.urandom``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from hexgen.engine.types import SamplingParams
from hexgen.kernels.staging import upload

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_INV_2_53 = 1.0 / (1 << 53)


def _splitmix64(x: int) -> int:
    """SplitMix64 finalizer (Steele et al.): a bijective, well-mixing hash of a 64-bit integer."""
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded_uniform(seed: int, step: int) -> float:
    """The uniform draw in [0, 1) used for token ``step`` of a request with ``seed`` (53 random bits)."""
    return (_splitmix64(_splitmix64(seed) ^ (step & _MASK64)) >> 11) * _INV_2_53


def _uniforms(params: Sequence[SamplingParams], steps: Sequence[int]) -> list[float]:
    """One uniform in [0, 1) per row: hashed from (seed, step) when seeded, else from the OS entropy pool."""
    fresh = os.urandom(8 * len(params))
    out = []
    for i, (p, step) in enumerate(zip(params, steps)):
        if p.seed is not None:
            out.append(seeded_uniform(p.seed, step))
        else:
            out.append((int.from_bytes(fresh[8 * i : 8 * i + 8], "little") >> 11) * _INV_2_53)
    return out


def _filter_sorted(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply temperature, top-k and top-p to each row, in descending-probability order.

    logits [n, vocab] float32; temperature [n] (> 0); top_k [n] int64 (0 = off); top_p [n] in (0, 1].
    Returns (probs [n, vocab]: softmax after temperature and top-k; cdf [n, vocab]: its running sum;
    order [n, vocab]: the token id at each sorted position; n_keep [n] ≥ 1: the kept prefix after top-p).
    The sampled distribution is ``probs[:, :n_keep] / cdf[:, n_keep - 1]``.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # [n, vocab] x2
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))  # [n]
    rank = torch.arange(vocab, device=logits.device)  # [vocab]
    scaled = (sorted_logits / temperature[:, None]).masked_fill_(rank[None, :] >= k[:, None], float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [n, vocab]
    cdf = torch.cumsum(probs, dim=-1)  # [n, vocab]
    # top_p = 1 disables the nucleus cut outright so rounding in the cumsum can never drop the tail.
    threshold = torch.where(top_p < 1, top_p, torch.full_like(top_p, float("inf")))  # [n]
    in_nucleus = ((cdf - probs) < threshold[:, None]).sum(dim=-1)  # [n]: mass before the position < top_p
    n_keep = torch.minimum(in_nucleus, k).clamp_(min=1)  # [n]
    return probs, cdf, order, n_keep


def _as_tensors(
    params: Sequence[SamplingParams], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(temperature [n] float32, top_k [n] int64, top_p [n] float32) on ``device``."""
    temperature = upload([float(p.temperature) for p in params], torch.float32, device)
    top_k = upload([p.top_k for p in params], torch.int64, device)
    top_p = upload([float(p.top_p) for p in params], torch.float32, device)
    return temperature, top_k, top_p


def filter_probs(logits_row: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution ``sample`` draws from for one row: float32 probabilities [vocab] in token order.

    temperature 0 gives a one-hot on the argmax. Otherwise logits are divided by the temperature, all but
    the ``top_k`` highest are dropped (0 = off), then all but the smallest set of most probable tokens whose
    cumulative probability reaches ``top_p`` (the top token is always kept), and the rest is renormalized.
    """
    row = logits_row.reshape(1, -1).float()  # [1, vocab]
    if temperature == 0:
        return torch.zeros_like(row[0]).scatter_(0, row[0].argmax().reshape(1), 1.0)
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)]
    probs, cdf, order, n_keep = _filter_sorted(row, *_as_tensors(params, row.device))  # [1, vocab] x3, [1]
    kept = probs[0, : int(n_keep[0])] / cdf[0, int(n_keep[0]) - 1]  # [n_keep]
    return torch.zeros_like(row[0]).scatter_(0, order[0, : kept.shape[0]], kept)  # [vocab]


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int]) -> torch.Tensor:
    """Pick one token per row: int64 ids [batch] on the logits' device.

    logits [batch, vocab] of any float dtype; ``params[i]`` and ``steps[i]`` (index of the token being
    generated among the request's completion tokens, 0 for the first) belong to row i. Rows with
    temperature 0 take the argmax (lowest id on ties); the others sample from ``filter_probs``'s
    distribution, deterministically in (seed, step, logits) when the request has a seed.
    """
    if len(params) != logits.shape[0] or len(steps) != logits.shape[0]:
        raise ValueError(f"sample: {logits.shape[0]} logit rows but {len(params)} params and {len(steps)} steps")
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return logits.argmax(dim=-1)  # [batch]
    device = logits.device
    picked = [params[i] for i in rows]
    if len(rows) == logits.shape[0]:
        sub = logits.float()  # [n, vocab]
    else:
        sub = logits[upload(rows, torch.long, device)].float()  # [n, vocab]
    _, cdf, order, n_keep = _filter_sorted(sub, *_as_tensors(picked, device))  # [n, vocab] x3, [n]
    u = upload(_uniforms(picked, [steps[i] for i in rows]), torch.float32, device)  # [n]
    kept_mass = cdf.gather(1, (n_keep - 1)[:, None])  # [n, 1]
    # Inverse CDF: the first position whose cumulative mass exceeds u * kept mass. A zero-mass position
    # never qualifies before the kept prefix ends; rounding past its end is clamped back.
    pos = torch.searchsorted(cdf, u[:, None] * kept_mass, right=True)[:, 0]  # [n]
    pos = torch.minimum(pos, n_keep - 1)
    sampled = order.gather(1, pos[:, None])[:, 0]  # [n]
    if len(rows) == logits.shape[0]:
        return sampled
    return logits.argmax(dim=-1).index_copy_(0, upload(rows, torch.long, device), sampled)  # [batch]
