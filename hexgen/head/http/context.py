"""What the HTTP app's route modules share: settings, the async Redis client, the served models, counters.

:func:`hexgen.head.http.app.create_app` builds one :class:`HttpContext` and hands it to every ``install``
(``openai_api``, ``metrics``, ``dashboard``). The OpenAI routes report each finished request to
``ctx.counters`` (:class:`HttpCounters`): plain running totals that a Prometheus collector can read at
scrape time, and listeners called once per request with its :class:`RequestRecord` (for histograms).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hexgen.wire.figures import Histogram

if TYPE_CHECKING:
    from hexgen.wire.settings import Settings

_LENGTHS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
SIZE_BUCKETS: dict[str, tuple[float, ...]] = {  # vLLM's bucket edges for these histograms
    "request_prompt_tokens": _LENGTHS,
    "request_generation_tokens": _LENGTHS,
    "request_params_n": (1, 2, 5, 10, 20),
    "request_params_max_tokens": _LENGTHS,
}


@dataclass(frozen=True)
class RequestRecord:
    """One finished HTTP request to ``/v1/chat/completions`` or ``/v1/completions``.

    ``outcome`` is OpenAI's finish_reason (``stop``, ``length``) for a generated answer, ``cancelled`` for a
    client that went away, else ``error``; ``status`` is the HTTP status sent (200 for a stream, even one
    that later failed: ``error_code`` then says why; 499 for a client that left before its non-streaming
    answer), ``error_code`` the OpenAI error ``code`` or "".
    Times are ``time.monotonic()`` seconds; ``first_token_at`` is None when no token came.
    """

    endpoint: str  # "chat" | "completions"
    model: str
    stream: bool
    status: int
    outcome: str  # stop | length | cancelled | error
    error_code: str
    prompt_tokens: int
    completion_tokens: int
    started_at: float
    first_token_at: float | None
    finished_at: float
    n: int = 1  # choices asked for
    max_tokens: int | None = None  # the request's max_tokens (None: the deployment's default)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started_at

    @property
    def e2e_s(self) -> float:
        return self.finished_at - self.started_at


@dataclass
class HttpCounters:
    """Running totals of the OpenAI routes (single event loop: no locking needed).

    ``requests[(endpoint, outcome)]``, ``errors[(endpoint, http status)]``; ``in_flight`` is the number of
    generation requests being served now. ``listeners`` get every :class:`RequestRecord`; a listener must
    be fast and must not raise (an exception is logged and ignored).
    """

    requests: collections.Counter = field(default_factory=collections.Counter)
    errors: collections.Counter = field(default_factory=collections.Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    in_flight: int = 0
    listeners: list[Callable[[RequestRecord], None]] = field(default_factory=list)
    # answered requests' sizes (vLLM's request_*_tokens, n and max_tokens histograms): name -> Histogram
    sizes: dict[str, Histogram] = field(default_factory=lambda: {k: Histogram(b) for k, b in SIZE_BUCKETS.items()})

    def record(self, rec: RequestRecord) -> None:
        self.requests[(rec.endpoint, rec.outcome)] += 1
        if rec.status >= 400 and rec.outcome != "cancelled":  # a client that left is no error
            self.errors[(rec.endpoint, rec.status)] += 1
        self.prompt_tokens += rec.prompt_tokens
        self.completion_tokens += rec.completion_tokens
        if rec.status == 200 and rec.outcome != "error":
            self.sizes["request_prompt_tokens"].observe(rec.prompt_tokens)
            self.sizes["request_generation_tokens"].observe(rec.completion_tokens)
            self.sizes["request_params_n"].observe(rec.n)
            if rec.max_tokens is not None:
                self.sizes["request_params_max_tokens"].observe(rec.max_tokens)
        for fn in list(self.listeners):
            try:
                fn(rec)
            except Exception:  # noqa: BLE001 - a metrics listener must never break serving
                import logging

                logging.getLogger(__name__).exception("http counters listener failed")


@dataclass
class HttpContext:
    """Shared by all route modules of one app. ``redis`` is a ``redis.asyncio.Redis`` (bytes replies)."""

    settings: Settings
    redis: Any
    models: tuple[str, ...]
    counters: HttpCounters = field(default_factory=HttpCounters)
    started_at: float = field(default_factory=time.time)  # wall clock, for uptime
    tokenizer: Any = None  # the head's Hugging Face tokenizer (token texts of logprobs, /tokenize); None: none

    @property
    def model(self) -> str:
        """The default model (the first served)."""
        return self.models[0]
