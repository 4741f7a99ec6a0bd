"""`hexgen demo` plumbing: private redis-server, config it writes, clean shutdown with nothing left running.

(The full demo loads SmolLM2 on four CPU processes, too slow for the suite: run `bin/hexgen demo`.)"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import redis

from hexgen.config import Layout, ModelConfig
from hexgen import demo
from hexgen.wire.settings import load_settings
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)
SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is as good as gone
        return f.read().split(")")[-1].split()[0] != "Z"


def test_private_redis_and_shutdown_leave_nothing_running(tmp_path):
    if demo.shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    dep = demo.Deployment(str(tmp_path))
    demo.start_redis(dep)
    with redis.Redis(port=dep.port) as r:
        assert r.ping()
    stubborn = dep.spawn("worker-stage0", [sys.executable, "-c", "import signal, time; "
                                           "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready'); "
                                           "time.sleep(60)"])
    wait_until(lambda: "ready" in Path(stubborn.log).read_text(), timeout=20, what="the child started")
    pids = [c.proc.pid for c in dep.children]
    dep.shutdown(grace_s=0.5)
    assert not any(alive(p) for p in pids)
    assert stubborn.proc.returncode == -9


def test_missing_redis_server_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(demo.shutil, "which", lambda _name: None)
    with pytest.raises(demo.DemoError, match="redis-server is not on PATH; install it"):
        demo.start_redis(demo.Deployment(str(tmp_path)))


def test_written_config_is_a_valid_asymmetric_deployment(tmp_path):
    opts = demo.DemoOptions()
    path = demo.write_config(str(tmp_path / "d.toml"), "redis://127.0.0.1:1234/0", str(tmp_path), opts)
    s = load_settings(path)
    assert s.redis.url == "redis://127.0.0.1:1234/0" and s.device == "cpu"
    p = s.pipeline(demo.PIPELINE_ID)
    layout = Layout.build(SMOLLM2, p.hetero_config, p.pp_partition)
    assert len(set(layout.hetero_config)) > 1 and len(set(layout.pp_partition)) > 1  # asymmetric, uneven
