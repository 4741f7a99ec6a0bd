"""One rank process (:func:`rank_main`, started by :mod:`workers.supervisor`) registers in Redis, heartbeats from a
daemon thread, forms or joins the pipeline's current generation (:mod:`workers.registry`), then runs the engine's
``run_rank`` with a Redis source (stage-0 leader) and sink (last-stage leader).

Watchdog and restart. After joining a generation, every rank's heartbeat thread also checks its peers
(:meth:`Registry.check_peers`): when a peer's heartbeat expires, a peer restarted (new instance token) or
the pipeline re-formed, the rank exits at once with EXIT_PEER_LOST (a collective waiting on a dead peer
could otherwise hang for the backend's timeout). A rank cut off from Redis past its heartbeat TTL checks its
generation before beating again and exits the same way if its peers re-formed or restarted meanwhile
(:mod:`workers.registry`, point 4). When a rank exits non-zero, the parent kills its other
local ranks (their generation is broken) and, unless ``restart`` is off, starts fresh ranks after a backoff
(1 s doubling to 30 s); they register new instance tokens, so the pipeline re-forms as a new generation
once every stage's ranks are back. Past ``max_restarts`` restarts within ``restart_window_s`` the parent
gives up and exits 1. A configuration error (EXIT_CONFIG) is never retried.

"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial

from hexgen import __version__
from hexgen.config import EngineConfig
from hexgen.engine.threads import CpuThreads
from hexgen.errors import ConfigError
from hexgen.logutil import setup_logging
from hexgen.wire import trace
from hexgen.wire.connection import REDIS_ERRORS, connect
from hexgen.wire.settings import sync_redis
from workers.host_threads import HostRankWatch, count_host_ranks
from workers.intake import RedisSource
from workers.io_config import IOConfig
from workers.metrics import RankFigures
from workers.options import (
    EXIT_CONFIG,
    EXIT_DRAIN_TIMEOUT,
    EXIT_OK,
    EXIT_PEER_LOST,
    WorkerOptions,
    build_plan,
)
from workers.registry import (
    STATE_DEGRADED,
    STATE_READY,
    STATE_STOPPED,
    Generation,
    Heartbeat,
    Registry,
    RegistryError,
    routable_address,
    set_pipeline_state,
)
from workers.sink import RedisSink

log = logging.getLogger(__name__)


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
    src = RedisSource(cfg).start()
    client = sync_redis(cfg.redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
    try:
        set_pipeline_state(client, cfg.pipeline_id, STATE_READY, generation)
    except REDIS_ERRORS as e:
        log.warning("could not mark pipeline %s ready: %s", cfg.pipeline_id, e)
    finally:
        client.close()
    log.info("pipeline %s generation %d: ready", cfg.pipeline_id, generation)
    return src


def open_sink(cfg: IOConfig) -> RedisSink:
    """Sink factory of the last-stage leader."""
    return RedisSink(cfg).start()


class _Rank:
    """State of one rank process: registration, heartbeat/watchdog, signal-driven drain."""

    def __init__(self, a: RankArgs) -> None:
        self.a = a
        opts = a.opts
        self.model, self.layout, self.engine = build_plan(opts)
        self.stage = self.layout.stage_of_rank(a.rank)
        s = opts.settings
        self.client = sync_redis(s.redis.url, socket_timeout=10.0, socket_connect_timeout=5.0)
        self.registry = Registry(
            self.client,
            opts.pipeline_id,
            world_size=self.layout.world_size,
            layout=self.layout.describe(),
            model=s.model.name,
            heartbeat_ttl_s=s.limits.heartbeat_ttl_s,
        )
        device, memory = _device_info(self.engine, a.device_index)
        self.record = self.registry.new_record(
            a.rank,
            self.stage.index,
            a.rank - self.stage.first_rank,
            device=device,
            memory=memory,
            version=__version__,
            address=routable_address(s.redis.url),
        )
        self.instance = self.record.extra["instance"]
        self.heartbeat = Heartbeat(self.registry, a.rank, self.record, s.limits.heartbeat_interval_s)
        self.stop = threading.Event()
        self.left = False
        self.host_watch: HostRankWatch | None = None

    def register(self) -> bool:
        """Register (retrying while Redis is unreachable) and start heartbeating; False if stopped first."""
        while True:
            try:
                self.registry.register(self.a.rank, self.record)
                break
            except REDIS_ERRORS as e:
                log.warning(
                    "cannot register (Redis %s unreachable: %s); retrying", self.a.opts.settings.redis.display_url, e
                )
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
        log.error(
            "drain deadline passed with work still in flight; exiting (its entries stay pending and "
            "are taken over after the lease)"
        )
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

    def cpu_threads(self) -> CpuThreads | None:
        """CPU ranks: threads sized by every CPU rank registered on this host (``workers.host_threads``),
        recounted while the rank runs; or ``--threads``. None on GPUs."""
        if self.engine.device != "cpu":
            return None
        own = self.stage.tp  # this worker's ranks, registered before the pipeline formed
        threads = CpuThreads(self.engine.cpu_threads, own)
        if threads.fixed:
            return threads
        try:
            threads.set_ranks_on_host(max(own, count_host_ranks(self.client, self.record.host)))
        except REDIS_ERRORS as e:
            log.warning("cannot count this host's ranks (%s); assuming %d", e, own)
        self.host_watch = HostRankWatch(
            self.client, self.record.host, threads, self.a.opts.settings.limits.heartbeat_interval_s, at_least=own
        )
        self.host_watch.start()
        return threads

    def join(self) -> Generation:
        opts = self.a.opts
        if self.a.rank == 0:
            return self.registry.form(
                self.instance,
                advertise_host=opts.advertise_host,
                redis_url=opts.settings.redis.url,
                timeout_s=opts.form_timeout_s,
                stop=self.stop,
            )
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
        self.heartbeat.watch(
            partial(self.registry.check_peers, self.a.rank, gen),
            partial(self.on_broken, gen=gen),
            rejoin=partial(self.registry.check_peers, self.a.rank, gen, after_lapse=True),
        )
        mc = self.model.config()
        io = IOConfig.from_settings(
            self.a.opts.settings,
            self.a.opts.pipeline_id,
            vocab_size=mc.vocab_size,
            max_model_len=self.engine.max_model_len or mc.max_position_embeddings,
            **self.a.opts.io_overrides,
        )
        threads = self.cpu_threads()
        spec = RankSpec(
            self.a.rank, self.layout, self.model, self.engine, gen.rendezvous, self.a.device_index, cpu_threads=threads
        )
        s = self.a.opts.settings
        figures = RankFigures(
            partial(open_source, io, gen.number),
            partial(open_sink, io),
            leader=self.a.rank == self.stage.leader,
            pipeline_id=self.a.opts.pipeline_id,
            stage=self.stage.index,
            model=s.model.name,
            interval_s=s.limits.heartbeat_interval_s,
            client_factory=partial(connect, s.redis.url),
        )
        figures.start()
        try:
            run_rank(spec, figures.source_factory, figures.sink_factory, gauges=figures.gauges)
        finally:
            figures.stop()
            if self.host_watch is not None:
                self.host_watch.stop()
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
    trace.configure(a.opts.settings.trace_timing)
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
