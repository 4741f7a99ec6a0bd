"""How many CPU ranks share this host, counted from the Redis registry, for the ranks' torch thread counts.

Every rank registers ``hexgen:worker:<pipeline>:<rank>`` with its ``host`` (``socket.gethostname()``) and
``device`` ("cpu" for CPU ranks) and keeps ``hexgen:hb:<pipeline>:<rank>`` alive. The CPU ranks of this host
are the registrations of every pipeline with this host name, device "cpu" and a live heartbeat. A CPU rank
counts them when its pipeline forms and then every ``interval_s`` (:class:`HostRankWatch`), so ranks started
together and ranks started later on the same host settle on an even share of its cores
(``hexgen.engine.threads``). ``bin/worker --threads N`` fixes the count instead and skips the watch.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from hexgen.engine.threads import CpuThreads
from hexgen.wire import keys as C
from hexgen.wire.connection import REDIS_ERRORS
from hexgen.wire.text import as_text

log = logging.getLogger(__name__)


def count_host_ranks(client: Any, host: str) -> int:
    """Live CPU ranks of every pipeline registered with ``host``."""
    keys = sorted({as_text(k) for k in client.scan_iter(match=C.WORKER_KEY_PATTERN, count=500)})
    if not keys:
        return 0
    ids = [k[len(C.WORKER_KEY_PREFIX) :] for k in keys]
    pipe = client.pipeline(transaction=False)
    for k, wid in zip(keys, ids):
        pipe.hmget(k, "host", "device")
        pipe.exists(C.heartbeat_key(wid))
    out = pipe.execute()
    n = 0
    for (h, dev), alive in zip(out[0::2], out[1::2]):
        if alive and as_text(h) == host and as_text(dev) == "cpu":
            n += 1
    return n


class HostRankWatch(threading.Thread):
    """Daemon thread: recounts the host's CPU ranks every ``interval_s`` and hands the count to ``threads``
    (never below ``at_least``, this worker's own ranks). Redis errors keep the last count."""

    def __init__(self, client: Any, host: str, threads: CpuThreads, interval_s: float, at_least: int = 1) -> None:
        super().__init__(name="host-ranks", daemon=True)
        self.client, self.host, self.threads = client, host, threads
        self.interval_s, self.at_least = interval_s, at_least
        self._halt = threading.Event()
        self._last_error = 0.0

    def count(self) -> int:
        return max(self.at_least, count_host_ranks(self.client, self.host))

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            try:
                n = self.count()
            except REDIS_ERRORS as e:
                if time.monotonic() - self._last_error > 30:
                    log.warning("host rank count: Redis unreachable (%s); keeping %d", e, self.threads.ranks_on_host)
                    self._last_error = time.monotonic()
                continue
            if n != self.threads.ranks_on_host:
                log.info("%d CPU ranks on host %s now (was %d)", n, self.host, self.threads.ranks_on_host)
                self.threads.set_ranks_on_host(n)

    def stop(self) -> None:
        self._halt.set()
