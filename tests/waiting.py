"""Waiting on a condition with a deadline, instead of sleeping for a fixed time."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout: float = 10.0, interval: float = 0.01, what: str = "") -> T:
    """Poll ``cond()`` until it returns a true value and return that value; AssertionError (naming ``what``, or
    the condition) once ``timeout`` seconds pass without it."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout:g} s: {what or getattr(cond, '__name__', cond)}")
        time.sleep(interval)


async def async_wait_until(cond: Callable[[], T | Awaitable[T]], timeout: float = 10.0, interval: float = 0.01,
                           what: str = "") -> T:
    """``wait_until`` for a coroutine: ``cond`` may be a plain function or return an awaitable."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout:g} s: {what or getattr(cond, '__name__', cond)}")
        await asyncio.sleep(interval)
