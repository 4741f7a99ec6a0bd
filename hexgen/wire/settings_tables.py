"""The serving tables of a deployment file: ``[limits]`` (with the caps the head enforces on every request),
``[http]`` and ``[engine]``, each a frozen dataclass validated in ``__post_init__``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hexgen.errors import ConfigError
from hexgen.wire import keys as C


@dataclass(frozen=True)
class RequestLimits:
    """Caps the head enforces on every request (from the deployment's ``[limits]``)."""

    max_new_tokens: int = C.MAX_NEW_TOKENS_CAP
    default_max_new_tokens: int = C.DEFAULT_MAX_NEW_TOKENS
    max_field_bytes: int = C.MAX_FIELD_BYTES
    max_request_bytes: int = C.MAX_REQUEST_BYTES
    max_messages: int = C.MAX_MESSAGES
    max_stop_strings: int = C.MAX_STOP_STRINGS
    max_deadline_s: float = C.MAX_REQUEST_DEADLINE_S


def check_int(key: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{key}: {value!r} must be an integer ≥ {lo}")


def check_pos(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ConfigError(f"{key}: {value!r} must be a finite number > 0")


@dataclass(frozen=True)
class LimitSettings:
    """Back-pressure, payload caps and timings shared by head, workers and clients."""

    max_queue_depth: int = C.MAX_QUEUE_DEPTH
    max_new_tokens: int = C.MAX_NEW_TOKENS_CAP
    default_max_new_tokens: int = C.DEFAULT_MAX_NEW_TOKENS
    max_field_bytes: int = C.MAX_FIELD_BYTES
    max_request_bytes: int = C.MAX_REQUEST_BYTES
    result_ttl_s: int = C.RESULT_TTL_S
    dedupe_ttl_s: int = C.DEDUPE_TTL_S
    lease_s: float = C.LEASE_S
    max_deliveries: int = C.MAX_DELIVERIES
    heartbeat_ttl_s: int = C.HEARTBEAT_TTL_S
    heartbeat_interval_s: float = C.HEARTBEAT_INTERVAL_S
    block_ms: int = C.BLOCK_MS
    request_deadline_s: float = C.REQUEST_DEADLINE_S  # a request's default deadline (field deadline_s overrides)
    max_request_deadline_s: float = C.MAX_REQUEST_DEADLINE_S  # the longest deadline_s a request may ask for

    def __post_init__(self) -> None:
        for name in (
            "max_queue_depth",
            "max_new_tokens",
            "default_max_new_tokens",
            "max_field_bytes",
            "max_request_bytes",
            "result_ttl_s",
            "dedupe_ttl_s",
            "max_deliveries",
            "heartbeat_ttl_s",
            "block_ms",
        ):
            check_int(f"limits.{name}", getattr(self, name), 1)
        for name in ("lease_s", "heartbeat_interval_s", "request_deadline_s", "max_request_deadline_s"):
            check_pos(f"limits.{name}", getattr(self, name))
        if self.request_deadline_s > self.max_request_deadline_s:
            raise ConfigError(
                f"limits.request_deadline_s: {self.request_deadline_s} must be ≤ "
                f"limits.max_request_deadline_s ({self.max_request_deadline_s})"
            )

        if self.default_max_new_tokens > self.max_new_tokens:
            raise ConfigError(
                f"limits.default_max_new_tokens: {self.default_max_new_tokens} must be ≤ "
                f"limits.max_new_tokens ({self.max_new_tokens})"
            )
        if self.max_field_bytes > self.max_request_bytes:
            raise ConfigError(
                f"limits.max_field_bytes: {self.max_field_bytes} must be ≤ "
                f"limits.max_request_bytes ({self.max_request_bytes})"
            )
        if self.heartbeat_interval_s >= self.heartbeat_ttl_s:
            raise ConfigError(
                f"limits.heartbeat_interval_s: {self.heartbeat_interval_s} must be < "
                f"limits.heartbeat_ttl_s ({self.heartbeat_ttl_s})"
            )

    def request_limits(self) -> RequestLimits:
        return RequestLimits(
            max_new_tokens=self.max_new_tokens,
            default_max_new_tokens=self.default_max_new_tokens,
            max_field_bytes=self.max_field_bytes,
            max_request_bytes=self.max_request_bytes,
            max_deadline_s=self.deadline_cap_s,
        )

    @property
    def deadline_cap_s(self) -> float:
        """The longest deadline a request gets: ``max_request_deadline_s``, at most ``result_ttl_s`` (a finished
        request's result stream must outlive its deadline)."""
        return min(self.max_request_deadline_s, float(self.result_ttl_s))

    @property
    def default_deadline_s(self) -> float:
        """The deadline of a request that gives no ``deadline_s``."""
        return min(self.request_deadline_s, self.deadline_cap_s)

    @property
    def socket_timeout_s(self) -> float:
        """Socket timeout for a connection that blocks ``block_ms``: longer than the BLOCK."""
        return C.socket_timeout_for(self.block_ms)


@dataclass(frozen=True)
class HttpSettings:
    """The head's optional HTTP front: off while ``port`` is 0. ``api_key`` is kept out of repr.

    The rest bound what one client can hold: header bytes (431) and request-line bytes (414), checked as
    they arrive; seconds to send a whole request (``read_timeout_s``, else 408) and an idle keep-alive
    connection's life (``keep_alive_s``); open connections (``max_connections``, then 503); and the Redis
    connections the front may open (``redis_pool``, waited for up to ``redis_pool_wait_s``; those idle for
    ``redis_idle_s`` are closed).
    """

    host: str = "127.0.0.1"
    port: int = 0
    api_key: str = field(default="", repr=False)
    max_header_bytes: int = 32_768
    max_request_line_bytes: int = 16_384
    read_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    max_connections: int = 2_000
    redis_pool: int = 512
    redis_pool_wait_s: float = 10.0
    redis_idle_s: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host.strip() or any(c.isspace() for c in self.host):
            raise ConfigError(
                f"http.host: {self.host!r} must be a host name or address (127.0.0.1: this machine "
                "only; 0.0.0.0: every interface)"
            )
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"http.port: {self.port!r} must be an integer in [0, 65535] (0: no HTTP server)")
        if not isinstance(self.api_key, str):
            raise ConfigError("http.api_key: must be a string")
        if any(c.isspace() for c in self.api_key):
            raise ConfigError("http.api_key: must not contain whitespace (it is sent as 'Bearer <key>')")
        for name, lo in (("max_header_bytes", 1024), ("max_request_line_bytes", 256), ("max_connections", 1)):
            check_int(f"http.{name}", getattr(self, name), lo)
        check_int("http.redis_pool", self.redis_pool, 4)
        if self.redis_pool > 10_000:
            raise ConfigError(f"http.redis_pool: {self.redis_pool} must be ≤ 10000 (keep it below Redis's maxclients)")
        for name in ("read_timeout_s", "keep_alive_s", "redis_pool_wait_s", "redis_idle_s"):
            check_pos(f"http.{name}", getattr(self, name))

    @property
    def enabled(self) -> bool:
        return self.port != 0

    def __repr__(self) -> str:
        return f"HttpSettings(host={self.host!r}, port={self.port}, api_key={'set' if self.api_key else 'unset'})"


@dataclass(frozen=True)
class EngineSettings:
    """``[engine]``: the workers' engine behaviour a deployment chooses (flags override it)."""

    prefix_cache: bool = True  # reuse the KV blocks of earlier requests' prefixes (EngineConfig.prefix_cache)
    prefix_routing: bool = True  # the head offers a request to the pipeline holding its prefix (hexgen.head.routing)

    def __post_init__(self) -> None:
        for name in ("prefix_cache", "prefix_routing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"engine.{name}: {getattr(self, name)!r} must be true or false")
