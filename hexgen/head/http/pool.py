"""The HTTP front's Redis connections: a bounded pool that waits instead of failing, and shrinks when idle.

Every generation being followed holds a pooled connection while its XREAD blocks, so a burst of requests
opens as many connections as it has requests in flight. :func:`bounded_redis` caps them at
``http.redis_pool`` (well below Redis's ``maxclients``, so workers are never locked out): a request past the
cap waits up to ``http.redis_pool_wait_s`` for a connection (then 503 ``redis_unavailable``).
:class:`IdleReaper` closes the connections that sit idle in the pool every ``http.redis_idle_s`` (they
reconnect on their next use), so the server's client count falls back after a burst.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import ConnectionPool

from hexgen.wire.settings import Settings, async_redis

log = logging.getLogger(__name__)


def bounded_redis(settings: Settings) -> Any:
    """A redis.asyncio client for the HTTP front with at most ``http.redis_pool`` connections."""
    h = settings.http
    client = async_redis(
        settings.redis.url, socket_timeout=settings.limits.socket_timeout_s, max_connections=h.redis_pool
    )
    pool = client.connection_pool
    if type(pool) is ConnectionPool:  # a plain pool (not Sentinel's): make it wait for a free connection
        client.connection_pool = BlockingConnectionPool(
            max_connections=h.redis_pool,
            timeout=h.redis_pool_wait_s,
            connection_class=pool.connection_class,
            **pool.connection_kwargs,
        )
    return client


def pool_sizes(client: Any) -> tuple[int, int]:
    """(connections in use, idle connections) of ``client``'s pool."""
    pool = client.connection_pool
    in_use = len(getattr(pool, "_in_use_connections", ()))
    idle = sum(1 for c in getattr(pool, "_available_connections", ()) if getattr(c, "is_connected", False))
    return in_use, idle


class IdleReaper:
    """Closes the idle connections of a client's pool every ``interval_s`` (those in use are untouched)."""

    def __init__(self, client: Any, interval_s: float) -> None:
        self.client = client
        self.interval_s = interval_s

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.client.connection_pool.disconnect(inuse_connections=False)
            except (OSError, RuntimeError) as e:  # closing a socket that already failed
                log.debug("http: closing idle Redis connections: %s", e)
