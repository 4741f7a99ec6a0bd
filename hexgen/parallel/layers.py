"""Tensor-parallel linear layers. Each parameter carries a ``weight_loader`` that fills its shard.

Column-parallel layers split output features across the TP group (no communication); row-parallel layers
split input features and all-reduce their partial sums. The shard bounds come from ``hexgen.shards``: even,
or uneven by the stage's tp-ratio (whole KV heads with their query groups, the MLP in aligned proportion).
Every all-reduce is of the full output size, so unequal shards need no unequal collective.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hexgen.errors import LoadError
from hexgen.kernels import fp8_linear
from hexgen.kernels.gemv import Config, linear, linear_silu
from hexgen.parallel.groups import TPContext
from hexgen.shards import kv_head_bounds, mlp_bounds, q_head_bounds, split_sizes

# A loaded-slice getter: takes (dim, start, stop) and returns that slice of the checkpoint tensor.
SliceFn = Callable[[int, int, int], torch.Tensor]
FullFn = Callable[[], torch.Tensor]
# An fp8 checkpoint's weight_scale rows [start, stop) as [stop - start] fp32 (None: the checkpoint has none).
ScaleFn = Callable[[int, int], torch.Tensor]

__all__ = [
    "ColumnParallelLinear",
    "ReplicatedLinear",
    "RowParallelLinear",
    "attention_out_linear",
    "gate_up_linear",
    "qkv_linear",
    "split_sizes",
]


def _copy(param: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise LoadError(f"{what}: checkpoint slice has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
    if value.dtype == fp8_linear.FP8 and param.dtype != fp8_linear.FP8:
        raise LoadError(f"{what}: the checkpoint's weight is float8, but this layer keeps the model dtype")
    with torch.no_grad():
        param.copy_(value.to(dtype=param.dtype))


def _fill_rows(
    layer: ColumnParallelLinear | RowParallelLinear,
    rows: slice,
    value: torch.Tensor,
    get_scale: ScaleFn | None,
    start: int,
    what: str,
):
    """Weight rows ``rows`` from ``value`` (checkpoint rows from ``start``); fp8 layers also fill their scales."""
    if layer.weight_scale is None:
        _copy(layer.weight[rows], value, what)
        return
    n = value.shape[0]
    scale = None if get_scale is None else (lambda: get_scale(start, start + n))
    fp8_linear.fill(layer.weight[rows], layer.weight_scale[rows], value, scale, what)


def _matmul(layer: ColumnParallelLinear | RowParallelLinear, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """x @ layer.weight.T; fp8 weights (``weight_scale`` set) through ``hexgen.kernels.fp8_linear``."""
    if layer.weight_scale is not None:
        return fp8_linear.linear(x, layer.weight, layer.weight_scale, layer.gemv, silu)
    return (linear_silu if silu else linear)(x, layer.weight, layer.gemv)


class ReplicatedLinear(nn.Module):
    """A full linear layer on every rank (the LM head)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.gemv: Config | None = None  # batch-1 kernel configuration (hexgen.kernels.gemv.tune); None: cuBLAS

    def load(self, get_slice: SliceFn, full: FullFn) -> None:
        _copy(self.weight, full(), "replicated linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.gemv)


class ColumnParallelLinear(nn.Module):
    """Output features split into named sections, each sharded across the TP group.

    ``sections`` lists (total_out, local_out, local_start) per logical sub-matrix, e.g. q, k, v.
    """

    def __init__(self, in_features: int, sections: list[tuple[int, int, int]], tp: TPContext) -> None:
        super().__init__()
        self.tp = tp
        self.sections = sections
        local_out = sum(s[1] for s in sections)
        self.weight = nn.Parameter(torch.empty(local_out, in_features), requires_grad=False)
        self.weight_scale: nn.Parameter | None = None  # [local_out] fp32 with fp8 weights (fp8_linear.convert)
        self.gemv: Config | None = None

    def load_section(self, index: int, get_slice: SliceFn, get_scale: ScaleFn | None = None) -> None:
        offset = sum(s[1] for s in self.sections[:index])
        total, local, start = self.sections[index]
        rows = slice(offset, offset + local)
        _fill_rows(self, rows, get_slice(0, start, start + local), get_scale, start, f"section {index}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(self, x)  # [tokens, local_out]


class RowParallelLinear(nn.Module):
    """Input features sharded across the TP group; partial outputs summed with one all-reduce."""

    def __init__(self, in_start: int, in_local: int, out_features: int, tp: TPContext) -> None:
        super().__init__()
        self.tp = tp
        self.in_start = in_start
        self.weight = nn.Parameter(torch.empty(out_features, in_local), requires_grad=False)
        self.weight_scale: nn.Parameter | None = None  # [out_features] fp32 with fp8 weights, whole on every rank
        self.gemv: Config | None = None
        self.silu_input = False  # called through forward_silu (the MLP's down projection with fused kernels)

    def load(self, get_slice: SliceFn, get_scale: ScaleFn | None = None) -> None:
        n = self.weight.shape[1]
        value = get_slice(1, self.in_start, self.in_start + n)
        _fill_rows(self, slice(None), value, get_scale, 0, "row-parallel linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(_matmul(self, x))  # [tokens, out_features]

    def forward_silu(self, gu: torch.Tensor) -> torch.Tensor:
        """gu: [tokens, 2 * in_local] (gate | up) → forward(silu(gate) * up), SiLU fused (fused kernels on)."""
        return self.tp.all_reduce(_matmul(self, gu, silu=True))  # [tokens, out_features]


def qkv_linear(
    hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, tp: TPContext
) -> tuple[ColumnParallelLinear, int, int]:
    """Fused QKV projection for one TP rank: its query and KV heads (``hexgen.shards``: split evenly, KV
    heads replicated when the TP degree exceeds them, or by whole KV heads per the stage's shares). Returns
    the layer and the local query and KV head counts."""
    q0, q1 = q_head_bounds(num_heads, num_kv_heads, tp.size, tp.rank, tp.shares)
    kv0, kv1 = kv_head_bounds(num_kv_heads, tp.size, tp.rank, tp.shares)
    local_q, local_kv = q1 - q0, kv1 - kv0
    sections = [
        (num_heads * head_dim, local_q * head_dim, q0 * head_dim),
        (num_kv_heads * head_dim, local_kv * head_dim, kv0 * head_dim),
        (num_kv_heads * head_dim, local_kv * head_dim, kv0 * head_dim),
    ]
    return ColumnParallelLinear(hidden, sections, tp), local_q, local_kv


def attention_out_linear(
    num_heads: int, num_kv_heads: int, head_dim: int, hidden: int, tp: TPContext
) -> RowParallelLinear:
    """The output projection over this rank's query heads (the input columns ``qkv_linear`` gave it)."""
    q0, q1 = q_head_bounds(num_heads, num_kv_heads, tp.size, tp.rank, tp.shares)
    return RowParallelLinear(q0 * head_dim, (q1 - q0) * head_dim, hidden, tp)


def gate_up_linear(hidden: int, intermediate: int, tp: TPContext) -> tuple[ColumnParallelLinear, int, int]:
    """Fused gate/up projection; returns the layer and this rank's intermediate (start, size)."""
    start, stop = mlp_bounds(intermediate, tp.size, tp.rank, tp.shares)
    sections = [(intermediate, stop - start, start), (intermediate, stop - start, start)]
    return ColumnParallelLinear(hidden, sections, tp), start, stop - start
