"""Benchmark workloads: fixed-seed request mixes, Poisson arrivals, and a request source that releases them
phase by phase, each request at its arrival time."""

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


def mixed_shapes(n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int = 0) -> list[Shape]:
    """``n`` shapes with prompt and output lengths drawn uniformly (inclusive) from the ranges."""
    rng = random.Random(seed)
    return [Shape(rng.randint(*prompt_range), rng.randint(*output_range)) for _ in range(n)]


def make_requests(shapes: list[Shape], vocab: int, prefix: str, seed: int = 0) -> list[Request]:
    """Greedy requests that ignore EOS, so each generates exactly its ``output`` tokens."""
    rng = random.Random(seed + 1)
    return [
        Request(
            f"{prefix}{i}",
            random_prompt(rng, s.prompt, vocab),
            SamplingParams(max_new_tokens=s.output, ignore_eos=True),
        )
        for i, s in enumerate(shapes)
    ]


def poisson_offsets(n: int, rate: float, seed: int = 0) -> list[float]:
    """Arrival times (seconds after the start) of ``n`` requests of a Poisson process of ``rate`` per second.

    The gaps are unit-mean exponential draws of ``random.Random(seed)`` divided by ``rate``: the same seed
    gives the same arrival order at every rate, only stretched. The first request arrives at 0.
    """
    if not rate > 0 or rate == float("inf"):
        raise ValueError(f"rate: {rate!r} must be a finite number > 0")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(1.0) / rate
    return out


class TimedSource:
    """A RequestSource that releases phases of requests, each request at its arrival time in its phase.

    ``phases`` is a list of phases, each a list of (seconds after the phase starts, request). A phase starts
    once every request of the previous phase has finished (a warm-up phase first keeps process start, weight
    loading and first-call costs out of the measured ones). Each released request carries
    ``meta[T_OFFERED]`` = its scheduled arrival on time.monotonic() (CLOCK_MONOTONIC is host-wide on Linux,
    so the parent process can compare it with its own clock): if the engine picks it up late (a step was
    running, or max_num_seqs were busy), that wait counts in its TTFT.
    """

    def __init__(self, phases: list[list[tuple[float, Request]]]) -> None:
        self._phases = [sorted(((float(t), r.to_dict()) for t, r in p), key=lambda x: x[0]) for p in phases if p]
        self._due: list[tuple[float, dict]] = []  # this phase's requests not yet arrived (absolute times)
        self._pending: list[Request] = []  # arrived, not yet handed out
        self._open: set[str] = set()

    def _start_phase(self) -> None:
        if self._open or self._due or self._pending or not self._phases:
            return
        t0 = time.monotonic()
        for t, d in self._phases.pop(0):
            self._due.append((t0 + t, d))
            self._open.add(d["request_id"])

    def _arrive(self) -> None:
        now = time.monotonic()
        while self._due and self._due[0][0] <= now:
            t, d = self._due.pop(0)
            r = Request.from_dict(d)
            r.meta[T_OFFERED] = t
            self._pending.append(r)

    def poll(self, max_requests: int, timeout_s: float) -> list[Request]:
        self._start_phase()
        self._arrive()
        if not self._pending and timeout_s > 0 and self._due:  # idle engine: sleep until the next arrival
            time.sleep(max(0.0, min(timeout_s, self._due[0][0] - time.monotonic())))
            self._arrive()
        elif not self._pending and timeout_s > 0 and self._open:
            time.sleep(min(timeout_s, 0.001))
        out, self._pending = self._pending[:max_requests], self._pending[max_requests:]
        return out

    def poll_cancelled(self) -> list[str]:
        return []

    def finished(self, request_id: str) -> None:
        self._open.discard(request_id)
        self._start_phase()

    def exhausted(self) -> bool:
        return not self._pending and not self._due and not self._phases

    def close(self) -> None:
        pass


class PhasedSource(TimedSource):
    """A TimedSource whose requests all arrive at the start of their phase (offered at once)."""

    def __init__(self, phases: list[list[Request]]) -> None:
        super().__init__([[(0.0, r) for r in p] for p in phases])
