"""A pipeline's layout: stages, their TP degrees, layer counts and shard shares, validated up front."""

from __future__ import annotations

from dataclasses import dataclass

from hexgen import shards
from hexgen.config.model import ModelConfig, valid_tp_degrees
from hexgen.errors import ConfigError


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: its TP degree, its layers [layer_start, layer_end), its global ranks."""

    index: int
    tp: int
    layer_start: int
    layer_end: int
    first_rank: int
    num_stages: int
    shares: tuple[int, ...] = ()  # per-rank tp-ratio shares (hexgen.shards); empty: even shards

    @property
    def ranks(self) -> list[int]:
        return list(range(self.first_rank, self.first_rank + self.tp))

    @property
    def leader(self) -> int:
        return self.first_rank

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start


def default_partition(num_layers: int, hetero: tuple[int, ...]) -> tuple[int, ...]:
    """Split layers in proportion to each stage's TP degree (largest remainders; every stage ≥ 1)."""
    total = sum(hetero)
    raw = [num_layers * t / total for t in hetero]
    parts = [max(1, int(r)) for r in raw]
    order = sorted(range(len(hetero)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    i = 0
    while sum(parts) < num_layers:
        parts[order[i % len(order)]] += 1
        i += 1
    while sum(parts) > num_layers:
        j = max(range(len(parts)), key=lambda k: parts[k])
        parts[j] -= 1
    return tuple(parts)


@dataclass(frozen=True)
class Layout:
    """A pipeline layout: TP degree per stage (hetero_config), layers per stage (pp_partition) and, for
    uneven tensor-parallel shards, each stage's per-rank shares (tp_ratio; ``hexgen.shards``). tp_ratio is
    kept normalized: () when every stage is even, else one tuple per stage, () for an even stage."""

    hetero_config: tuple[int, ...]
    pp_partition: tuple[int, ...]
    tp_ratio: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if not self.hetero_config:
            raise ConfigError("hetero-config: give at least one TP degree (e.g. --hetero-config 2 1)")
        for t in self.hetero_config:
            if not isinstance(t, int) or t < 1:
                raise ConfigError(f"hetero-config: TP degree {t!r} must be an integer ≥ 1")
        if len(self.pp_partition) != len(self.hetero_config):
            raise ConfigError(
                f"pp-partition: {len(self.pp_partition)} stages given but hetero-config has "
                f"{len(self.hetero_config)}; give one layer count per stage"
            )
        for n in self.pp_partition:
            if not isinstance(n, int) or n < 1:
                raise ConfigError(
                    f"pp-partition: layer count {n!r} must be an integer ≥ 1 (every stage needs at least one layer)"
                )
        object.__setattr__(self, "tp_ratio", shards.normalize_ratios(self.tp_ratio, self.hetero_config))

    @classmethod
    def build(
        cls,
        model: ModelConfig,
        hetero_config: list[int] | tuple[int, ...] | None,
        pp_partition: list[int] | tuple[int, ...] | None = None,
        tp_ratio: shards.RatiosIn = None,
    ) -> Layout:
        """Validate a layout against a model; the partition defaults to layers in proportion to TP, the
        shards to even ones."""
        hetero = tuple(int(t) for t in (hetero_config or (1,)))
        for t in hetero:
            if t < 1:
                raise ConfigError(f"hetero-config: TP degree {t} must be ≥ 1")
        ratios = shards.normalize_ratios(tp_ratio, hetero, (model.num_kv_heads, model.intermediate_size))
        if pp_partition is None:
            if len(hetero) > model.num_layers:
                raise ConfigError(
                    f"hetero-config: {len(hetero)} stages but the model has only {model.num_layers} layers"
                )
            part = default_partition(model.num_layers, hetero)
        else:
            part = tuple(int(n) for n in pp_partition)
        layout = cls(hetero, part, ratios)
        layout.check(model)
        return layout

    def check(self, model: ModelConfig) -> None:
        if sum(self.pp_partition) != model.num_layers:
            raise ConfigError(
                f"pp-partition: {' '.join(map(str, self.pp_partition))} sums to "
                f"{sum(self.pp_partition)} but the model has {model.num_layers} layers"
            )
        valid = valid_tp_degrees(model)
        for i, t in enumerate(self.hetero_config):
            shares = self.stage_shares(i)
            if shares:  # uneven: any degree up to the KV heads whose ratio splits them whole
                shards.check_ratio(i, t, shares, model.num_kv_heads, model.intermediate_size)
                continue
            if t not in valid:
                raise ConfigError(
                    f"hetero-config: TP degree {t} is not valid for this model "
                    f"({model.num_heads} query heads, {model.num_kv_heads} KV heads); "
                    f"valid degrees: {', '.join(map(str, valid))}"
                    + shards.uneven_hint(t, model.num_kv_heads, model.intermediate_size)
                )

    @property
    def world_size(self) -> int:
        return sum(self.hetero_config)

    @property
    def num_stages(self) -> int:
        return len(self.hetero_config)

    def stage_shares(self, index: int) -> tuple[int, ...]:
        """Stage ``index``'s per-rank shares; () for even shards."""
        return self.tp_ratio[index] if self.tp_ratio else ()

    def stages(self) -> list[StageSpec]:
        out, layer, rank = [], 0, 0
        for i, (tp, n) in enumerate(zip(self.hetero_config, self.pp_partition)):
            out.append(StageSpec(i, tp, layer, layer + n, rank, len(self.hetero_config), self.stage_shares(i)))
            layer += n
            rank += tp
        return out

    def stage_of_rank(self, rank: int) -> StageSpec:
        for s in self.stages():
            if s.first_rank <= rank < s.first_rank + s.tp:
                return s
        raise ConfigError(f"rank {rank} is outside world size {self.world_size}")

    def describe(self) -> str:
        text = f"hetero-config {' '.join(map(str, self.hetero_config))} / pp-partition " + " ".join(
            map(str, self.pp_partition)
        )
        return text + (
            f" / tp-ratio {shards.describe_ratios(self.tp_ratio, self.hetero_config)}" if self.tp_ratio else ""
        )


def check_devices(layout: Layout, device: str, available: int) -> None:
    """World size must fit the local devices when running on GPUs."""
    if device == "cuda" and layout.world_size > available:
        raise ConfigError(
            f"hetero-config: world size {layout.world_size} (sum of TP degrees) needs "
            f"{layout.world_size} GPUs but {available} are available"
        )
