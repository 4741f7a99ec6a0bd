"""Redis connections shared by the head, the workers and the clients: the client factory, which errors count as
"Redis is unavailable", and the backoff every reader follows while it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from hexgen.wire.settings import sync_redis

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)
ClientFactory = Callable[[float], redis.Redis]  # socket timeout (s) -> a new client


def connect(url: str, socket_timeout: float) -> redis.Redis:
    """Default client factory: a fresh pooled client with the given socket timeout."""
    return sync_redis(url, socket_timeout=socket_timeout, socket_connect_timeout=5.0)


class Backoff:
    """Exponential backoff after Redis errors: 0.1 s doubling to ``cap_s``; log at most every 10 s."""

    def __init__(self, cap_s: float = 5.0) -> None:
        self.cap_s = cap_s
        self.delay = 0.0
        self.until = 0.0
        self._logged = 0.0

    def ready(self) -> bool:
        return time.monotonic() >= self.until

    def remaining(self) -> float:
        return max(0.0, self.until - time.monotonic())

    def fail(self, what: str, err: Exception) -> None:
        self.delay = min(self.cap_s, max(0.1, self.delay * 2))
        self.until = time.monotonic() + self.delay
        if time.monotonic() - self._logged > 10:
            log.warning("%s: Redis unavailable (%s); retrying with backoff up to %.0fs", what, err, self.cap_s)
            self._logged = time.monotonic()

    def ok(self) -> None:
        if self.delay:
            log.info("Redis reachable again")
        self.delay = 0.0
        self.until = 0.0
