"""Uneven tensor-parallel stages for GPUs that differ: each rank's shard in proportion to its share.

A TP stage over unequal GPUs with even shards runs at its slowest rank's pace and holds what its smallest
rank's memory allows. With a tp-ratio (``hexgen.shards``) the faster or larger GPU takes more KV heads and
MLP columns. Here every valid ratio of a TP group (and the even split when the model allows the degree) is
costed rank by rank: a rank's layer time is the cost model's estimate for its own shard on its own device,
corrected by the device's calibration where one covers the even TP-1 point (measured / estimated), so the
shares follow the calibrated speeds; the stage steps at its slowest rank plus the two all-reduces; its KV
capacity is the least any rank holds. ``ideal_shares`` is the speed-proportional split the valid ratios
approximate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hexgen import shards
from hexgen.config import valid_tp_degrees
from hexgen.planner.cluster import Link
from hexgen.planner.costmodel import ACTIVATION_SLACK_BYTES, GPU_RUNTIME_BYTES, LM_HEAD_MAX_ROWS, CostModel
from hexgen.planner.devices import DeviceSpec

MEMORY_FRACTION = 0.9  # EngineConfig.gpu_memory_fraction (as hexgen.planner.replica)
MAX_TOKENS = 2048  # EngineConfig.max_num_batched_tokens


@dataclass(frozen=True)
class RankCost:
    """One rank of a stage under a ratio: its shard, memory and step times."""

    device: str
    share: int
    kv_heads: int
    weight_bytes: int
    kv_tokens: int  # what this rank alone holds at the engine's memory fraction
    decode_s: float  # one decode step of the stage's layers (no all-reduce)
    prefill_s: float


@dataclass(frozen=True)
class StageOption:
    """A TP group under one ratio (``()``: even shards)."""

    shares: tuple[int, ...]
    ranks: tuple[RankCost, ...]
    decode_s: float  # the stage's decode step: the slowest rank + two all-reduces per layer (+ LM head)
    prefill_s: float
    kv_tokens: int  # the stage's capacity: the least any rank holds

    @property
    def ratio(self) -> str:
        return shards.format_ratio(self.shares) if self.shares else "even"


def _calibrated_factor(cost: CostModel, dev: DeviceSpec, tokens: int, context: int) -> float:
    """measured / estimated layer time of ``dev`` at TP 1 where a calibration covers it, else 1."""
    measured = cost.layer_time(dev, 1, tokens, context)
    est = cost.estimate_layer_time(dev, 1, tokens, context)
    return measured / est if est > 0 else 1.0


def even_degrees(cost: CostModel) -> set[int]:
    return set(valid_tp_degrees(cost.model, 1 << 16))


def group_step_time(
    cost: CostModel,
    devs: Sequence[DeviceSpec],
    link: Link,
    shares: tuple[int, ...],
    layers: int,
    tokens: int,
    context: int,
    last: bool,
) -> float:
    """One step of a TP group over ``devs`` with ``shares``: its slowest rank's layers, the two all-reduces
    per layer, and (last stage) the LM head on the leader (rank 0)."""
    tp = len(devs)
    slowest = max(rank_layer_time(cost, d, tp, shares, r, tokens, context) for r, d in enumerate(devs))
    t = layers * (slowest + 2 * cost.allreduce_time(link, tp, tokens))
    return t + (cost.lm_head_time(devs[0], min(tokens, LM_HEAD_MAX_ROWS)) if last else 0.0)


def rank_layer_time(
    cost: CostModel, dev: DeviceSpec, tp: int, shares: tuple[int, ...], rank: int, tokens: int, context: int
) -> float:
    """One decoder layer step of rank ``rank`` on ``dev`` (calibration-corrected estimate; no all-reduce)."""
    shape = cost.rank_shape(tp, shares, rank)
    return cost.estimate_shape_time(dev, shape, tokens, context) * _calibrated_factor(cost, dev, tokens, context)


def ideal_shares(cost: CostModel, devs: Sequence[DeviceSpec], tokens: int, context: int) -> list[float]:
    """Each rank's fraction of the work if shards were continuous: in proportion to its speed (1 / its
    calibrated TP-1 layer time)."""
    speeds = [1.0 / rank_layer_time(cost, d, 1, (), 0, tokens, context) for d in devs]
    total = sum(speeds)
    return [s / total for s in speeds]


def rank_memory(
    cost: CostModel,
    dev: DeviceSpec,
    tp: int,
    shares: tuple[int, ...],
    rank: int,
    layers: int,
    first: bool,
    last: bool,
    max_seqs: int,
) -> tuple[int, int, int, int]:
    """(budget, weight bytes, weights + activation workspace, KV bytes per token) of one rank, as the
    engine sizes it (hexgen/engine/runner.py) with the rank's own shard."""
    m = cost.model
    nq, nkv, inter = cost.rank_shape(tp, shares, rank)
    weights = (
        layers * cost.shape_params((nq, nkv, inter)) * cost.dtype_bytes
        + (cost.first_extra_bytes() if first else 0)
        + (cost.last_extra_bytes() if last else 0)
    )
    act = (
        3 * MAX_TOKENS * (inter + 1) * cost.dtype_bytes
        + 4 * MAX_TOKENS * m.hidden_size * cost.dtype_bytes
        + max_seqs * m.vocab_size * 8
        + ACTIVATION_SLACK_BYTES
    )
    budget = int(dev.memory_bytes * MEMORY_FRACTION) - (0 if dev.name == "CPU" else GPU_RUNTIME_BYTES)
    return budget, weights, weights + act, layers * 2 * nkv * m.head_dim * cost.dtype_bytes


def group_kv_tokens(
    cost: CostModel,
    devs: Sequence[DeviceSpec],
    shares: tuple[int, ...],
    layers: int,
    first: bool,
    last: bool,
    max_seqs: int,
) -> int:
    """The TP group's KV capacity in tokens: the least any rank holds in its own memory."""
    out = []
    for r, dev in enumerate(devs):
        budget, _, fixed, per_token = rank_memory(cost, dev, len(devs), shares, r, layers, first, last, max_seqs)
        out.append(max(0, (budget - fixed) // per_token))
    return min(out)


def group_memory(
    cost: CostModel,
    devs: Sequence[DeviceSpec],
    shares: tuple[int, ...],
    layers: int,
    kv_tokens: int,
    first: bool,
    last: bool,
    max_seqs: int,
) -> list[int]:
    """Per-rank bytes holding ``kv_tokens`` of KV."""
    out = []
    for r, dev in enumerate(devs):
        _, _, fixed, per_token = rank_memory(cost, dev, len(devs), shares, r, layers, first, last, max_seqs)
        out.append(fixed + kv_tokens * per_token)
    return out


def stage_option(
    cost: CostModel,
    devs: Sequence[DeviceSpec],
    link: Link,
    shares: tuple[int, ...],
    layers: int,
    first: bool,
    last: bool,
    decode_tokens: int,
    decode_context: int,
    prompt: int,
    max_seqs: int,
) -> StageOption:
    """The TP group over ``devs`` (one per rank) with ``shares`` (``()``: even) for ``layers`` layers."""
    tp = len(devs)
    ranks = []
    for r, dev in enumerate(devs):
        budget, weights, fixed, per_token = rank_memory(cost, dev, tp, shares, r, layers, first, last, max_seqs)
        ranks.append(
            RankCost(
                dev.name,
                shares[r] if shares else 1,
                cost.rank_shape(tp, shares, r)[1],
                weights,
                max(0, (budget - fixed) // per_token),
                layers * rank_layer_time(cost, dev, tp, shares, r, decode_tokens, decode_context),
                layers * rank_layer_time(cost, dev, tp, shares, r, prompt, prompt),
            )
        )
    return StageOption(
        shares,
        tuple(ranks),
        group_step_time(cost, devs, link, shares, layers, decode_tokens, decode_context, last),
        group_step_time(cost, devs, link, shares, layers, prompt, prompt, last),
        min(r.kv_tokens for r in ranks),
    )


def stage_options(
    cost: CostModel,
    devs: Sequence[DeviceSpec],
    link: Link,
    layers: int,
    first: bool,
    last: bool,
    decode_tokens: int,
    decode_context: int,
    prompt: int,
    max_seqs: int,
) -> list[StageOption]:
    """The even split (when the model allows the degree) and every valid uneven ratio of this TP group."""
    m = cost.model
    tp = len(devs)
    ratios: list[tuple[int, ...]] = [()] if tp in even_degrees(cost) else []
    ratios += shards.valid_ratios(m.num_kv_heads, m.intermediate_size, tp)
    args = (layers, first, last, decode_tokens, decode_context, prompt, max_seqs)
    return [stage_option(cost, devs, link, r, *args) for r in ratios]


def best_option(options: Sequence[StageOption], min_kv_tokens: int = 1) -> StageOption | None:
    """The fastest decode step among options holding at least ``min_kv_tokens`` (ties: more KV)."""
    fit = [o for o in options if o.kv_tokens >= min_kv_tokens]
    return min(fit, key=lambda o: (o.decode_s, -o.kv_tokens)) if fit else None


def why(best: StageOption, options: Sequence[StageOption]) -> str:
    """Why ``best`` beat the even split (or why even stayed), in one sentence."""
    even = next((o for o in options if not o.shares), None)
    if even is None:
        return f"{best.ratio}: even shards cannot run this TP degree on this model"
    if not best.shares:
        return "even: no uneven ratio steps faster"
    slow_even = max(range(len(even.ranks)), key=lambda i: even.ranks[i].decode_s)
    return (
        f"{best.ratio} beats even: decode step {best.decode_s * 1e3:.2f} ms vs {even.decode_s * 1e3:.2f} ms "
        f"(even waits on rank {slow_even}, {even.ranks[slow_even].device}); KV capacity "
        f"{best.kv_tokens:,} vs {even.kv_tokens:,} tokens"
    )
