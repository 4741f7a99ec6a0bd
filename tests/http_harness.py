"""A test deployment whose head also serves HTTP (``bin/head --http-port``): redis-server, the head and,
unless told otherwise, one worker per stage, all real processes (tests/serving_harness.py)."""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import httpx

from tests.serving_harness import Deployment, PipelineSpec, write_config

ONE_STAGE = [PipelineSpec("p0", (1,), (4,))]
CONTEXT = 2048  # the tiny model's context: room for requests long enough to cancel mid-way


def make_model(path: str) -> str:
    """tests/serving_harness.py's tiny random Llama with a longer context (CONTEXT tokens)."""
    from tests.models import llama_config, save_llama
    from tests.tiny_tokenizer import build_tiny_tokenizer

    return save_llama(path, llama_config(max_position_embeddings=CONTEXT), tokenizer=build_tiny_tokenizer())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class HttpDeployment:
    dep: Deployment
    base_url: str

    @property
    def url(self) -> str:
        return self.dep.url

    def __getattr__(self, name: str):
        return getattr(self.dep, name)

    def stop(self) -> None:
        self.dep.stop()


def wait_http(dep: Deployment, base_url: str, path: str = "/health", timeout_s: float = 60.0) -> None:
    """Until ``GET path`` answers 200 (the head's HTTP server is up)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        proc = dep.procs.get("head")
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"head exited with {proc.returncode}:\n{dep.log('head')}")
        try:
            r = httpx.get(base_url + path, timeout=2)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.1)
    raise TimeoutError(f"{base_url}{path} not up after {timeout_s}s ({last}):\n{dep.log('head')}")


def start_http_deployment(tmp_dir: str, pipelines: list[PipelineSpec] | None = None, *, api_key: str = "",
                          workers: bool = True, model_dir: str | None = None, **limits: object) -> HttpDeployment:
    """redis-server + tiny model (or ``model_dir``) + config + ``head --http-port`` (+ workers, waited until
    ready)."""
    import pytest

    from tests.redis_server import RedisServer, redis_server_binary

    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed")
    pipelines = ONE_STAGE if pipelines is None else pipelines
    server = RedisServer(binary)
    url = server.start()
    model_dir = model_dir or make_model(os.path.join(tmp_dir, "model"))
    limits = {"heartbeat_ttl_s": 2, "heartbeat_interval_s": 0.3, "lease_s": 3.0, "block_ms": 500, **limits}
    config = write_config(os.path.join(tmp_dir, "deploy.toml"), url, model_dir, pipelines, **limits)
    dep = Deployment(url, config, model_dir, tmp_dir, server)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    try:
        extra = ("--api-key", api_key) if api_key else ()
        dep.spawn("head", "head", "--log-level", "INFO", "--http-port", str(port), *extra)
        if workers:
            for p in pipelines:
                for stage in reversed(range(len(p.hetero_config))):
                    dep.start_worker(p.id, stage)
            dep.wait_ready([p.id for p in pipelines])
            wait_http(dep, base_url, "/ready")
        else:
            wait_http(dep, base_url, "/health")
    except BaseException:
        dep.stop()
        raise
    return HttpDeployment(dep, base_url)
