"""Torch intra-op threads of a CPU rank, sized by every rank that shares the host.

A CPU rank that takes all the host's cores for itself oversubscribes them as soon as another rank runs beside
it: two one-stage pipelines on a 2-core host would run four busy threads on two cores, and OpenMP threads
that spin-wait for each other then lose whole scheduler slices. So each rank takes
``max(1, cores // ranks_on_host)`` threads, where ``ranks_on_host`` counts the ranks of *all* pipelines on
this host, or exactly ``EngineConfig.cpu_threads`` when that is set (``bin/worker --threads N``).

Who counts: a local run (``hexgen generate``, ``bench``, ``run_offline``) starts every rank of its one
pipeline here, so the count is its world size. A worker rank counts the live registrations with its host
name in Redis (``workers.host_threads``), again whenever its heartbeat runs, so a pipeline started later on
the same host shrinks the threads of those already running. ``torch.set_num_threads`` only affects the
thread that calls it (OpenMP's thread count is per thread), so another thread only records the new count
(:meth:`CpuThreads.set_ranks_on_host`) and the rank's engine thread applies it before its next step
(:meth:`CpuThreads.apply`, called by ``StageRunner.forward``).
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)


def host_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_rank(cores: int, ranks_on_host: int, fixed: int = 0) -> int:
    """``fixed`` when > 0, else an even share of ``cores`` among ``ranks_on_host`` ranks (at least 1)."""
    if fixed > 0:
        return fixed
    return max(1, cores // max(1, ranks_on_host))


class CpuThreads:
    """The thread count of one CPU rank: fixed, or re-derived whenever the host's rank count changes."""

    def __init__(self, fixed: int = 0, ranks_on_host: int = 1, cores: int | None = None) -> None:
        self.fixed = fixed
        self.cores = cores if cores is not None else host_cores()
        self._ranks = max(1, ranks_on_host)
        self._lock = threading.Lock()
        self._applied = 0

    @property
    def ranks_on_host(self) -> int:
        with self._lock:
            return self._ranks

    def set_ranks_on_host(self, n: int) -> None:
        """Record a new count of the host's ranks (any thread); the engine thread applies it next step."""
        with self._lock:
            self._ranks = max(1, int(n))

    def wanted(self) -> int:
        return threads_per_rank(self.cores, self.ranks_on_host, self.fixed)

    def apply(self) -> int:
        """On the engine thread: set torch's intra-op threads when the wanted count changed; returns it."""
        n = self.wanted()
        if n != self._applied:
            import torch  # here, not at import: worker ranks import this module before they block SIGTERM

            torch.set_num_threads(n)
            if self._applied:
                log.info(
                    "torch threads %d -> %d (%d cores, %d ranks on this host)",
                    self._applied,
                    n,
                    self.cores,
                    self.ranks_on_host,
                )
            self._applied = n
        return n
