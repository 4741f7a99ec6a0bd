"""``bin/head --auto-plan`` with two CPU agents (``bin/worker`` without ``--stage``) on a real redis-server:
plans on join, serves, re-plans when an agent is killed, serves again."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from hexgen.procs import Child, spawn, stop_in_order
from hexgen.wire import keys as C
from hexgen.wire.placement import Assignment, PlanRecord
from hexgen.wire.protocol import DoneEvent, ErrorEvent, parse_event, request_fields
from tests.serving_harness import REPO, make_tiny_model, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


class Procs:
    """Processes started in their own sessions, so a killed agent's orphans can be found and reaped."""

    def __init__(self, config: str, log_dir: str) -> None:
        self.config, self.log_dir = config, log_dir
        self.children: dict[str, Child] = {}
        self.procs: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HEXGEN_LOG_LEVEL": "INFO", "TQDM_DISABLE": "1"}
        child = spawn(name, [sys.executable, "-m", "hexgen.cli", *args, "--config", self.config, "--log-level",
                             "INFO"], os.path.join(self.log_dir, f"{name}.log"), env=env, cwd=REPO)
        self.children[name] = child
        self.procs[name] = child.proc
        return child.proc

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{c.tail(60)}" for name, c in self.children.items())

    def stop(self) -> None:
        stop_in_order([list(self.children.values())], 40.0)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(what: str, fn, procs: Procs, timeout_s: float = 120.0, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what} after {timeout_s}s\n{procs.logs()}")


def read_plan(r: redis.Redis) -> PlanRecord | None:
    fields = r.hgetall(C.PLAN_KEY)
    return PlanRecord.from_fields(fields) if fields and b"generation" in fields else None


def plan_for(r: redis.Redis, agents: set[str], after: int = 0) -> PlanRecord | None:
    plan = read_plan(r)
    return plan if plan and set(plan.agents) == agents and plan.generation > after and plan.pipelines else None


def latest(r: redis.Redis, agent: str) -> Assignment:
    rows = r.xrevrange(C.assign_stream(agent), count=1)
    return Assignment.from_fields(rows[0][1])


def check_assignments(r: redis.Redis, plan: PlanRecord) -> None:
    """Every agent's newest assignment is this plan's, and runs exactly the stages the plan gives it."""
    for agent, instance in plan.agents.items():
        a = latest(r, agent)
        assert a.generation == plan.generation and a.instance == instance
        want = {(pid, i) for pid, p in plan.pipelines.items() for i, st in enumerate(p["stages"])
                if st["agent"] == agent}
        assert {(role.pipeline, role.stage) for role in a.roles} == want
        for role in a.roles:
            p = plan.pipelines[role.pipeline]
            assert list(role.hetero_config) == p["hetero_config"] and list(role.pp_partition) == p["pp_partition"]


def all_ready(r: redis.Redis, plan: PlanRecord) -> bool:
    return all(r.hget(C.pipeline_key(pid), "state") == b"ready" for pid in plan.pipelines)


def generate(r: redis.Redis, request_id: str, procs: Procs) -> DoneEvent | ErrorEvent:
    r.xadd(C.REQUESTS_STREAM, request_fields("hello there", max_new_tokens=4, temperature=0.0,
                                             request_id=request_id))
    stream, last = C.result_stream(request_id), "0-0"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for _s, entries in r.xread({stream: last}, block=1000) or []:
            for eid, fields in entries:
                last = eid
                ev = parse_event(fields)
                if isinstance(ev, (DoneEvent, ErrorEvent)):
                    return ev
    raise TimeoutError(f"no done event for {request_id}\n{procs.logs()}")


def test_auto_plan_deploys_and_replans(tmp_path, redis_server):
    model = make_tiny_model(str(tmp_path / "model"))
    config = write_config(str(tmp_path / "deploy.toml"), redis_server, model, [], heartbeat_ttl_s=2,
                          heartbeat_interval_s=0.3, lease_s=3.0, block_ms=500)
    procs = Procs(config, str(tmp_path))
    r = redis.Redis.from_url(redis_server, socket_timeout=10)
    try:
        procs.spawn("head", "head", "--auto-plan", "--settle", "1.0", "--plan-time-budget", "2")
        procs.spawn("agent-a", "worker", "--node", "a", "--drain-timeout", "20")
        first = wait_for("no plan for agent a", lambda: plan_for(r, {"a"}), procs)
        check_assignments(r, first)

        procs.spawn("agent-b", "worker", "--node", "b", "--drain-timeout", "20")  # join: a re-plan
        both = wait_for("no plan for agents a and b", lambda: plan_for(r, {"a", "b"}, first.generation), procs)
        check_assignments(r, both)
        wait_for("pipelines not ready", lambda: all_ready(r, both), procs)
        kept = set(first.pipelines) & set(both.pipelines)
        for pid in kept:  # an unchanged pipeline keeps running through the re-plan (same rank process)
            assert both.pipelines[pid]["signature"] == first.pipelines[pid]["signature"]
        done = generate(r, "req-1", procs)
        assert isinstance(done, DoneEvent) and done.completion_tokens >= 1, done

        procs.procs["agent-b"].kill()  # leave without a word: its heartbeat expires
        procs.procs["agent-b"].wait()
        after = wait_for("no re-plan after agent b died",
                         lambda: plan_for(r, {"a"}, both.generation), procs)
        check_assignments(r, after)
        assert all(st["agent"] == "a" for p in after.pipelines.values() for st in p["stages"])
        wait_for("agent b's orphaned workers did not drain", lambda: not group_alive(procs.procs["agent-b"].pid),
                 procs, timeout_s=60)
        wait_for("pipelines not ready after the re-plan", lambda: all_ready(r, after), procs)
        done = generate(r, "req-2", procs)
        assert isinstance(done, DoneEvent) and done.completion_tokens >= 1, done

        procs.procs["agent-a"].send_signal(signal.SIGTERM)  # a graceful leave drains and exits 0
        assert procs.procs["agent-a"].wait(60) == 0, procs.logs()
        assert not r.exists(C.agent_key("a"))
    finally:
        r.close()
        procs.stop()
