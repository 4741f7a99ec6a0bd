"""The worker: starts the TP ranks of one stage of one pipeline as local processes and keeps them running.

Shutdown. SIGTERM (or Ctrl-C) on the worker parent is forwarded to its ranks as SIGTERM. A rank that gets
it sets the pipeline's ``drain`` flag, so SIGTERM to any stage drains the whole pipeline: the stage-0
source stops taking work, in-flight requests finish, every rank leaves ``run_rank``, deregisters and exits 0.
A rank still running ``drain_timeout_s`` after the signal exits with EXIT_DRAIN_TIMEOUT; its entries stay
pending and another pipeline takes them over after the lease. A second signal to the parent kills the ranks.

Restart. When a rank exits non-zero, the parent kills its other local ranks (their generation is broken) and, unless
``restart`` is off, starts fresh ranks after a backoff (1 s doubling to 30 s); they register new instance tokens, so
the pipeline re-forms as a new generation once every stage's ranks are back. Past ``max_restarts`` restarts within
``restart_window_s`` the parent gives up and exits 1. A configuration error (EXIT_CONFIG) is never retried.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import time

from hexgen.wire.connection import REDIS_ERRORS
from hexgen.wire.settings import sync_redis
from workers.options import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    WorkerOptions,
    build_plan,
    device_indices,
)
from workers.rank import RankArgs, rank_main
from workers.registry import request_drain

log = logging.getLogger(__name__)


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
            p = self.ctx.Process(
                target=rank_main,
                args=(RankArgs(self.opts, rank, dev),),
                name=f"hexgen-{self.opts.pipeline_id}-rank{rank}",
                daemon=False,
            )
            p.start()
            self.procs.append(p)
        log.info(
            "pipeline %s stage %d: started ranks %s (%s)",
            self.opts.pipeline_id,
            self.stage.index,
            self.stage.ranks,
            self.layout.describe(),
        )

    def kill_ranks(self, sig: int = signal.SIGKILL, grace_s: float = 5.0) -> None:
        for p in self.procs:
            if p.is_alive() and p.pid is not None:
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
        log.info(
            "draining pipeline %s: setting its drain flag and forwarding SIGTERM to ranks %s",
            self.opts.pipeline_id,
            self.stage.ranks,
        )
        client = sync_redis(self.opts.settings.redis.url, socket_timeout=5.0, socket_connect_timeout=5.0)
        try:
            request_drain(client, self.opts.pipeline_id)
        except REDIS_ERRORS as e:
            log.warning("could not set the drain flag (%s); the ranks will try too", e)
        finally:
            client.close()
        for p in self.procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.opts.drain_timeout_s + 15
        while any(p.is_alive() for p in self.procs):
            if self.signals > 1 or time.monotonic() > deadline:
                log.warning("killing ranks %s", [p.pid for p in self.procs if p.is_alive()])
                self.kill_ranks()
                return EXIT_FAILED
            self._wait(0.2)
        codes = [p.exitcode for p in self.procs]
        log.info("pipeline %s: ranks %s exited with %s; exiting", self.opts.pipeline_id, self.stage.ranks, codes)
        return EXIT_OK if all(c == 0 for c in codes) else EXIT_FAILED

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

    def _restart(self, bad: int) -> int | None:
        """After a rank exited with ``bad``: stop the stage's other ranks and start fresh ones after the backoff;
        the exit code instead when that is not done (a configuration error, too many restarts, a signal)."""
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
        return None

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
                code = self._restart(next(c for c in codes if c not in (None, 0)))
                if code is not None:
                    return code
        finally:
            if any(p.is_alive() for p in self.procs):
                self.kill_ranks()
            for s, handler in old.items():
                signal.signal(s, handler)
