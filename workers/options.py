"""What one ``bin/worker`` runs: its options, the validated plan of its pipeline, and its exit codes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hexgen.config import EngineConfig, Layout
from hexgen.errors import ConfigError
from hexgen.wire.settings import PipelineSettings, Settings

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_PEER_LOST, EXIT_DRAIN_TIMEOUT = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class WorkerOptions:
    """One ``bin/worker`` invocation: which stage of which pipeline, and how to run and restart it."""

    settings: Settings
    pipeline_id: str
    stage: int
    devices: tuple[int, ...] = ()  # CUDA device index per local rank; empty: the config's or 0..tp-1
    advertise_host: str | None = None  # rendezvous host published by global rank 0 (default: automatic)
    drain_timeout_s: float = 120.0
    form_timeout_s: float = 0.0  # 0: wait for the other stages forever
    restart: bool = True
    max_restarts: int = 10
    restart_window_s: float = 600.0
    engine_overrides: dict = field(default_factory=dict, compare=False, hash=False)
    io_overrides: dict = field(default_factory=dict, compare=False, hash=False)
    log_level: str | None = None

    @property
    def pipeline(self) -> PipelineSettings:
        return self.settings.pipeline(self.pipeline_id)


def pick_pipeline(settings: Settings, pipeline_id: str | None) -> str:
    """``pipeline_id``, or the config's only pipeline; ConfigError naming the choices otherwise."""
    if pipeline_id:
        return settings.pipeline(pipeline_id).id
    if len(settings.pipelines) == 1:
        return settings.pipelines[0].id
    if not settings.pipelines:
        raise ConfigError("pipelines: the config has no [[pipelines]] table; add one with id and hetero_config")
    raise ConfigError(
        f"--pipeline: the config has {len(settings.pipelines)} pipelines; pick one of "
        f"{', '.join(p.id for p in settings.pipelines)}"
    )


def build_plan(opts: WorkerOptions):
    """(ModelSpec, Layout, EngineConfig) of this worker's pipeline, validated up front."""
    from hexgen.engine.runner import ModelSpec

    m = opts.settings.model
    model = ModelSpec(preset=m.preset, random_weights=True) if m.preset else ModelSpec(model_dir=m.path)
    pipe = opts.pipeline
    layout = Layout.build(model.config(), pipe.hetero_config, pipe.pp_partition or None)
    if not 0 <= opts.stage < layout.num_stages:
        raise ConfigError(
            f"--stage: {opts.stage} is not a stage of pipeline {pipe.id!r} "
            f"({layout.num_stages} stages: 0..{layout.num_stages - 1})"
        )
    logs = {"log_level": opts.log_level} if opts.log_level else {}
    engine = EngineConfig(
        **{
            "dtype": opts.settings.dtype,
            "device": opts.settings.device,
            "max_model_len": m.max_model_len,
            "kv_cache_dtype": opts.settings.kv_cache_dtype,
            "quantization": opts.settings.quantization,
            "kernels": opts.settings.kernels,
            **logs,
            **opts.engine_overrides,
        }
    )
    return model, layout, engine


def device_indices(opts: WorkerOptions, layout: Layout) -> list[int | None]:
    """CUDA device index of each local rank (None on CPU)."""
    stage = layout.stages()[opts.stage]
    if opts.settings.device != "cuda":
        return [None] * stage.tp
    if opts.devices:
        if len(opts.devices) != stage.tp:
            raise ConfigError(
                f"--devices: {len(opts.devices)} devices given but stage {opts.stage} has TP "
                f"{stage.tp}; give one device per rank"
            )
        return list(opts.devices)
    if opts.pipeline.devices:
        return [int(opts.pipeline.devices[r].rpartition(":")[2] or 0) for r in stage.ranks]
    return list(range(stage.tp))
