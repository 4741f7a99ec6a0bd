"""``hexgen bench serve``: the same load through redis-server, a head and workers, and through the head's
OpenAI-compatible HTTP front, against the engine driven directly: the overhead of the Redis and HTTP paths.

Both paths get the same requests (prompt texts tokenized exactly as the head tokenizes them; the direct engine
gets the ids, or with ``--direct-input text`` the texts, tokenized on arrival in its loop) at the same arrival
offsets (all at once, or a seeded Poisson process at ``rate``), one after the other in one run:
first the engine through ``run_offline`` (stamps in the parent as outputs arrive), then a private
deployment started the way ``hexgen demo`` starts one (hexgen.demo: redis-server on a free port,
``hexgen head``, one ``hexgen worker`` per stage, the same layout and engine settings), fed through
:class:`hexgen.client.HexGenClient` with every token stamped on the client side, then (unless ``--no-http``)
the same requests again through the same deployment's ``POST /v1/completions`` with ``stream: true``
(:mod:`hexgen.bench.http_load`: httpx, every chunk stamped as it is read). Each path has its own warm-up
requests first. TTFT and TPOT count from each request's scheduled arrival.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from hexgen.bench.engine_bench import run_engine
from hexgen.bench.memory import memory_summary
from hexgen.bench.modes import BenchSetup, device_info
from hexgen.bench.serve_report import _ms, client_lateness, overhead, paired_ttft_diff, versus
from hexgen.bench.stats import RequestTiming, percentile, summarize
from hexgen.bench.sweep import check_range
from hexgen.bench.workload import (
    TimedSource,
    mixed_shapes,
    poisson_offsets,
    random_prompt,
)
from hexgen.config import KernelConfig
from hexgen.engine.types import Request, SamplingParams
from hexgen.errors import ConfigError

DIRECT_INPUTS = ("text", "ids")
SEND_MARGIN_S = 0.003  # the client's last stretch before a scheduled send: time.sleep, not an asyncio timer


@dataclass(frozen=True)
class ServeOptions:
    num_requests: int = 32
    prompt_range: tuple[int, int] = (64, 256)
    output_range: tuple[int, int] = (16, 64)
    seed: int = 0
    rate: float | None = None  # requests/s of a Poisson process; None: all offered at once
    ready_timeout_s: float = 300.0
    log_dir: str | None = None  # keep the deployment's logs here (default: a temporary folder, removed)
    tokenizer: str | None = None  # the head's tokenizer directory (default: the model's); needed with a preset
    direct_input: str = "ids"  # the direct engine's input: "ids" or "text" (tokenized on arrival, in its loop)
    http: bool = True  # also send the requests through the head's HTTP front

    def __post_init__(self) -> None:
        if self.direct_input not in DIRECT_INPUTS:
            raise ConfigError(f"--direct-input: {self.direct_input!r} must be one of {', '.join(DIRECT_INPUTS)}")
        if self.num_requests < 1:
            raise ConfigError(f"--num-requests: {self.num_requests} must be ≥ 1")
        check_range("--prompt-range", self.prompt_range)
        check_range("--output-range", self.output_range, lo=2)
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ConfigError(
                f"--rate: {self.rate} must be a finite number of requests/s > 0 (omit it to "
                "offer every request at once)"
            )
        if not self.ready_timeout_s > 0:
            raise ConfigError(f"--ready-timeout: {self.ready_timeout_s} must be > 0 seconds")


@dataclass(frozen=True)
class _Item:
    """One request of the workload: its text for the client, its token ids for the direct engine."""

    offset: float
    text: str
    request: Request


def build_items(tokenizer, shapes, vocab: int, seed: int, offsets: list[float], prefix: str) -> list[_Item]:
    """Prompt texts (decoded random ids) and the ids the head makes of them, with their arrival offsets."""
    from hexgen.head.tokenizing import tokenize
    from hexgen.head.validation import ParsedRequest

    rng = random.Random(seed + 1)
    out = []
    for i, (s, t) in enumerate(zip(shapes, offsets)):
        text = tokenizer.decode(random_prompt(rng, s.prompt, vocab), skip_special_tokens=True)
        params = SamplingParams(max_new_tokens=s.output, ignore_eos=True)
        ids = tokenize(tokenizer, ParsedRequest(f"{prefix}{i}", text, None, params, None))
        out.append(_Item(t, text, Request(f"{prefix}{i}", ids, params)))
    return out


class TokenizingSource(TimedSource):
    """The direct engine's source for ``--direct-input text``: each request arrives as its prompt text and is
    tokenized on arrival with the head's :func:`~hexgen.head.tokenizing.tokenize` and tokenizer, the way an
    offline text API would: in the engine's process, on its loop, so the tokenizing also delays the steps of
    the requests already running (the head tokenizes in its own process). The default, ``ids``, gives the
    direct engine the ids alone: the stricter baseline.

    The ids it makes replace the request's (the same ids: ``build_items`` made them the same way). TTFT counts
    from the scheduled arrival, so it includes the tokenizing. The tokenizer loads at the first arrival, a
    warm-up request's; ``texts`` maps request id to text."""

    def __init__(self, phases: list[list[tuple[float, Request]]], texts: dict[str, str], tokenizer_dir: str) -> None:
        super().__init__(phases)
        self._texts = dict(texts)
        self._tokenizer_dir = tokenizer_dir
        self._tok = None

    def _arrive(self) -> None:  # runs at every poll of the engine loop; the tokenizing work only on arrivals
        before = len(self._pending)
        super()._arrive()
        if len(self._pending) == before:
            return
        from hexgen.head.tokenizing import tokenize
        from hexgen.head.validation import ParsedRequest

        if self._tok is None:
            from hexgen.model.tokenizer import load_tokenizer

            self._tok = load_tokenizer(self._tokenizer_dir)
        for r in self._pending[before:]:
            text = self._texts.pop(r.request_id)
            r.prompt_ids = tokenize(self._tok, ParsedRequest(r.request_id, text, None, r.params, None))


def serve_tokenizer_dir(setup: BenchSetup, opts: ServeOptions) -> str | None:
    return opts.tokenizer or setup.model.model_dir


def serve_tokenizer(setup: BenchSetup, opts: ServeOptions):
    """The tokenizer the head will use: ``opts.tokenizer``, else the model directory's; ConfigError if none."""
    from hexgen.engine.last_stage import load_model_tokenizer
    from hexgen.engine.runner import ModelSpec

    path = serve_tokenizer_dir(setup, opts)
    tok = load_model_tokenizer(ModelSpec(model_dir=path)) if path else None
    if tok is None:
        raise ConfigError(
            f"--model/--tokenizer: serve mode needs a tokenizer for the head (a model directory with "
            f"one, or --tokenizer DIR with a --preset); {path or 'a preset'} has none"
        )
    return tok


def worker_engine_overrides(setup: BenchSetup) -> dict:
    """The engine flags ``hexgen worker`` takes; ConfigError if the bench's engine differs otherwise."""
    from hexgen.demo import PIPELINE_ID
    from hexgen.wire.settings import ModelSettings, PipelineSettings, Settings
    from workers.options import WorkerOptions, build_plan

    over: dict = {"max_num_seqs": setup.engine.max_num_seqs, "cpu_kv_tokens": setup.engine.cpu_kv_tokens}
    if setup.engine.cuda_graphs:
        over["cuda_graphs"] = True
    if setup.engine.kernels != KernelConfig():
        over["kernels"] = setup.engine.kernels
    if setup.engine.emulate_devices:
        over["emulate_devices"] = setup.engine.emulate_devices
    if setup.engine.kv_cache_dtype != "auto":
        over["kv_cache_dtype"] = setup.engine.kv_cache_dtype
    if setup.engine.quantization != "auto":
        over["quantization"] = setup.engine.quantization
    m = setup.model
    model = ModelSettings(preset=m.preset) if m.preset else ModelSettings(path=cast(str, m.model_dir))
    settings = Settings(
        model=model,
        dtype=setup.engine.dtype,
        device=setup.engine.device,
        pipelines=(PipelineSettings(PIPELINE_ID, setup.layout.hetero_config, setup.layout.pp_partition),),
    )
    _, _, worker = build_plan(WorkerOptions(settings, PIPELINE_ID, 0, engine_overrides=over))
    diff = [
        f"{k}={getattr(setup.engine, k)!r} (workers: {getattr(worker, k)!r})"
        for k in worker.__dataclass_fields__
        if k not in ("log_level", "profile_loop", "device_trace") and getattr(worker, k) != getattr(setup.engine, k)
    ]
    if diff:
        raise ConfigError(
            f"serve: the workers would run another engine: {', '.join(diff)}; in serve mode "
            "leave --gpu-memory-fraction, --max-num-batched-tokens and the async-step flags at their "
            "defaults (workers take only --max-num-seqs, --kv-tokens, --cuda-graphs, --kernel, "
            "--emulate-devices, --kv-cache-dtype and --quantization)"
        )
    return over


def worker_engine_flags(overrides: dict) -> list[str]:
    """``bin/worker`` flags for the engine fields of ``worker_engine_overrides`` beyond the sizes."""
    argv = ["--cuda-graphs"] if overrides.get("cuda_graphs") else []
    if "kernels" in overrides:
        for item in overrides["kernels"].describe().split():
            argv += ["--kernel", item]
    if overrides.get("kv_cache_dtype"):
        argv += ["--kv-cache-dtype", overrides["kv_cache_dtype"]]
    if overrides.get("quantization"):
        argv += ["--quantization", overrides["quantization"]]
    if overrides.get("emulate_devices"):
        argv += [
            "--emulate-devices",
            ",".join(f"{r}={lim.sms}:{lim.memory_gib}" for r, lim in overrides["emulate_devices"]),
        ]
    return argv


async def sleep_until(deadline: float, margin_s: float = SEND_MARGIN_S) -> None:
    """Return at ``time.monotonic()`` ≥ ``deadline``, a few tens of µs after it: an asyncio sleep until
    ``margin_s`` before it (asyncio timers wake a millisecond or more late: epoll's millisecond timeout, then
    the wake-up on busy cores), then ``time.sleep`` and a spin of the last 0.2 ms. The event loop is blocked
    for at most ``margin_s``, so a send is on time and other requests' token stamps are delayed by as much."""
    coarse = deadline - margin_s - time.monotonic()
    if coarse > 0:
        await asyncio.sleep(coarse)
    left = deadline - time.monotonic()
    if left > 2e-4:
        time.sleep(left - 2e-4)
    while time.monotonic() < deadline:
        pass


async def offer(
    url: str, items: list[_Item], timeout_s: float = 900.0, sent: dict[str, float] | None = None
) -> list[RequestTiming]:
    """Send each item through the async client at its arrival (:func:`sleep_until`); stamp every token as the
    client reads it.

    ``sent`` (when given) gets each request's time.monotonic() just before its XADD: how late the client's
    event loop woke for the arrival, which counts in the TTFT (timers wake up to a millisecond late)."""
    from hexgen.client import HexGenClient

    async with HexGenClient(url, block_ms=1000, timeout_s=timeout_s) as client:
        t0 = time.monotonic() + 0.05

        async def one(item: _Item) -> RequestTiming:
            arrival = t0 + item.offset
            await sleep_until(arrival)
            timing = RequestTiming(arrival)
            p = item.request.params
            stream = client.stream(
                prompt=item.text,
                request_id=item.request.request_id,
                temperature=0,
                max_new_tokens=p.max_new_tokens,
                ignore_eos=True,
            )
            if sent is not None:
                sent[item.request.request_id] = time.monotonic()  # the XADD is the stream's first await
            async for ev in stream:
                timing.tokens.extend([time.monotonic()] * len(ev.ids))
            if len(timing.tokens) != p.max_new_tokens:
                raise RuntimeError(
                    f"bench serve: request {item.request.request_id} got {len(timing.tokens)} "
                    f"tokens through Redis, expected {p.max_new_tokens}"
                )
            return timing

        return list(await asyncio.gather(*(one(i) for i in items)))


def run_redis_path(
    setup: BenchSetup,
    opts: ServeOptions,
    overrides: dict,
    warm: list[_Item],
    items: list[_Item],
    say=print,
    offer_fn=offer,
) -> tuple[Any, float]:
    """Start redis-server, head and workers for ``setup``'s layout, offer warm-up then ``items``; stop all.

    ``offer_fn(url, items)`` (a coroutine function) sends them; returns what it returned for ``items`` (by
    default the timings) and the seconds the pipeline took to form."""
    results, ready_s = run_served_paths(setup, opts, overrides, [("redis", offer_fn, warm, items)], say=say)
    return results["redis"], ready_s


def run_served_paths(
    setup: BenchSetup,
    opts: ServeOptions,
    overrides: dict,
    legs: list[tuple],
    say=print,
) -> tuple[dict[str, Any], float]:
    """Start redis-server, head and workers for ``setup``'s layout; for each leg ``(name, offer_fn, warm,
    items)`` in turn, offer its warm-up then its items; stop all. A leg named ``http`` gets the head's HTTP
    base URL (the head then serves HTTP on a free port), the others the Redis URL.

    Returns what each leg's ``offer_fn(target, items)`` returned for its items, and the seconds the pipeline
    took to form."""
    from hexgen.demo import (
        DemoOptions,
        Deployment,
        start_redis,
        wait_ready,
        write_config,
    )
    from hexgen.procs import free_port

    work_dir = opts.log_dir or tempfile.mkdtemp(prefix="hexgen-bench-serve-")
    os.makedirs(work_dir, exist_ok=True)
    dep = Deployment(work_dir)
    py = [sys.executable, "-m", "hexgen.cli"]
    layout, eng = setup.layout, setup.engine
    http = any(leg[0] == "http" for leg in legs)
    try:
        start_redis(dep)
        cfg = write_config(
            os.path.join(work_dir, "bench.toml"),
            dep.url,
            setup.model.model_dir,
            DemoOptions(layout.hetero_config, layout.pp_partition),
            dtype=eng.dtype,
            device=eng.device,
            preset=setup.model.preset or "",
            tokenizer=opts.tokenizer or "",
        )
        head = py + ["head", "--config", cfg]
        base_url = ""
        if http:
            port = free_port()
            head += ["--http-port", str(port)]
            base_url = f"http://127.0.0.1:{port}"
        dep.spawn("head", head)
        for st in reversed(layout.stages()):
            argv = [
                "worker",
                "--config",
                cfg,
                "--stage",
                str(st.index),
                "--drain-timeout",
                "30",
                "--max-num-seqs",
                str(overrides["max_num_seqs"]),
                "--kv-tokens",
                str(overrides["cpu_kv_tokens"]),
            ]
            argv += worker_engine_flags(overrides)
            if eng.device == "cuda":
                argv += ["--devices", ",".join(str(setup.devices[r] if setup.devices else r) for r in st.ranks)]
            dep.spawn(f"worker-stage{st.index}", py + argv)
        say(
            f"bench serve: redis-server on port {dep.port}, head{' (HTTP ' + base_url + ')' if http else ''} and "
            f"{layout.num_stages} worker(s) starting (logs in {work_dir})"
        )
        ready_s = wait_ready(dep, opts.ready_timeout_s)
        if http:
            wait_http_ready(base_url, opts.ready_timeout_s)
        results = {}
        for name, offer_fn, warm, items in legs:
            target = base_url if name == "http" else dep.url
            asyncio.run(offer_fn(target, warm))
            results[name] = asyncio.run(offer_fn(target, items))
            dep.check_alive()
        return results, ready_s
    finally:
        dep.shutdown()
        if opts.log_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)


def wait_http_ready(base_url: str, timeout_s: float) -> None:
    """Until the head's ``GET /ready`` answers 200."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(base_url + "/ready", timeout=5, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ConfigError(f"bench serve: {base_url}/ready did not answer 200 within {timeout_s:g}s")
        time.sleep(0.1)


def serve(setup: BenchSetup, opts: ServeOptions, say=print) -> dict:
    """Run the comparison; returns one JSON-able dict."""
    tok = serve_tokenizer(setup, opts)
    overrides = worker_engine_overrides(setup)
    cfg = setup.model.config()
    vocab = min(cfg.vocab_size, len(tok))  # prompts are random ids both the tokenizer and the model know
    shapes = mixed_shapes(opts.num_requests, opts.prompt_range, opts.output_range, opts.seed)
    offsets = poisson_offsets(len(shapes), opts.rate, opts.seed) if opts.rate else [0.0] * len(shapes)
    warm_shapes = mixed_shapes(4, (opts.prompt_range[0],) * 2, (8, 8), opts.seed + 99)
    direct_warm = build_items(tok, warm_shapes, vocab, 99, [0.0] * 4, "warm-d")
    direct = build_items(tok, shapes, vocab, opts.seed, offsets, "direct-")
    redis_warm = build_items(tok, warm_shapes, vocab, 99, [0.0] * 4, "warm-r")
    redis_items = build_items(tok, shapes, vocab, opts.seed, offsets, "redis-")
    http_warm = build_items(tok, warm_shapes, vocab, 99, [0.0] * 4, "warm-h")
    http_items = build_items(tok, shapes, vocab, opts.seed, offsets, "http-")
    context = setup.engine.max_model_len or cfg.max_position_embeddings
    for it in direct:
        if len(it.request.prompt_ids) + it.request.params.max_new_tokens > context:
            raise ConfigError(
                f"--prompt-range/--output-range: request {it.request.request_id} does not fit the model's context"
            )
    phases = [[(i.offset, i.request) for i in direct_warm], [(i.offset, i.request) for i in direct]]
    source = None
    if opts.direct_input == "text":
        source = TokenizingSource(
            phases,
            {i.request.request_id: i.text for i in direct_warm + direct},
            cast(str, serve_tokenizer_dir(setup, opts)),
        )  # serve_tokenizer checked it
    run = run_engine(setup.layout, setup.model, setup.engine, phases, setup.devices, source=source)
    direct_timings = [run.timings[i.request.request_id] for i in direct]
    direct_sum = summarize(direct_timings)
    direct_sum["run_wall_s"] = round(run.wall_s, 2)
    t0 = time.monotonic()
    sent: dict[str, float] = {}
    legs = [("redis", partial(offer, sent=sent), redis_warm, redis_items)]
    if opts.http:
        from hexgen.bench.http_load import offer_http

        legs.append(("http", partial(offer_http, sent=sent), http_warm, http_items))
    results, ready_s = run_served_paths(setup, opts, overrides, legs, say=say)
    timings = results["redis"]
    redis_sum = summarize(timings)
    redis_sum.update(client_lateness(redis_items, timings, sent))
    redis_sum.update(run_wall_s=round(time.monotonic() - t0, 2), pipeline_ready_s=round(ready_s, 2))
    paths = {"direct": direct_sum, "redis": redis_sum}
    extra: dict[str, Any] = {}
    if opts.http:
        http_timings = results["http"]
        http_sum = summarize(http_timings)
        http_sum.update(client_lateness(http_items, http_timings, sent))
        paths["http"] = http_sum
        extra["http_overhead"] = {
            "vs_direct": {**versus(http_sum, direct_sum), **paired_ttft_diff(direct_timings, http_timings)},
            "vs_redis": {
                **versus(http_sum, redis_sum),
                "ttft_paired_diff_p50_ms": _ms(
                    percentile([h.ttft - r.ttft for r, h in zip(timings, http_timings)], 50)
                ),
            },
        }
    return {
        "mode": "serve",
        "command": setup.command,
        **device_info(setup.engine),
        "layout": setup.layout.describe(),
        "workload": {
            "requests": opts.num_requests,
            "prompt_range": list(opts.prompt_range),
            "output_range": list(opts.output_range),
            "seed": opts.seed,
            "arrivals": f"poisson {opts.rate}/s" if opts.rate else "all at once",
            "direct_input": opts.direct_input,
            "prompt_tokens": sum(len(i.request.prompt_ids) for i in direct),
            "output_tokens": sum(i.request.params.max_new_tokens for i in direct),
        },
        "engine_config": {
            "max_num_seqs": setup.engine.max_num_seqs,
            "max_num_batched_tokens": setup.engine.max_num_batched_tokens,
            "cpu_kv_tokens": setup.engine.cpu_kv_tokens,
        },
        **paths,
        "overhead": {
            **overhead(direct_sum, redis_sum),
            **paired_ttft_diff(direct_timings, timings, [sent[i.request.request_id] for i in redis_items]),
        },
        **extra,
        "memory": memory_summary(run.ranks),
    }
