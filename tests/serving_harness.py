"""A real deployment for integration tests: redis-server, a head and worker processes on a tiny random Llama.

Everything runs as separate processes started through the real command line (``python -m hexgen.cli head``
/ ``worker``), with short heartbeat and lease settings; :meth:`Deployment.stop` drains and reaps them all.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import redis

from hexgen.procs import Child, spawn
from hexgen.wire import keys as C
from tests.redis_server import RedisServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tiny_model(path: str, **config: object) -> str:
    """A random 4-layer Llama (8 q / 2 kv heads, vocab 320; ``config`` overrides the LlamaConfig) with the
    offline tiny tokenizer, saved to ``path``."""
    from tests.models import llama_config, save_llama
    from tests.tiny_tokenizer import build_tiny_tokenizer

    return save_llama(path, llama_config(**config), tokenizer=build_tiny_tokenizer())


@dataclass
class PipelineSpec:
    id: str
    hetero_config: tuple[int, ...]
    pp_partition: tuple[int, ...]
    tp_ratio: tuple[tuple[int, ...], ...] = ()  # per-rank shares of each stage; (): even shards


def write_config(path: str, url: str, model_dir: str, pipelines: list[PipelineSpec], **limits: object) -> str:
    lines = [f'[redis]\nurl = "{url}"\n', f'[model]\nname = "tiny"\npath = "{model_dir}"\n']
    for p in pipelines:
        lines.append(f'[[pipelines]]\nid = "{p.id}"\nhetero_config = {list(p.hetero_config)}\n'
                     f'pp_partition = {list(p.pp_partition)}\n'
                     + (f'tp_ratio = {[list(r) for r in p.tp_ratio]}\n' if p.tp_ratio else ''))
    lines.append("[limits]\n" + "".join(f"{k} = {v!r}\n" for k, v in limits.items()))
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


@dataclass
class Deployment:
    """Handles on the processes of one test deployment."""

    url: str
    config: str
    model_dir: str
    log_dir: str
    server: RedisServer
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    children: dict[str, Child] = field(default_factory=dict)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=10)

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HEXGEN_LOG_LEVEL": "INFO", "TQDM_DISABLE": "1"}
        child = spawn(name, [sys.executable, "-m", "hexgen.cli", *args, "--config", self.config],
                      os.path.join(self.log_dir, f"{name}.log"), env=env, cwd=REPO)
        self.children[name] = child
        self.procs[name] = child.proc
        return child.proc

    def start_head(self) -> None:
        self.spawn("head", "head", "--log-level", "INFO")

    def start_worker(self, pipeline: str, stage: int, *extra: str) -> None:
        self.spawn(f"worker-{pipeline}-{stage}", "worker", "--pipeline", pipeline, "--stage", str(stage),
                   "--log-level", "INFO", "--drain-timeout", "30", *extra)

    def wait_ready(self, pipelines: list[str], timeout_s: float = 90.0, generation: int = 1) -> None:
        r = self.client()
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                states = [r.hmget(C.pipeline_key(p), ["state", "generation"]) for p in pipelines]
                if all(s == b"ready" and g is not None and int(g) >= generation for s, g in states):
                    return
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")
                time.sleep(0.1)
        finally:
            r.close()
        raise TimeoutError(f"pipelines {pipelines} not ready after {timeout_s}s:\n" +
                           "\n".join(f"--- {n}\n{self.log(n)}" for n in self.procs))

    def log(self, name: str, tail: int = 4000) -> str:
        try:
            with open(os.path.join(self.log_dir, f"{name}.log"), encoding="utf-8", errors="replace") as f:
                return f.read()[-tail:]
        except OSError:
            return ""

    def rank_pid(self, pipeline: str, rank: int) -> int:
        r = self.client()
        try:
            return int(r.hget(C.worker_key(f"{pipeline}:{rank}"), "pid"))
        finally:
            r.close()

    def terminate(self, name: str, timeout_s: float = 60.0) -> int:
        """SIGTERM one process and wait for it; returns its exit code (killed: -9)."""
        return self.children[name].terminate(timeout_s)

    def stop(self) -> None:
        for name in [n for n in self.procs if n.startswith("worker")] + ["head"]:
            if name in self.procs:
                self.terminate(name, 40.0)
        for child in self.children.values():  # a rank orphaned by a killed worker is in its group
            child.reap()
        self.server.stop()


def start_deployment(tmp_dir: str, pipelines: list[PipelineSpec], worker_args: tuple[str, ...] = (),
                     model_config: dict[str, object] | None = None, **limits: object) -> Deployment:
    """redis-server + model (``model_config``: LlamaConfig overrides) + config + head + one worker per stage
    of each pipeline, ready to serve."""
    from tests.redis_server import redis_server_binary

    binary = redis_server_binary()
    if binary is None:
        import pytest

        pytest.skip("redis-server is not installed")
    server = RedisServer(binary)
    url = server.start()
    model_dir = make_tiny_model(os.path.join(tmp_dir, "model"), **(model_config or {}))
    limits = {"heartbeat_ttl_s": 2, "heartbeat_interval_s": 0.3, "lease_s": 3.0, "block_ms": 500, **limits}
    config = write_config(os.path.join(tmp_dir, "deploy.toml"), url, model_dir, pipelines, **limits)
    dep = Deployment(url, config, model_dir, tmp_dir, server)
    try:
        dep.start_head()
        for p in pipelines:
            for stage in reversed(range(len(p.hetero_config))):  # later stages first: any order works
                dep.start_worker(p.id, stage, *worker_args)
        dep.wait_ready([p.id for p in pipelines])
    except BaseException:
        dep.stop()
        raise
    return dep
