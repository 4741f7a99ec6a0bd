"""Deployments for the reliability and security tests: the serving harness's head and workers, on a Redis of
the test's choosing (ACL users, TLS, Sentinel, restartable), each role under its own URL."""
from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass

import redis

from hexgen.wire.redis_url import sync_client
from tests.serving_harness import Deployment, PipelineSpec, make_tiny_model, write_config

class _External:
    """Stands in for a server the test owns itself (a fixture stops it)."""

    def stop(self) -> None:
        pass


FAST_LIMITS = {"heartbeat_ttl_s": 2, "heartbeat_interval_s": 0.3, "lease_s": 2.0, "block_ms": 500}


@dataclass
class RoleDeployment(Deployment):
    """A :class:`Deployment` whose head and workers connect with their own URLs (``url`` is the
    inspector's: the head's role, or an admin URL)."""

    head_url: str = ""
    worker_url: str = ""

    def client(self) -> redis.Redis:
        return sync_client(self.url, socket_timeout=10)

    def start_head(self) -> None:
        self.spawn("head", "head", "--log-level", "INFO", "--redis-url", self.head_url)

    def start_worker(self, pipeline: str, stage: int, *extra: str) -> None:
        self.spawn(f"worker-{pipeline}-{stage}", "worker", "--pipeline", pipeline, "--stage", str(stage),
                   "--log-level", "INFO", "--drain-timeout", "30", "--redis-url", self.worker_url, *extra)

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{self.log(n)}" for n in self.procs)


def deploy(tmp_dir: str, server, pipelines: list[PipelineSpec], *, url: str, config_url: str = "", head_url: str = "",
           worker_url: str = "", worker_args: tuple[str, ...] = (), ready_timeout_s: float = 90.0,
           redis_options: dict[str, object] | None = None, **limits: object) -> RoleDeployment:
    """Model + config + head + one worker per stage, ready to serve. ``server`` (with a ``stop()``) is
    stopped with the deployment; None: the test stops its Redis itself. ``redis_options`` are written into
    the config's ``[redis]`` table beside ``url`` (``config_url``, default ``url``); ``url`` is the
    inspector's (``Deployment.client``) and, unless given, the head's and the workers'."""
    model_dir = os.path.join(tmp_dir, "model")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        make_tiny_model(model_dir)
    config_url = config_url or url
    config = write_config(os.path.join(tmp_dir, "deploy.toml"), config_url, model_dir, pipelines,
                          **{**FAST_LIMITS, **limits})
    if redis_options:
        with open(config, encoding="utf-8") as f:
            text = f.read()
        extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in redis_options.items())
        with open(config, "w", encoding="utf-8") as f:
            f.write(text.replace("[redis]\n", "[redis]\n" + extra, 1))
    dep = RoleDeployment(url, config, model_dir, tmp_dir, server or _External(), head_url=head_url or config_url,
                         worker_url=worker_url or config_url)
    try:
        dep.start_head()
        for p in pipelines:
            for stage in reversed(range(len(p.hetero_config))):
                dep.start_worker(p.id, stage, *worker_args)
        dep.wait_ready([p.id for p in pipelines], timeout_s=ready_timeout_s)
    except BaseException:
        dep.stop()
        raise
    return dep


async def wait_until(cond, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll ``cond()`` (sync or async) until truthy; returns its value, or raises AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)
