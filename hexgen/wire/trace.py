"""Opt-in latency stamps along the serving path (``Settings.trace_timing``, from ``HEXGEN_TRACE_TIMING=1`` or
``trace_timing = true``; off by default). Each process turns them on once, from its settings, with
:func:`configure` (the head's CLI, each worker rank).

When on, the head, the stage-0 source and the last-stage sink write ``time.monotonic()`` stamps into the
request's ``meta["trace"]`` (it travels with the work item and the engine's outputs); once a request's first
token is posted, the sink XADDs its stamps to :data:`~hexgen.wire.keys.TRACE_STREAM`.
CLOCK_MONOTONIC is host-wide on Linux, so the stamps of the head, the worker and a client on one host compare.
``scripts/serve_breakdown.py`` turns them into a per-hop table. Off, each hook is one boolean test.

Stamps: ``head_read`` (the head has the entry), ``head_tok`` (validated and tokenized), ``head_send`` (before
the round trip that writes the work item: the submit script), ``src_read`` (the stage-0 prefetch thread's
XREADGROUP returned it and it is admitted), ``src_take`` (the engine loop took it from the prefetch queue),
``emit`` (the first token was sampled and handed to the sink), ``picked`` (the sink's writer thread took it),
``posted`` (its EVALSHA returned).
"""

from __future__ import annotations

import time
from typing import Any

from hexgen.wire.settings import TRACE_TIMING_ENV as ENV

__all__ = ["ENABLED", "ENV", "KEY", "configure", "stamp", "stamps"]

ENABLED = False  # set by configure()
KEY = "trace"


def configure(on: bool) -> None:
    """Turn the stamps on or off for this process (from its settings' ``trace_timing``)."""
    global ENABLED
    ENABLED = bool(on)


def stamp(meta: dict[str, Any], name: str, t: float | None = None) -> None:
    """Record ``name`` at ``t`` (default: now) in ``meta["trace"]`` when tracing is on."""
    if ENABLED:
        meta.setdefault(KEY, {})[name] = time.monotonic() if t is None else t


def stamps(meta: dict[str, Any] | None) -> dict[str, float] | None:
    """The stamps carried by ``meta`` (None when tracing is off or there are none)."""
    if not ENABLED or not meta:
        return None
    found = meta.get(KEY)
    return dict(found) if isinstance(found, dict) else None
