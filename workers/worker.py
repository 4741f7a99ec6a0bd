"""The worker: starts the TP ranks of one stage of one pipeline as local processes and keeps them running.

Each rank process (:func:`rank_main`) registers in Redis, heartbeats from a daemon thread, forms or joins
the pipeline's current generation (:mod:`hexgen.serving.registry`), then runs the engine's ``run_rank``
with a Redis source (stage-0 leader) and sink (last-stage leader).

Shutdown. SIGTERM (or Ctrl-C) on the worker parent is forwarded to its ranks as SIGTERM. A rank that gets
it sets the pipeline's ``drain`` flag, so SIGTERM to any stage drains the whole pipeline: the stage-0
source stops taking work, in-flight requests finish, every rank leaves ``run_rank``, deregisters and exits 0.
A rank still running ``drain_timeout_s`` after the signal exits with EXIT_DRAIN_TIMEOUT; its entries stay
pending and another pipeline takes them over after the lease. A second signal to the parent kills the ranks.

Watchdog and restart. After joining a generation, every rank's heartbeat thread also checks its peers
(:meth:`Registry.check_peers`): when a peer's heartbeat expires, a peer restarted (new instance token) or
the pipeline re-formed, the rank exits at once with EXIT_PEER_LOST (a collective waiting on a dead peer
could otherwise hang for the backend's timeout). When a rank exits non-zero, the parent kills its other
local ranks (their generation is broken) and, unless ``restart`` is off, starts fresh ranks after a backoff
(1 s doubling to 30 s); they register new instance tokens, so the pipeline re-forms as a new generation
once every stage's ranks are back. Past ``max_restarts`` restarts within ``restart_window_s`` the parent
gives up and exits 1. A configuration error (EXIT_CONFIG) is never retried.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial

from hexgen import __version__
from hexgen.config import EngineConfig, Layout
from hexgen.errors import ConfigError
from hexgen.logutil import setup_logging
from hexgen.serving.registry import (REDIS_ERRORS, STATE_DEGRADED, STATE_READY, STATE_STOPPED, Generation, Heartbeat,
                                     Registry, RegistryError, request_drain, set_pipeline_state)
from hexgen.serving.settings import PipelineSettings, Settings, sync_redis
from hexgen.serving.sink import RedisSink
from hexgen.serving.source import RedisSource
from hexgen.serving.worker_io import IOConfig

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
    raise ConfigError(f"--pipeline: the config has {len(settings.pipelines)} pipelines; pick one of "
                      f"{', '.join(p.id for p in settings.pipelines)}")


def build_plan(opts: WorkerOptions):
    """(ModelSpec, Layout, EngineConfig) of this worker's pipeline, validated up front."""
    from hexgen.engine.runner import ModelSpec

    m = opts.settings.model
    model = ModelSpec(preset=m.preset, random_weights=True) if m.preset else ModelSpec(model_dir=m.path)
    pipe = opts.pipeline
    layout = Layout.build(model.config(), pipe.hetero_config, pipe.pp_partition or None)
    if not 0 <= opts.stage < layout.num_stages:
        raise ConfigError(f"--stage: {opts.stage} is not a stage of pipeline {pipe.id!r} "
                          f"({layout.num_stages} stages: 0..{layout.num_stages - 1})")
    engine = EngineConfig(dtype=opts.settings.dtype, device=opts.settings.device,
                          max_model_len=m.max_model_len, **opts.engine_overrides)
    return model, layout, engine


def device_indices(opts: WorkerOptions, layout: Layout) -> list[int | None]:
    """CUDA device index of each local rank (None on CPU)."""
    stage = layout.stages()[opts.stage]
    if opts.settings.device != "cuda":
        return [None] * stage.tp
    if opts.devices:
        if len(opts.devices) != stage.tp:
            raise ConfigError(f"--devices: {len(opts.devices)} devices given but stage {opts.stage} has TP "
                              f"{stage.tp}; give one device per rank")
        return list(opts.devices)
    if opts.pipeline.devices:
        return [int(opts.pipeline.devices[r].rpartition(":")[2] or 0) for r in stage.ranks]
    return list(range(stage.tp))


@dataclass(frozen=True)
class RankArgs:
    opts: WorkerOptions
    rank: int
    device_index: int | None


def _device_info(engine: EngineConfig, device_index: int | None) -> tuple[str, int]:
    if engine.device == "cuda":
        import torch

        idx = device_index or 0
        props = torch.cuda.get_device_properties(idx)
        return f"cuda:{idx} {props.name}", int(props.total_memory)
    return "cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def open_source(cfg: IOConfig, generation: int) -> RedisSource:
    """Source factory of the stage-0 leader: the pipeline is ready once its source is up."""
    src = RedisSource(cfg)
    client = sync_redis(cfg.redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
    try:
        set_pipeline_state(client, cfg.pipeline_id, STATE_READY, generation)
    except REDIS_ERRORS as e:
        log.warning("could not mark pipeline %s ready: %s", cfg.pipeline_id, e)
    finally:
        client.close()
    log.info("pipeline %s generation %d: ready", cfg.pipeline_id, generation)
    return src


class _Rank:
    """State of one rank process: registration, heartbeat/watchdog, signal-driven drain."""

    def __init__(self, a: RankArgs) -> None:
        self.a = a
        opts = a.opts
        self.model, self.layout, self.engine = build_plan(opts)
        self.stage = self.layout.stage_of_rank(a.rank)
        s = opts.settings
        self.client = sync_redis(s.redis.url, socket_timeout=10.0, socket_connect_timeout=5.0)
        self.registry = Registry(self.client, opts.pipeline_id, world_size=self.layout.world_size,
                                 layout=self.layout.describe(), model=s.model.name,
                                 heartbeat_ttl_s=s.limits.heartbeat_ttl_s)
        device, memory = _device_info(self.engine, a.device_index)
        self.record = self.registry.new_record(a.rank, self.stage.index, a.rank - self.stage.first_rank,
                                               device=device, memory=memory, version=__version__)
        self.instance = self.record.extra["instance"]
        self.heartbeat = Heartbeat(self.registry, a.rank, self.record, s.limits.heartbeat_interval_s)
        self.stop = threading.Event()
        self.left = False

    def register(self) -> bool:
        """Register (retrying while Redis is unreachable) and start heartbeating; False if stopped first."""
        while True:
            try:
                self.registry.register(self.a.rank, self.record)
                break
            except REDIS_ERRORS as e:
                log.warning("cannot register (Redis %s unreachable: %s); retrying",
                            self.a.opts.settings.redis.display_url, e)
                if self.stop.wait(2.0):
                    return False
        self.heartbeat.start()
        return True

    def wait_for_signal(self) -> None:
        """Signal thread: SIGTERM is blocked in every other thread, so it arrives here even while the main
        thread sits in a collective (Python runs signal handlers only between bytecodes of the main thread)."""
        signum = signal.sigwait({signal.SIGTERM})
        self.stop.set()
        log.info("signal %d: draining the pipeline (deadline %.0fs)", signum, self.a.opts.drain_timeout_s)
        deadline = time.monotonic() + self.a.opts.drain_timeout_s
        while time.monotonic() < deadline:
            try:
                self.registry.request_drain()
                break
            except REDIS_ERRORS as e:
                log.warning("cannot set the drain flag (%s); retrying", e)
                time.sleep(1.0)
        time.sleep(max(0.0, deadline - time.monotonic()))
        log.error("drain deadline passed with work still in flight; exiting (its entries stay pending and "
                  "are taken over after the lease)")
        self.leave()
        os._exit(EXIT_DRAIN_TIMEOUT)

    def on_broken(self, problem: str, gen: Generation) -> None:
        log.error("peer group broken: %s; exiting so the pipeline can re-form", problem)
        try:
            set_pipeline_state(self.client, self.a.opts.pipeline_id, STATE_DEGRADED, gen.number)
        except REDIS_ERRORS:
            pass  # best effort: the head sees the missing heartbeats anyway
        self.leave()
        os._exit(EXIT_PEER_LOST)

    def leave(self) -> None:
        if self.left:
            return
        self.left = True
        self.heartbeat.unwatch()
        self.heartbeat.stop(timeout_s=1.0)
        try:
            self.registry.deregister(self.a.rank, self.instance)
        except REDIS_ERRORS as e:
            log.warning("could not deregister: %s", e)

    def join(self) -> Generation:
        opts = self.a.opts
        if self.a.rank == 0:
            return self.registry.form(self.instance, advertise_host=opts.advertise_host,
                                      redis_url=opts.settings.redis.url, timeout_s=opts.form_timeout_s,
                                      stop=self.stop)
        return self.registry.join(self.a.rank, self.instance, timeout_s=opts.form_timeout_s, stop=self.stop)

    def run(self) -> int:
        from hexgen.engine.pipeline import RankSpec, run_rank

        if not self.register():
            return EXIT_OK
        try:
            gen = self.join()
        except RegistryError as e:
            self.leave()
            if self.stop.is_set():
                return EXIT_OK
            log.error("%s", e)
            return EXIT_CONFIG
        self.heartbeat.watch(partial(self.registry.check_peers, self.a.rank, gen), partial(self.on_broken, gen=gen))
        io = IOConfig.from_settings(self.a.opts.settings, self.a.opts.pipeline_id, **self.a.opts.io_overrides)
        spec = RankSpec(self.a.rank, self.layout, self.model, self.engine, gen.rendezvous, self.a.device_index)
        run_rank(spec, partial(open_source, io, gen.number), partial(RedisSink, io))
        if self.a.rank == 0:
            try:
                self.registry.set_state(STATE_STOPPED, gen)
            except REDIS_ERRORS as e:
                log.warning("could not mark the pipeline stopped: %s", e)
        self.leave()
        log.info("drained; exiting")
        return EXIT_OK


def rank_main(a: RankArgs) -> None:
    """Entry point of one rank process (multiprocessing spawn target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which forwards SIGTERM
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # before any thread starts: all inherit it
    if a.opts.log_level:
        os.environ["HEXGEN_LOG_LEVEL"] = a.opts.log_level.upper()  # run_rank sets up logging from it
    layout_stage = "?"
    try:
        rank = _Rank(a)
        layout_stage = rank.stage.index
    except (ConfigError, *REDIS_ERRORS) as e:
        setup_logging(a.rank, layout_stage, a.opts.log_level)
        log.error("cannot start rank %d: %s", a.rank, e)
        sys.exit(EXIT_CONFIG)
    setup_logging(a.rank, layout_stage, a.opts.log_level)
    threading.Thread(target=rank.wait_for_signal, name="signals", daemon=True).start()
    try:
        code = rank.run()
    finally:  # on an engine failure too: deregister at once so peers notice before the heartbeat TTL
        rank.leave()
    sys.exit(code)


class Worker:
    """The worker parent: starts this stage's ranks, forwards signals, restarts ranks per the module doc."""

    def __init__(self, opts: WorkerOptions) -> None:
        self.opts = opts
        self.model, self.layout, self.engine = build_plan(opts)
        self.stage = self.layout.stages()[opts.stage]
        self.devices = device_indices(opts, self.layout)
        self.ctx = mp.get_context("spawn")
        self.procs: list[mp.process.BaseProcess] = []
        self.signals = 0
        self.restarts: list[float] = []

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1

    def start_ranks(self) -> None:
        self.procs = []
        for rank, dev in zip(self.stage.ranks, self.devices):
            p = self.ctx.Process(target=rank_main, args=(RankArgs(self.opts, rank, dev),),
                                 name=f"hexgen-{self.opts.pipeline_id}-rank{rank}", daemon=False)
            p.start()
            self.procs.append(p)
        log.info("pipeline %s stage %d: started ranks %s (%s)", self.opts.pipeline_id, self.stage.index,
                 self.stage.ranks, self.layout.describe())

    def kill_ranks(self, sig: int = signal.SIGKILL, grace_s: float = 5.0) -> None:
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, sig)
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()

    def _wait(self, timeout_s: float) -> None:
        mp.connection.wait([p.sentinel for p in self.procs if p.is_alive()], timeout_s)

    def _drain(self) -> int:
        """Forward SIGTERM and wait for the ranks to finish (a second signal kills them)."""
        log.info("draining pipeline %s: setting its drain flag and forwarding SIGTERM to ranks %s",
                 self.opts.pipeline_id, self.stage.ranks)
        client = sync_redis(self.opts.settings.redis.url, socket_timeout=5.0, socket_connect_timeout=5.0)
        try:
            request_drain(client, self.opts.pipeline_id)
        except REDIS_ERRORS as e:
            log.warning("could not set the drain flag (%s); the ranks will try too", e)
        finally:
            client.close()
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.opts.drain_timeout_s + 15
        while any(p.is_alive() for p in self.procs):
            if self.signals > 1 or time.monotonic() > deadline:
                log.warning("killing ranks %s", [p.pid for p in self.procs if p.is_alive()])
                self.kill_ranks()
                return EXIT_FAILED
            self._wait(0.2)
        return EXIT_OK if all(p.exitcode == 0 for p in self.procs) else EXIT_FAILED

    def _restart_delay(self) -> float | None:
        """Seconds to wait before restarting, or None when restarts are off or exhausted."""
        if not self.opts.restart:
            return None
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < self.opts.restart_window_s] + [now]
        if len(self.restarts) > self.opts.max_restarts:
            log.error("%d restarts within %.0fs; giving up", len(self.restarts) - 1, self.opts.restart_window_s)
            return None
        return min(30.0, 2.0 ** (len(self.restarts) - 1))

    def run(self) -> int:
        """Run until the pipeline drains (0), a signal drains it, or a failure that is not restarted."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start_ranks()
            while True:
                if self.signals:
                    return self._drain()
                self._wait(0.2)
                codes = [p.exitcode for p in self.procs]
                if all(c is None for c in codes):
                    continue
                if all(c == 0 for c in codes if c is not None):  # another stage drained the pipeline
                    if all(c is not None for c in codes):
                        log.info("pipeline %s drained; exiting", self.opts.pipeline_id)
                        return EXIT_OK
                    continue
                bad = next(c for c in codes if c not in (None, 0))
                log.warning("a rank exited with code %s; stopping this stage's other ranks", bad)
                self.kill_ranks()
                delay = None if bad == EXIT_CONFIG else self._restart_delay()
                if delay is None:
                    return EXIT_CONFIG if bad == EXIT_CONFIG else EXIT_FAILED
                log.info("restarting ranks %s in %.0fs", self.stage.ranks, delay)
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline and not self.signals:
                    time.sleep(0.1)
                if self.signals:
                    return EXIT_OK
                self.start_ranks()
        finally:
            if any(p.is_alive() for p in self.procs):
                self.kill_ranks()
            for s, handler in old.items():
                signal.signal(s, handler)
