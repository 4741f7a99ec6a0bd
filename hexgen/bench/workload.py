"""Benchmark workloads: fixed-seed request mixes, and a request source that releases them in phases."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

from hexgen.engine.types import Request, SamplingParams

T_OFFERED = "bench_t_offered"  # Request.meta key: time.monotonic() when the request was offered


@dataclass(frozen=True)
class Shape:
    """One request's shape: prompt length and number of tokens to generate."""

    prompt: int
    output: int


def random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    # ids 3.. avoid the usual special tokens (unk/bos/eos)
    return [rng.randrange(3, vocab) for _ in range(n)]


def mixed_shapes(n: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
                 seed: int = 0) -> list[Shape]:
    """``n`` shapes with prompt and output lengths drawn uniformly (inclusive) from the ranges."""
    rng = random.Random(seed)
    return [Shape(rng.randint(*prompt_range), rng.randint(*output_range)) for _ in range(n)]


def make_requests(shapes: list[Shape], vocab: int, prefix: str, seed: int = 0) -> list[Request]:
    """Greedy requests that ignore EOS, so each generates exactly its ``output`` tokens."""
    rng = random.Random(seed + 1)
    return [Request(f"{prefix}{i}", random_prompt(rng, s.prompt, vocab),
                    SamplingParams(max_new_tokens=s.output, ignore_eos=True))
            for i, s in enumerate(shapes)]


class PhasedSource:
    """A RequestSource that hands out one phase of requests at a time.

    A phase is released once every request of the previous phase has finished; each released request
    gets ``meta[T_OFFERED]`` = time.monotonic() at release (CLOCK_MONOTONIC is host-wide on Linux, so
    the parent process can compare it with its own clock). A warm-up phase first keeps process start,
    weight loading and first-call costs out of the measured phases.
    """

    def __init__(self, phases: list[list[Request]]) -> None:
        self._phases = [[r.to_dict() for r in p] for p in phases if p]
        self._pending: list[Request] = []
        self._open: set[str] = set()

    def _release(self) -> None:
        if self._open or self._pending or not self._phases:
            return
        now = time.monotonic()
        for d in self._phases.pop(0):
            r = Request.from_dict(d)
            r.meta[T_OFFERED] = now
            self._pending.append(r)
            self._open.add(r.request_id)

    def poll(self, max_requests: int, timeout_s: float) -> list[Request]:
        self._release()
        out, self._pending = self._pending[:max_requests], self._pending[max_requests:]
        if not out and timeout_s > 0 and self._open:
            time.sleep(min(timeout_s, 0.001))
        return out

    def poll_cancelled(self) -> list[str]:
        return []

    def finished(self, request_id: str) -> None:
        self._open.discard(request_id)
        self._release()

    def exhausted(self) -> bool:
        return not self._pending and not self._phases

    def close(self) -> None:
        pass
