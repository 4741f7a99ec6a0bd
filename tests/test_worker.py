"""The worker's options, layout checks, device choice, restart policy and CLI, and the shipped configs."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from hexgen.config import PRESETS, Layout
from hexgen.errors import ConfigError
from hexgen.wire.settings import (
    LimitSettings,
    ModelSettings,
    PipelineSettings,
    RedisSettings,
    Settings,
    load_settings,
)
from tests.waiting import wait_until
from workers.options import (
    EXIT_CONFIG,
    WorkerOptions,
    build_plan,
    device_indices,
    pick_pipeline,
)
from workers.supervisor import Worker

pytestmark = pytest.mark.timeout(60)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def settings(*pipes: PipelineSettings, device: str = "cpu", url: str = "redis://127.0.0.1:1/0") -> Settings:
    return Settings(model=ModelSettings(preset="tiny"), redis=RedisSettings(url), device=device, pipelines=pipes,
                    limits=LimitSettings(heartbeat_ttl_s=2, heartbeat_interval_s=0.2))


def test_pick_pipeline():
    one = settings(PipelineSettings("p0", (2, 1)))
    assert pick_pipeline(one, None) == "p0"
    two = settings(PipelineSettings("a", (1,)), PipelineSettings("b", (1,)))
    assert pick_pipeline(two, "b") == "b"
    with pytest.raises(ConfigError, match="pick one of a, b"):
        pick_pipeline(two, None)
    with pytest.raises(ConfigError, match="'c' is not in the config"):
        pick_pipeline(two, "c")
    with pytest.raises(ConfigError, match="no \\[\\[pipelines\\]\\]"):
        pick_pipeline(settings(), None)


def test_build_plan_validates_layout_and_stage():
    s = settings(PipelineSettings("p0", (2, 1), (4, 2)))
    model, layout, engine = build_plan(WorkerOptions(s, "p0", 1, engine_overrides={"max_num_seqs": 3}))
    assert model.preset == "tiny" and model.random_weights
    assert layout == Layout((2, 1), (4, 2)) and engine.max_num_seqs == 3 and engine.device == "cpu"
    with pytest.raises(ConfigError, match="--stage: 2 is not a stage"):
        build_plan(WorkerOptions(s, "p0", 2))
    bad = settings(PipelineSettings("p0", (3, 1), (4, 2)))  # tiny has 8 heads: TP 3 is invalid
    with pytest.raises(ConfigError, match="TP degree 3 is not valid"):
        build_plan(WorkerOptions(bad, "p0", 0))
    wrong_sum = settings(PipelineSettings("p0", (2, 1), (4, 4)))
    with pytest.raises(ConfigError, match="sums to 8 but the model has 6"):
        build_plan(WorkerOptions(wrong_sum, "p0", 0))


def test_device_indices():
    pipes = (PipelineSettings("p0", (2, 2), (3, 3), ("cuda:0", "cuda:1", "cuda:2", "cuda:3")),)
    cpu = WorkerOptions(settings(*pipes), "p0", 1)
    _, layout, _ = build_plan(cpu)
    assert device_indices(cpu, layout) == [None, None]
    gpu = WorkerOptions(settings(*pipes, device="cuda"), "p0", 1)
    assert device_indices(gpu, layout) == [2, 3]  # the config's devices of global ranks 2 and 3
    flag = WorkerOptions(settings(*pipes, device="cuda"), "p0", 1, devices=(5, 6))
    assert device_indices(flag, layout) == [5, 6]
    with pytest.raises(ConfigError, match="2 devices given|1 devices given"):
        device_indices(WorkerOptions(settings(*pipes, device="cuda"), "p0", 1, devices=(1,)), layout)


def test_restart_policy_backs_off_and_gives_up():
    s = settings(PipelineSettings("p0", (1,)))
    w = Worker(WorkerOptions(s, "p0", 0, max_restarts=3, restart_window_s=60))
    assert [w._restart_delay() for _ in range(4)] == [1.0, 2.0, 4.0, None]
    assert Worker(WorkerOptions(s, "p0", 0, restart=False))._restart_delay() is None


def test_shipped_configs_are_valid():
    demo = load_settings(os.path.join(REPO, "config", "demo.toml"))
    assert demo.pipelines[0].hetero_config == (3, 1) and demo.pipelines[0].pp_partition == (20, 10)
    big = load_settings(os.path.join(REPO, "config", "llama2-70b-hetero.example.toml"))
    p = big.pipelines[0]
    layout = Layout.build(PRESETS["llama-2-70b"], p.hetero_config, p.pp_partition)
    assert [s.ranks for s in layout.stages()] == [[0, 1, 2, 3], [4, 5], [6, 7]]
    assert big.dtype == "bfloat16" and big.device == "cuda"


def test_cli_reports_config_errors(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[model]\npreset = "tiny"\n[[pipelines]]\nid = "p0"\nhetero_config = [3]\n')
    out = subprocess.run([sys.executable, "-m", "hexgen.cli", "worker", "--config", str(cfg), "--stage", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == EXIT_CONFIG
    assert "TP degree 3 is not valid" in out.stderr


def test_worker_waits_for_redis_and_stops_cleanly_on_sigterm(tmp_path):
    """No Redis yet (a socket that hangs up on every connection): the rank keeps retrying registration;
    SIGTERM then ends the worker with status 0."""
    hang_up = socket.socket()
    hang_up.bind(("127.0.0.1", 0))
    hang_up.listen(16)
    hang_up.settimeout(0.2)
    attempts: list[float] = []
    stop = threading.Event()

    def refuse() -> None:
        while not stop.is_set():
            try:
                conn, _ = hang_up.accept()
            except OSError:
                continue
            attempts.append(time.monotonic())
            conn.close()

    threading.Thread(target=refuse, daemon=True).start()
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'[redis]\nurl = "redis://127.0.0.1:{hang_up.getsockname()[1]}/0"\n[model]\npreset = "tiny"\n'
                   '[[pipelines]]\nid = "p0"\nhetero_config = [1]\n')
    log = tmp_path / "worker.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "hexgen.cli", "worker", "--config", str(cfg), "--stage",
                                 "0", "--log-level", "INFO"], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: len(attempts) >= 2 or proc.poll() is not None, timeout=60,
                   what="the rank connected to Redis twice (it retries)")
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        stop.set()
        hang_up.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
