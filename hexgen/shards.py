"""How a tensor-parallel stage splits the model among its ranks: even shards, or uneven ones by share.

A stage's ``tp-ratio`` gives one positive integer share per rank (``2:1``: rank 0 holds two thirds). Shards
follow the shares dimension by dimension, each through ``*_bounds`` functions that return a rank's
[start, stop) so that anything sliced along the same dimension (weights, and per-channel scales) uses the
same bounds:

- attention by whole KV heads, each rank's count in exact proportion to its share, with the query heads
  of those KV heads' groups (``kv_head_bounds``, ``q_head_bounds``);
- the MLP's intermediate dimension in proportion, each boundary rounded to ``mlp_alignment`` columns
  (``mlp_bounds``);
- the vocabulary is not split: the embedding and the LM head are whole on the ranks that hold them.

No shares (or equal shares) is the even split: KV heads divided evenly, or replicated when the TP degree
exceeds them, and the intermediate dimension in near-equal parts (``split_sizes``).

Plain integer arithmetic, no torch: the config validation, the planner and the parallel layers all use it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

from hexgen.errors import ConfigError

Shares = tuple[int, ...]
RatiosIn = Sequence[Any] | None  # per stage: a tuple of shares, a list (TOML) or "2:1" text (flags)
MLP_ALIGN = 128  # columns: the GEMM tile width and the Triton GEMV block of the CUDA kernels
_MIN_TILES = 4  # the alignment shrinks (by powers of two) until each share unit covers this many tiles
_LISTED = 12  # valid ratios named in an error message


def is_even(shares: Sequence[int]) -> bool:
    """No shares, or every share equal: today's even split."""
    return len(set(shares)) <= 1


def format_ratio(shares: Sequence[int]) -> str:
    return ":".join(map(str, shares))


def parse_ratio(text: str, key: str = "tp-ratio") -> Shares:
    """``"2:1"`` → (2, 1); ConfigError naming ``key`` for anything that is not colon-separated integers."""
    try:
        out = tuple(int(p) for p in str(text).split(":"))
    except ValueError:
        raise ConfigError(
            f"{key}: {text!r} must be colon-separated positive integers, one share per rank (e.g. 2:1)"
        ) from None
    return out


def split_sizes(n: int, parts: int) -> list[int]:
    """Near-equal split of ``n`` into ``parts`` (the first ``n % parts`` get one more)."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _range(sizes: Sequence[int], index: int) -> tuple[int, int]:
    start = sum(sizes[:index])
    return start, start + sizes[index]


def kv_head_counts(num_kv_heads: int, shares: Sequence[int]) -> list[int] | None:
    """KV heads per rank in exact proportion to ``shares``; None when some rank's part is not whole or is 0."""
    total = sum(shares)
    if any(num_kv_heads * s % total for s in shares):
        return None
    counts = [num_kv_heads * s // total for s in shares]
    return counts if all(counts) else None


def kv_head_bounds(num_kv_heads: int, tp: int, rank: int, shares: Sequence[int] = ()) -> tuple[int, int]:
    """[start, stop) of the KV heads rank ``rank`` holds. Even split with TP > KV heads: the one replicated
    head of its group of ``tp // num_kv_heads`` ranks."""
    if is_even(shares):
        if tp <= num_kv_heads:
            local = num_kv_heads // tp
            return rank * local, (rank + 1) * local
        head = rank // (tp // num_kv_heads)
        return head, head + 1
    counts = kv_head_counts(num_kv_heads, shares)
    if counts is None:
        raise ValueError(f"tp-ratio {format_ratio(shares)} does not split {num_kv_heads} KV heads into whole heads")
    return _range(counts, rank)


def q_head_bounds(num_heads: int, num_kv_heads: int, tp: int, rank: int, shares: Sequence[int] = ()) -> tuple[int, int]:
    """[start, stop) of the query heads rank ``rank`` holds: the groups of its KV heads (uneven), or
    ``num_heads // tp`` each (even)."""
    if is_even(shares):
        local = num_heads // tp
        return rank * local, (rank + 1) * local
    group = num_heads // num_kv_heads
    start, stop = kv_head_bounds(num_kv_heads, tp, rank, shares)
    return start * group, stop * group


def mlp_alignment(intermediate: int, shares: Sequence[int]) -> int:
    """Columns every uneven MLP boundary is a multiple of: ``MLP_ALIGN``, halved while the dimension holds
    fewer than ``_MIN_TILES`` tiles per share unit (tiny models), down to 1."""
    align, units = MLP_ALIGN, sum(shares)
    while align > 1 and intermediate < align * units * _MIN_TILES:
        align //= 2
    return align


def mlp_sizes(intermediate: int, tp: int, shares: Sequence[int] = ()) -> list[int]:
    """Intermediate columns per rank: near-equal (even), or in proportion to ``shares`` with each boundary
    rounded to ``mlp_alignment`` (the last rank takes what the alignment leaves over)."""
    if is_even(shares):
        return split_sizes(intermediate, tp)
    align, total = mlp_alignment(intermediate, shares), sum(shares)
    cuts = [0]
    for c in itertools.accumulate(shares[:-1]):
        cuts.append(min(intermediate, round(intermediate * c / total / align) * align))
    cuts.append(intermediate)
    return [b - a for a, b in zip(cuts, cuts[1:])]


def mlp_bounds(intermediate: int, tp: int, rank: int, shares: Sequence[int] = ()) -> tuple[int, int]:
    """[start, stop) of the intermediate columns (gate/up rows, down columns) rank ``rank`` holds."""
    return _range(mlp_sizes(intermediate, tp, shares), rank)


def valid_ratios(num_kv_heads: int, intermediate: int, tp: int) -> list[Shares]:
    """Every uneven ratio (in lowest terms) a TP-``tp`` stage can take: one for each split of the KV heads
    into ``tp`` positive whole parts whose MLP split leaves every rank some columns."""
    if tp < 2 or tp > num_kv_heads:
        return []
    out: list[Shares] = []
    for cuts in itertools.combinations(range(1, num_kv_heads), tp - 1):
        parts = [b - a for a, b in zip((0, *cuts), (*cuts, num_kv_heads))]
        g = math.gcd(*parts)
        shares = tuple(p // g for p in parts)
        if not is_even(shares) and shares not in out and all(mlp_sizes(intermediate, tp, shares)):
            out.append(shares)
    return sorted(out, key=lambda r: [-s / sum(r) for s in r])  # rank 0's share first, largest first


def describe_valid(num_kv_heads: int, intermediate: int, tp: int) -> str:
    valid = valid_ratios(num_kv_heads, intermediate, tp)
    if not valid:
        return f"no uneven ratio for TP {tp} ({num_kv_heads} KV heads): omit tp-ratio for an even split"
    names = [format_ratio(v) for v in valid[:_LISTED]]
    more = f" and {len(valid) - _LISTED} more" if len(valid) > _LISTED else ""
    return f"valid ratios for TP {tp}: {', '.join(names)}{more}"


def check_shares(stage: int, tp: int, shares: Sequence[int]) -> None:
    """Model-free checks of one stage's shares: one positive integer per rank."""
    text = format_ratio(shares)
    if len(shares) != tp:
        raise ConfigError(
            f"stage {stage}: tp-ratio {text} gives {len(shares)} share(s) but the stage has TP {tp}; "
            f"give one share per rank (e.g. {format_ratio([1] * tp)})"
        )
    for s in shares:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ConfigError(
                f"stage {stage}: tp-ratio {text}: share {s!r} must be a positive integer (one share per rank)"
            )


def check_ratio(stage: int, tp: int, shares: Sequence[int], num_kv_heads: int, intermediate: int) -> None:
    """ConfigError naming the stage, the ratio and the valid choices unless ``shares`` split this model's
    sharded dimensions into whole, non-empty parts (query heads follow their KV heads' groups)."""
    valid = describe_valid(num_kv_heads, intermediate, tp)
    try:
        check_shares(stage, tp, shares)
    except ConfigError as e:
        raise ConfigError(f"{e}; {valid}") from None
    if is_even(shares):
        return
    text = format_ratio(shares)
    if tp > num_kv_heads:
        raise ConfigError(
            f"stage {stage}: tp-ratio {text} needs a whole KV head per rank but TP {tp} exceeds the model's "
            f"{num_kv_heads} KV heads (replicated heads are split evenly only); {valid}"
        )
    if kv_head_counts(num_kv_heads, shares) is None:
        raise ConfigError(
            f"stage {stage}: tp-ratio {text} does not split {num_kv_heads} KV heads into whole heads; {valid}"
        )
    if not all(mlp_sizes(intermediate, tp, shares)):
        align = mlp_alignment(intermediate, shares)
        raise ConfigError(
            f"stage {stage}: tp-ratio {text} leaves a rank no MLP columns ({intermediate} split in multiples of "
            f"{align}); {valid}"
        )


def normalize_ratios(
    ratios: RatiosIn, hetero: Sequence[int], dims: tuple[int, int] | None = None
) -> tuple[Shares, ...]:
    """Per-stage shares checked against the TP degrees (count, positivity) and normalized: () when every
    stage is even, else one tuple per stage with () for each even stage. ``dims`` (the model's KV heads and
    intermediate size): each stage also checked against the model (``check_ratio``)."""
    if not ratios:
        return ()
    if isinstance(ratios, str) or len(ratios) != len(hetero):
        n = 1 if isinstance(ratios, str) else len(ratios)
        raise ConfigError(
            f"tp-ratio: {n} stage(s) given but hetero-config has {len(hetero)}; give one ratio per stage, "
            f"e.g. {describe_ratios((), hetero)} (1 for a TP-1 stage)"
        )
    out: list[Shares] = []
    for i, (tp, entry) in enumerate(zip(hetero, ratios)):
        if isinstance(entry, str):
            shares = parse_ratio(entry, f"stage {i}: tp-ratio")
        elif isinstance(entry, int) and not isinstance(entry, bool):
            shares = (entry,)
        elif isinstance(entry, (list, tuple)):
            shares = tuple(entry)
        else:
            raise ConfigError(f"stage {i}: tp-ratio {entry!r} must be a list of positive integers, one per rank")
        if not shares:  # an even stage, as normalized
            out.append(())
            continue
        if dims is None:
            check_shares(i, tp, shares)
        else:
            check_ratio(i, tp, shares, *dims)
        out.append(() if is_even(shares) else shares)
    return tuple(out) if any(out) else ()


def describe_ratios(ratios: Sequence[Shares], hetero: Sequence[int]) -> str:
    """``2:1 1``: every stage's shares as ``--tp-ratio`` spells them (an even stage as 1:1...)."""
    return " ".join(
        format_ratio(r) if r else format_ratio([1] * tp) for r, tp in zip(ratios or [()] * len(hetero), hetero)
    )


def uneven_hint(tp: int, num_kv_heads: int, intermediate: int) -> str:
    """``; or uneven with --tp-ratio 2:1 ...`` when a degree the even split cannot take has uneven ratios."""
    valid = valid_ratios(num_kv_heads, intermediate, tp)
    if not valid:
        return ""
    return f"; TP {tp} runs with uneven shards: give --tp-ratio, {describe_valid(num_kv_heads, intermediate, tp)}"
