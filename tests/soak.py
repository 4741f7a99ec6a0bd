"""The soak driver: many async clients against a real deployment, every answer checked on the wire.

:func:`run_soak` sends ``n_requests`` requests from ``concurrency`` :class:`~hexgen.client.HexGenClient` tasks
(one client, one connection pool, as an application would). Each request is one of

- **good**: greedy, one of a few prompts, ``max_new_tokens`` drawn per request, ``ignore_eos``;
- **cancelled** (``cancel_frac``): a good request cancelled after a random number of tokens (0 = before the
  first one arrives);
- **bad** (``bad_frac``): one invalid field from :data:`BAD_INPUTS`.

After its terminal event every request's result stream is read back raw (XRANGE) and checked: token ``seq``
values 0, 1, 2, ... with no gap and no repeat, exactly one terminal event and it is the last, the ``done``
counts match the tokens, a finished request has exactly ``max_new_tokens`` tokens, and a bad input ends in
one ``error invalid_request`` whose message starts with the bad field's name. Greedy answers to the same
prompt must agree token for token across requests (a cancelled one must be a prefix), whichever pipeline
served or resumed them.

A watcher samples Redis ``used_memory`` and the resident memory of the deployment's processes (``pids()``)
every ``sample_s``; ``midway`` (an async callable) runs once when half the requests have finished, e.g. to
SIGKILL and restart a pipeline.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from hexgen.client import HexGenClient, HexGenRequestError
from hexgen.wire import keys as C
from hexgen.wire.protocol import DoneEvent, ErrorEvent, TokenEvent, parse_event

PROMPTS = ["hello world", "What is the capital of France?", "Once upon a time", "the tiny model",
           "Paris is", "tokens over Redis", "a b c d e f g", "streams and groups"]
MAX_NEW_TOKENS = (1, 24)

# (field named in the error, request parameters): each must be refused with invalid_request by the head.
BAD_INPUTS: list[tuple[str, dict]] = [
    ("max_new_tokens", {"prompt": "hi", "max_new_tokens": 0}),
    ("max_new_tokens", {"prompt": "hi", "max_new_tokens": -3}),
    ("max_new_tokens", {"prompt": "hi", "max_new_tokens": 10**12}),
    ("temperature", {"prompt": "hi", "temperature": -1.0}),
    ("temperature", {"prompt": "hi", "temperature": float("nan")}),
    ("top_p", {"prompt": "hi", "top_p": 1.5}),
    ("top_p", {"prompt": "hi", "top_p": 0.0}),
    ("top_k", {"prompt": "hi", "top_k": -1}),
    ("seed", {"prompt": "hi", "seed": -7}),
    ("stop", {"prompt": "hi", "stop": [""]}),
    ("prompt", {"prompt": ""}),
    ("messages[0].role", {"messages": [{"role": "wizard", "content": "x"}]}),
    ("model", {"prompt": "hi", "model": "no spaces allowed"}),
]


@dataclass
class Outcome:
    kind: str  # good | cancel | bad
    request_id: str
    prompt: str
    max_new_tokens: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None  # code of the error event
    latency_s: float = 0.0


@dataclass
class Sample:
    t: float
    redis_used: int
    rss: dict[str, int]  # process name -> resident bytes


@dataclass
class SoakReport:
    n_requests: int
    duration_s: float
    outcomes: list[Outcome]
    problems: list[str]
    samples: list[Sample]
    midway_at_s: float | None = None

    def count(self, kind: str, finish: str | None = None) -> int:
        return sum(o.kind == kind and (finish is None or o.finish_reason == finish) for o in self.outcomes)

    @property
    def lost(self) -> int:
        """Requests without exactly one terminal event (never answered, or a check failed on them)."""
        return self.n_requests - sum(o.finish_reason is not None or o.error is not None for o in self.outcomes)

    def peak(self, name: str | None = None) -> int:
        if name is None:
            return max(s.redis_used for s in self.samples)
        return max(s.rss.get(name, 0) for s in self.samples)

    def rss_growth(self, name: str, since: float = 0.25) -> int:
        """RSS of ``name`` at the end less its RSS ``since`` (a fraction) into the run: what a leak would add
        once start-up allocations are done."""
        t = since * self.duration_s
        later = [s.rss[name] for s in self.samples if s.t >= t and name in s.rss]
        return later[-1] - later[0] if later else 0

    def summary(self) -> str:
        good = [o for o in self.outcomes if o.kind == "good"]
        lat = sorted(o.latency_s for o in good) or [0.0]
        tokens = sum(len(o.token_ids) for o in self.outcomes)
        first, last = self.samples[0], self.samples[-1]
        rss = ", ".join(f"{n} {first.rss.get(n, 0) / 2**20:.0f}->{self.peak(n) / 2**20:.0f}->"
                        f"{last.rss.get(n, 0) / 2**20:.0f} MiB" for n in sorted(last.rss))
        return (f"{self.n_requests} requests in {self.duration_s:.1f}s ({self.n_requests / self.duration_s:.1f}/s, "
                f"{tokens / self.duration_s:.0f} tokens/s); good {len(good)}, cancelled "
                f"{self.count('cancel', 'cancelled')} (+{self.count('cancel', 'length')} finished first), "
                f"bad {self.count('bad')}; lost {self.lost}, problems {len(self.problems)}; latency p50 "
                f"{lat[len(lat) // 2]:.2f}s p99 {lat[int(len(lat) * 0.99)]:.2f}s; redis used_memory "
                f"{first.redis_used / 2**20:.1f}->{self.peak() / 2**20:.1f}->{last.redis_used / 2**20:.1f} MiB; "
                f"RSS start->peak->end: {rss}; RSS growth over the last 3/4 of the run: " +
                ", ".join(f"{n} {self.rss_growth(n) / 2**20:+.1f} MiB" for n in sorted(last.rss)))


def _tokens(where: str, body: list) -> tuple[list[int], list[str]]:
    """Token ids of the events before the terminal one, and problems: a non-token event, or a ``seq`` that
    does not continue exactly where the previous event ended (a gap or a repeat)."""
    ids: list[int] = []
    problems = []
    for e in body:
        if not isinstance(e, TokenEvent):
            problems.append(f"{where}: unexpected event {e!r}")
        elif e.seq != len(ids):
            problems.append(f"{where}: token seq {e.seq} after {len(ids)} tokens (gap or duplicate)")
            ids.extend(e.ids)
        else:
            ids.extend(e.ids)
    return ids, problems


def _check_done(o: Outcome, where: str, last: DoneEvent, ids: list[int]) -> list[str]:
    problems = []
    if last.completion_tokens != len(ids):
        problems.append(f"{where}: done says {last.completion_tokens} tokens, stream holds {len(ids)}")
    if ids != o.token_ids:
        problems.append(f"{where}: the client saw {len(o.token_ids)} tokens, the stream holds {len(ids)}")
    if last.finish_reason == "length" and len(ids) != o.max_new_tokens:
        problems.append(f"{where}: finished with {len(ids)} of {o.max_new_tokens} tokens")
    allowed = ("length",) if o.kind == "good" else ("length", "cancelled")
    if last.finish_reason not in allowed:
        problems.append(f"{where}: finish_reason {last.finish_reason}")
    return problems


def check_stream(o: Outcome, events: list, want_field: str | None) -> list[str]:
    """Problems in one request's raw result stream (empty when it is exactly right)."""
    where = f"{o.kind} {o.request_id}"
    terminal = [i for i, e in enumerate(events) if isinstance(e, (DoneEvent, ErrorEvent))]
    if len(terminal) != 1 or terminal[0] != len(events) - 1:
        return [f"{where}: {len(terminal)} terminal events at {terminal} of {len(events)}"]
    ids, problems = _tokens(where, events[:-1])
    last = events[-1]
    if o.kind == "bad":
        named = isinstance(last, ErrorEvent) and last.code == "invalid_request" and want_field is not None \
            and last.message.startswith(want_field)
        return problems + ([] if named else [f"{where}: bad {want_field} answered {last!r}"])
    if not isinstance(last, DoneEvent):
        return problems + [f"{where}: ended with {last!r}"]
    return problems + _check_done(o, where, last, ids)


def check_consistency(outcomes: list[Outcome]) -> list[str]:
    """Greedy answers to one prompt agree: each is a prefix of the longest one (cancelled ones included)."""
    problems = []
    by_prompt: dict[str, list[Outcome]] = {}
    for o in outcomes:
        if o.kind != "bad" and o.finish_reason is not None:
            by_prompt.setdefault(o.prompt, []).append(o)
    for prompt, group in by_prompt.items():
        longest = max(group, key=lambda o: len(o.token_ids)).token_ids
        for o in group:
            if o.token_ids != longest[:len(o.token_ids)]:
                problems.append(f"{o.kind} {o.request_id}: tokens for {prompt!r} differ from another request's")
    return problems


async def _read_stream(r: aioredis.Redis, request_id: str) -> list:
    return [parse_event(f) for _, f in await r.xrange(C.result_stream(request_id))]


async def _one(client: HexGenClient, r: aioredis.Redis, rng: random.Random, i: int, kind: str,
               timeout_s: float) -> tuple[Outcome, list[str]]:
    rid = f"soak{i}-{rng.getrandbits(32):08x}"
    t0 = time.monotonic()
    if kind == "bad":
        want_field, params = BAD_INPUTS[i % len(BAD_INPUTS)]
        o = Outcome(kind, rid, "", 0)
        try:
            await client.generate(request_id=rid, timeout_s=timeout_s, **params)
            return o, [f"bad {rid}: {want_field} was accepted"]
        except HexGenRequestError as e:
            o.error = e.code
        o.latency_s = time.monotonic() - t0
        return o, check_stream(o, await _read_stream(r, rid), want_field)
    prompt = PROMPTS[rng.randrange(len(PROMPTS))]
    n = rng.randint(*MAX_NEW_TOKENS)
    o = Outcome(kind, rid, prompt, n)
    cancel_after = rng.randint(0, n) if kind == "cancel" else -1
    stream = client.stream(prompt, request_id=rid, max_new_tokens=n, temperature=0, ignore_eos=True,
                           timeout_s=timeout_s)
    try:
        if cancel_after == 0:
            # cancel as soon as the request is sent: the first iteration sends it
            it = stream.__aiter__()
            first = asyncio.ensure_future(it.__anext__())
            await asyncio.sleep(0)
            await stream.cancel()
            try:
                o.token_ids.extend((await first).ids)
                async for ev in it:
                    o.token_ids.extend(ev.ids)
            except StopAsyncIteration:
                pass
        else:
            cancelled = False
            async for ev in stream:
                o.token_ids.extend(ev.ids)
                if not cancelled and 0 < cancel_after <= len(o.token_ids):
                    await stream.cancel()
                    cancelled = True
    except HexGenRequestError as e:
        o.error = e.code
        return o, [f"{kind} {rid}: error {e.code}: {e}"]
    except TimeoutError as e:
        return o, [f"{kind} {rid}: {e}"]
    o.finish_reason = stream.done.finish_reason if stream.done else None
    o.latency_s = time.monotonic() - t0
    return o, check_stream(o, await _read_stream(r, rid), None)


async def _watch(r: aioredis.Redis, pids: Callable[[], dict[str, int]], samples: list[Sample],
                 t0: float, sample_s: float, stop: asyncio.Event) -> None:
    while True:
        info = await r.info("memory")
        samples.append(Sample(time.monotonic() - t0, int(info["used_memory"]), rss_of(pids())))
        try:
            await asyncio.wait_for(stop.wait(), sample_s)
            return
        except TimeoutError:
            pass


def rss_of(pids: dict[str, int]) -> dict[str, int]:
    out = {}
    for name, pid in pids.items():
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out[name] = int(line.split()[1]) * 1024
        except OSError:
            pass  # gone (killed on purpose, or restarting)
    return out


async def run_soak(url: str, *, n_requests: int, concurrency: int, cancel_frac: float = 0.10,
                   bad_frac: float = 0.05, seed: int = 0, timeout_s: float = 300.0,
                   pids: Callable[[], dict[str, int]] = dict, sample_s: float = 1.0,
                   midway: Callable[[], Awaitable[None]] | None = None) -> SoakReport:
    """Drive the deployment at ``url``; see the module docstring. Never raises on a wrong answer: the
    report lists every problem found."""
    rng = random.Random(seed)
    kinds = ["bad" if x < bad_frac else "cancel" if x < bad_frac + cancel_frac else "good"
             for x in (rng.random() for _ in range(n_requests))]
    outcomes: list[Outcome] = []
    problems: list[str] = []
    samples: list[Sample] = []
    next_index = iter(range(n_requests))
    half = asyncio.Event()
    t0 = time.monotonic()
    midway_at: list[float] = []
    r = aioredis.from_url(url, socket_timeout=30, max_connections=concurrency + 10)  # one per worker task, at most
    async with HexGenClient(url, block_ms=1000) as client:

        async def worker(k: int) -> None:
            wrng = random.Random(seed * 100003 + k)
            for i in next_index:
                o, found = await _one(client, r, wrng, i, kinds[i], timeout_s)
                outcomes.append(o)
                problems.extend(found)
                if len(outcomes) >= n_requests // 2:
                    half.set()

        async def at_half() -> None:
            await half.wait()
            midway_at.append(time.monotonic() - t0)
            await midway()

        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch(r, pids, samples, t0, sample_s, stop))
        chores = [asyncio.create_task(at_half())] if midway is not None else []
        await asyncio.gather(*[worker(k) for k in range(concurrency)], *chores)
        duration = time.monotonic() - t0
        stop.set()
        await watcher
    samples.append(Sample(time.monotonic() - t0, int((await r.info("memory"))["used_memory"]), rss_of(pids())))
    await r.aclose()
    problems.extend(check_consistency(outcomes))
    return SoakReport(n_requests, duration, outcomes, problems, samples, midway_at[0] if midway_at else None)
