"""The settings a pipeline's Redis side (intake and sink) runs with: plain values, so they pickle for spawned
ranks. The rules they serve are in :mod:`workers.intake` (leases, take-over, admission, cancels) and
:mod:`workers.sink` (exactly-once posting, acks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hexgen.wire import keys as C
from hexgen.wire.settings import Settings


@dataclass(frozen=True)
class IOConfig:
    """Everything a pipeline's source and sink need; plain values so that it pickles for spawned ranks."""

    redis_url: str
    model: str
    pipeline_id: str
    lease_s: float = C.LEASE_S
    max_deliveries: int = C.MAX_DELIVERIES
    block_ms: int = C.BLOCK_MS
    result_ttl_s: int = C.RESULT_TTL_S
    cancel_memory_s: float = 600.0  # how far back a new source reads cancels, and how long it remembers them
    control_block_ms: int = 1000  # longest BLOCK of the source's threads (cancel reader, work prefetch): the
    # drain flag is checked this often and close() returns within about this
    flush_timeout_s: float = 30.0  # RedisSink.close() waits this long for pending writes
    vocab_size: int = 0  # token ids of a work item must be below this (0: not checked; set by the rank)
    max_model_len: int = 0  # a work item's prompt may hold at most this many tokens (0: not checked)
    max_new_tokens: int = C.MAX_NEW_TOKENS_CAP  # limits.max_new_tokens

    @classmethod
    def from_settings(cls, settings: Settings, pipeline_id: str, **overrides: Any) -> IOConfig:
        lim = settings.limits
        kw: dict[str, Any] = dict(
            redis_url=settings.redis.url,
            model=settings.model.name,
            pipeline_id=pipeline_id,
            lease_s=lim.lease_s,
            max_deliveries=lim.max_deliveries,
            block_ms=lim.block_ms,
            result_ttl_s=lim.result_ttl_s,
            max_new_tokens=lim.max_new_tokens,
        )
        kw.update(overrides)
        return cls(**kw)

    @property
    def work_stream(self) -> str:
        return C.work_stream(self.model)

    @property
    def consumer(self) -> str:
        return C.PIPELINE_CONSUMER_PREFIX + self.pipeline_id

    @property
    def lease_ms(self) -> int:
        return max(1, int(self.lease_s * 1000))

    def __repr__(self) -> str:  # the URL may hold a password
        return f"IOConfig(model={self.model!r}, pipeline_id={self.pipeline_id!r}, lease_s={self.lease_s})"
