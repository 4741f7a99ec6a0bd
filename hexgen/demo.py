"""``hexgen demo``: a whole deployment on this machine, then a few chat requests streamed to the terminal.

It starts a private redis-server on a free port, a head serving HTTP (it prints the dashboard's address;
``/metrics`` and the OpenAI routes are there too), and one asymmetric pipeline of the embedded
SmolLM2-135M-Instruct on CPU (default: stage 0 with TP 3 holding 20 layers, stage 1 with TP 1 holding 10,
one ``hexgen worker`` per stage), sends the questions concurrently through :class:`hexgen.client.HexGenClient`
and prints each answer as it streams. It ends by listing redis-cli commands to try (``--keep`` leaves the
deployment up for them until Ctrl-C) and shuts everything down: workers drain on SIGTERM, then the head,
then redis-server; anything still alive after its grace period is killed, so no process outlives the demo.
Every child runs in its own session, so Ctrl-C reaches only the demo, which then shuts down in order.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from hexgen.errors import HexGenError
from hexgen.procs import Child, free_port, spawn, stop_in_order
from hexgen.wire import keys as C

DEFAULT_QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for learning to code.",
)
PIPELINE_ID = "demo"


class DemoError(HexGenError):
    """The demo could not start (redis-server missing, a process died, the pipeline did not form)."""


@dataclass(frozen=True)
class DemoOptions:
    hetero_config: tuple[int, ...] = (3, 1)
    pp_partition: tuple[int, ...] = (20, 10)
    questions: tuple[str, ...] = DEFAULT_QUESTIONS
    max_new_tokens: int = 64
    model_dir: str | None = None  # default: the embedded SmolLM2 (fetched and converted once)
    keep: bool = False  # stay up after the answers until Ctrl-C
    http_port: int = 0  # the head's HTTP port (dashboard, /metrics, /v1); 0: a free one
    ready_timeout_s: float = 300.0
    log_dir: str | None = None  # default: a temporary folder, removed at the end


@dataclass
class Deployment:
    """The demo's processes; :meth:`shutdown` stops them in order and reaps every one."""

    work_dir: str
    port: int = 0
    children: list[Child] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def spawn(self, name: str, argv: list[str]) -> Child:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HEXGEN_LOG_LEVEL": "INFO", "TQDM_DISABLE": "1"}
        child = spawn(name, argv, os.path.join(self.work_dir, f"{name}.log"), env=env)
        self.children.append(child)
        return child

    def check_alive(self) -> None:
        for c in self.children:
            if c.proc.poll() is not None:
                raise DemoError(f"{c.name} exited with code {c.proc.returncode}; last lines of {c.log}:\n{c.tail()}")

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Workers first (they drain), then the head, then redis-server; kill whatever overstays."""
        order = (
            [c for c in self.children if c.name.startswith("worker")]
            + [c for c in self.children if c.name == "head"]
            + [c for c in self.children if c.name == "redis-server"]
        )
        stop_in_order((order[:-2], order[-2:-1], order[-1:]), grace_s)


def start_redis(dep: Deployment, timeout_s: float = 10.0, extra_args: tuple[str, ...] = ()) -> None:
    """A private redis-server for ``dep`` on a free port (``dep.port``; ``extra_args`` go to the server)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise DemoError(
            "redis-server is not on PATH; install it (Debian/Ubuntu: sudo apt-get install "
            "redis-server, macOS: brew install redis) or run `make redis`"
        )
    import redis

    for _ in range(5):
        dep.port = free_port()
        child = dep.spawn(
            "redis-server",
            [
                binary,
                "--port",
                str(dep.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                dep.work_dir,
                "--save",
                "",
                "--appendonly",
                "no",
                *extra_args,
            ],
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and child.proc.poll() is None:
            try:
                if redis.Redis(port=dep.port, socket_timeout=1).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        child.proc.kill()
        child.proc.wait()
        dep.children.remove(child)  # the port was taken in the meantime: try another
    raise DemoError(f"redis-server did not start; see {child.log}:\n{child.tail()}")


def write_config(
    path: str,
    url: str,
    model_dir: str | None,
    opts: DemoOptions,
    dtype: str = "fp32",
    device: str = "cpu",
    *,
    preset: str = "",
    tokenizer: str = "",
) -> str:
    """The deployment's TOML: the model from ``model_dir``, or a ``preset`` (random weights) whose head
    tokenizes with ``tokenizer`` (a directory)."""
    model = f'preset = "{preset}"' if preset else f'path = "{model_dir}"'
    if tokenizer:
        model += f'\ntokenizer = "{tokenizer}"'
    text = f"""# written by `hexgen demo`
dtype = "{dtype}"
device = "{device}"

[redis]
url = "{url}"

[model]
name = "{C.DEFAULT_MODEL}"
{model}

[[pipelines]]
id = "{PIPELINE_ID}"
hetero_config = {list(opts.hetero_config)}
pp_partition = {list(opts.pp_partition)}

[limits]
heartbeat_ttl_s = 5
heartbeat_interval_s = 1.0
lease_s = 15.0
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def wait_ready(dep: Deployment, timeout_s: float) -> float:
    import redis

    r = redis.Redis(port=dep.port, socket_timeout=5)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < timeout_s:
            dep.check_alive()
            if r.hget(C.pipeline_key(PIPELINE_ID), "state") == b"ready":
                return time.monotonic() - t0
            time.sleep(0.2)
    finally:
        r.close()
    raise DemoError(f"pipeline {PIPELINE_ID!r} did not form within {timeout_s:.0f}s; logs in {dep.work_dir}")


async def ask_all(url: str, questions: tuple[str, ...], max_new_tokens: int, out=sys.stdout) -> list[dict]:
    """Send every question at once; print the answers in order, each streaming as soon as its turn comes."""
    from hexgen.client import HexGenClient

    async with HexGenClient(url, block_ms=1000, timeout_s=600) as client:
        streams = [
            client.stream(messages=[{"role": "user", "content": q}], max_new_tokens=max_new_tokens, temperature=0)
            for q in questions
        ]
        queues: list[asyncio.Queue] = [asyncio.Queue() for _ in streams]
        stats: list[dict[str, Any]] = [{"id": s.id, "tokens": 0, "first": None, "end": None} for s in streams]
        t0 = time.monotonic()

        async def pump(i: int) -> None:
            try:
                async for ev in streams[i]:
                    stats[i]["tokens"] += len(ev.ids)
                    stats[i]["first"] = stats[i]["first"] or time.monotonic() - t0
                    await queues[i].put(ev.text)
            finally:
                stats[i]["end"] = time.monotonic() - t0
                await queues[i].put(None)

        pumps = [asyncio.create_task(pump(i)) for i in range(len(streams))]
        bold, plain = ("\033[1m", "\033[0m") if out.isatty() else ("", "")
        for i, q in enumerate(questions):
            out.write(f"\n{bold}[{i + 1}] {q}{plain}\n")
            while (text := await queues[i].get()) is not None:
                out.write(text)
                out.flush()
            out.write("\n")
        for p in pumps:
            await p  # re-raises a request's error
        for s, st in zip(streams, stats):
            st["finish_reason"] = s.done.finish_reason if s.done else "?"
        return stats


def print_try_it(port: int, out=sys.stdout, http: str = "") -> None:
    cli = f"redis-cli -p {port}"
    if http:
        out.write(f"""
Dashboard (the pipeline's stages, live figures, a chat box): {http}/
  curl {http}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"messages":[{{"role":"user","content":"Hi!"}}],"stream":true}}'
  curl {http}/metrics
""")
    out.write(f"""
Try it with redis-cli while the demo runs (hexgen demo --keep):
  {cli} XADD {C.REQUESTS_STREAM} '*' prompt "The capital of Italy is" max_new_tokens 16 id try-1
  {cli} XREAD BLOCK 0 STREAMS {C.result_stream("try-1")} 0
  {cli} XADD {C.REQUESTS_STREAM} '*' messages '[{{"role":"user","content":"Tell me a long story"}}]' \\
        max_new_tokens 400 id try-2
  {cli} XADD {C.CANCEL_STREAM} '*' {C.CANCEL_ID_FIELD} try-2
  {cli} XREVRANGE {C.result_stream("try-2")} + - COUNT 1
  {cli} HGETALL {C.pipeline_key(PIPELINE_ID)}
  {sys.executable} -m hexgen.cli status --redis-url redis://127.0.0.1:{port}/0
""")
    out.flush()


def run_demo(opts: DemoOptions, say=print) -> int:
    """Run the demo; returns the exit status."""
    from hexgen.cli.fetch import ensure_default_model
    from hexgen.config import Layout, ModelConfig

    model_dir = opts.model_dir or ensure_default_model()
    layout = Layout.build(ModelConfig.from_dir(model_dir), opts.hetero_config, opts.pp_partition)
    work_dir = opts.log_dir or tempfile.mkdtemp(prefix="hexgen-demo-")
    os.makedirs(work_dir, exist_ok=True)
    dep = Deployment(work_dir)
    py = [sys.executable, "-m", "hexgen.cli"]
    try:
        start_redis(dep)
        say(f"redis-server on port {dep.port} (logs of every process in {work_dir})")
        cfg = write_config(os.path.join(work_dir, "demo.toml"), dep.url, model_dir, opts)
        http_port = opts.http_port or free_port()
        http = f"http://127.0.0.1:{http_port}"
        dep.spawn("head", py + ["head", "--config", cfg, "--http-host", "127.0.0.1", "--http-port", str(http_port)])
        say(f"head with HTTP on; dashboard: {http}/")
        for st in reversed(layout.stages()):  # stages may start in any order
            dep.spawn(
                f"worker-stage{st.index}",
                py + ["worker", "--config", cfg, "--stage", str(st.index), "--drain-timeout", "20"],
            )
            say(f"worker stage {st.index}: TP {st.tp}, layers {st.layer_start}-{st.layer_end - 1}, ranks {st.ranks}")
        say(f"waiting for pipeline {PIPELINE_ID!r} ({layout.describe()}) to form and load its weights ...")
        ready_s = wait_ready(dep, opts.ready_timeout_s)
        say(f"ready after {ready_s:.1f}s; asking {len(opts.questions)} questions at once")
        t0 = time.monotonic()
        stats = asyncio.run(ask_all(dep.url, opts.questions, opts.max_new_tokens))
        wall = time.monotonic() - t0
        total = sum(s["tokens"] for s in stats)
        say(
            f"\n{total} tokens in {wall:.1f}s ({total / wall:.1f} tokens/s over {len(stats)} concurrent "
            f"requests; first token after {min(s['first'] or wall for s in stats):.2f}s); finish reasons: "
            f"{', '.join(s['finish_reason'] for s in stats)}"
        )
        print_try_it(dep.port, http=http)
        if opts.keep:
            say(f"dashboard: {http}/ -- serving until Ctrl-C ...")
            while True:
                dep.check_alive()
                time.sleep(1.0)
        return 0
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130
    finally:
        say("shutting down: workers drain, then the head and redis-server stop")
        dep.shutdown()
        if opts.log_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
