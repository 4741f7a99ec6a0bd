"""The planner's value types: workload, SLO, and the plan (replicas of stages of TP groups).

``hexgen.planner.search`` re-exports everything here; import from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hexgen.errors import ConfigError, HexGenError
from hexgen.planner.cluster import Gpu


class PlannerError(HexGenError):
    """No layout of the cluster can serve the model (nothing fits in memory, or nothing meets the SLO)."""


def _positive_int(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: {value!r} must be an integer ≥ 1")


def _non_negative(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ConfigError(f"{key}: {value!r} must be a finite number ≥ 0")


@dataclass(frozen=True)
class Workload:
    """Mean request shape the plan is made for."""

    prompt_len: int = 512  # mean prompt tokens
    output_len: int = 128  # mean output tokens
    max_batch: int = 256  # requests in flight per replica at most: the workers' --max-num-seqs

    def __post_init__(self) -> None:
        _positive_int("workload.prompt_len", self.prompt_len)
        _positive_int("workload.output_len", self.output_len)
        _positive_int("workload.max_batch", self.max_batch)

    @property
    def seq_len(self) -> int:
        """KV positions one request holds when it finishes."""
        return self.prompt_len + self.output_len


@dataclass(frozen=True)
class Slo:
    """Service objective. ``latency_s``: end-to-end latency bound per request (0: no bound).

    ``rate`` 0 (default): maximise the request rate that meets ``latency_s``. ``rate`` > 0: serve that many
    requests/s with the lowest predicted latency (still within ``latency_s`` when it is set).
    """

    latency_s: float = 30.0
    rate: float = 0.0

    def __post_init__(self) -> None:
        _non_negative("slo.latency_s", self.latency_s)
        _non_negative("slo.rate", self.rate)


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage: a TP group (one node, one device type) and its contiguous layers."""

    gpus: tuple[Gpu, ...]  # TP group, all on one node and one device type
    layers: int
    layer_start: int
    memory_bytes: int  # predicted per-GPU use: weights + activations + KV for the replica's max_batch
    kv_tokens: int  # KV capacity of the stage (tokens) at the engine's memory fraction
    # an uneven TP group (hexgen/planner/uneven.py): its tp-ratio, and per rank the predicted bytes (as
    # memory_bytes) and decode step seconds at the replica's max_batch; () for even shards
    tp_ratio: tuple[int, ...] = ()
    rank_memory_bytes: tuple[int, ...] = ()
    rank_step_s: tuple[float, ...] = ()

    @property
    def tp(self) -> int:
        return len(self.gpus)

    @property
    def node(self) -> str:
        return self.gpus[0].node

    @property
    def device_name(self) -> str:
        return self.gpus[0].device.name

    @property
    def layer_end(self) -> int:
        return self.layer_start + self.layers


@dataclass(frozen=True)
class ReplicaPlan:
    """One pipeline (model replica) and its predicted operating point under the SLO."""

    stages: tuple[StagePlan, ...]
    max_batch: int  # requests in flight the SLO and KV allow
    rate: float  # requests/s it sustains under the SLO
    latency_s: float  # predicted end-to-end latency of one request at that load
    decode_step_s: float  # predicted bottleneck stage time per decode step

    @property
    def hetero_config(self) -> tuple[int, ...]:
        return tuple(s.tp for s in self.stages)

    @property
    def tp_ratio(self) -> tuple[tuple[int, ...], ...]:
        """Each stage's shares, () when every stage is even (``hexgen.config.Layout.tp_ratio``)."""
        ratios = tuple(s.tp_ratio for s in self.stages)
        return ratios if any(ratios) else ()

    @property
    def pp_partition(self) -> tuple[int, ...]:
        return tuple(s.layers for s in self.stages)

    @property
    def num_gpus(self) -> int:
        return sum(s.tp for s in self.stages)


@dataclass(frozen=True)
class Plan:
    """A deployment: replicas, the GPUs left unused, the total predicted rate and how long the search took."""

    replicas: tuple[ReplicaPlan, ...]
    unused: tuple[Gpu, ...]
    rate: float  # sum of replica rates
    search_s: float
    latency_s: float = 0.0  # request-weighted mean latency at the planned load (slo.rate when set)
    name: str = "planned"  # what produced it: "planned", or the symmetric family ("pure PP", "TP 2 x PP 4")
    notes: tuple[str, ...] = ()  # why this plan won where that needs saying (an uneven TP stage)

    @property
    def num_gpus(self) -> int:
        return sum(r.num_gpus for r in self.replicas)
