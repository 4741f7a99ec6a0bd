"""Stages on different hosts: network namespaces as hosts (tests/netns.py), one cable pulled mid-generation.

Hosts on one switch: ``hub`` (redis-server and the head), ``s0`` and ``s1`` (stage 0 and stage 1 of pipeline
p0), ``p1`` (both stages of pipeline p1) and ``cli`` (the client). Every HexGen connection (Redis, the
rendezvous store, the gloo groups) crosses veth interfaces with the hosts' own addresses; the test itself
watches Redis through a unix socket, which no HexGen process uses. p0's rendezvous address is chosen
automatically, p1's is given with ``--advertise-host``.

Then s1's cable is pulled while p0 is generating: p0's stage 0 sees stage 1's heartbeat lapse and exits
(watchdog), p1 takes p0's requests over after the lease and resumes them from the tokens already posted,
and the client gets one clean answer per request, equal to the offline engine's. Once the cable is back,
the stranded stage-1 rank sees that its generation is gone and exits, and p0 re-forms as a new generation.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest
import redis

from hexgen.wire import keys as C
from hexgen.wire.protocol import DoneEvent, TokenEvent, decode_work_item, parse_event
from tests import netns
from tests.redis_server import redis_server_binary
from tests.serving_harness import PipelineSpec, make_tiny_model, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINES = [PipelineSpec("p0", (1, 1), (2, 2)), PipelineSpec("p1", (1, 1), (2, 2))]
PROMPTS = ["hello world", "What is the capital of France?", "Once upon a time", "the tiny model",
           "Paris is", "tokens over Redis"]
N_TOKENS = 48
REDIS_PORT = 6379
LIMITS = dict(heartbeat_ttl_s=2, heartbeat_interval_s=0.3, lease_s=3.0, block_ms=500, result_ttl_s=600)


@dataclass
class Cluster:
    net: netns.Network
    dir: str
    url: str  # what HexGen uses: the hub's address
    sock: str  # what the test uses: redis-server's unix socket
    config: str = ""
    model_dir: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def redis(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=self.sock, socket_timeout=10)

    def spawn(self, host: str, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(os.path.join(self.dir, f"{name}.log"), "ab")
        env = {**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1", "HEXGEN_LOG_LEVEL": "INFO",
               "TQDM_DISABLE": "1"}
        env.pop("GLOO_SOCKET_IFNAME", None)  # HexGen must pick the interface itself
        proc = self.net.popen(host, argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.procs[name] = proc
        return proc

    def hexgen(self, host: str, name: str, *args: str) -> subprocess.Popen:
        return self.spawn(host, name, [sys.executable, "-m", "hexgen.cli", *args, "--config", self.config])

    def worker(self, host: str, pipeline: str, stage: int, *extra: str) -> subprocess.Popen:
        return self.hexgen(host, f"worker-{pipeline}-{stage}", "worker", "--pipeline", pipeline, "--stage",
                           str(stage), "--log-level", "INFO", "--drain-timeout", "20", *extra)

    def log(self, name: str, tail: int = 6000) -> str:
        try:
            with open(os.path.join(self.dir, f"{name}.log"), encoding="utf-8", errors="replace") as f:
                return f.read()[-tail:]
        except OSError:
            return ""

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{self.log(n, 3000)}" for n in self.procs)

    def pipeline(self, pid: str) -> dict[str, str]:
        with self.redis() as r:
            return {k.decode(): v.decode() for k, v in r.hgetall(C.pipeline_key(pid)).items()}

    def wait_ready(self, pipelines: list[str], generation: int = 1, timeout_s: float = 150.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            recs = [self.pipeline(p) for p in pipelines]
            if all(r.get("state") == "ready" and int(r.get("generation", 0)) >= generation for r in recs):
                return
            for name, proc in self.procs.items():
                if name != "client" and proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
            time.sleep(0.2)
        raise TimeoutError(f"{pipelines} not ready (generation {generation}) after {timeout_s}s: "
                           f"{[self.pipeline(p) for p in pipelines]}\n{self.logs()}")


def _start_redis(net: netns.Network, c: Cluster, binary: str) -> None:
    hub = net.hosts["hub"]
    c.spawn("hub", "redis", [binary, "--port", str(REDIS_PORT), "--bind", hub.address, "--unixsocket", c.sock,
                             "--unixsocketperm", "700", "--protected-mode", "no", "--save", "", "--appendonly", "no",
                             "--dir", c.dir])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with c.redis() as r:
                if r.ping():
                    return
        except (redis.ConnectionError, FileNotFoundError):
            time.sleep(0.1)
    raise RuntimeError(f"redis-server did not start in host hub:\n{c.log('redis')}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The hosts and deployment, shared by this module's tests (in file order: the cut comes last)."""
    why = netns.unavailable()
    if why:
        pytest.skip(why)
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed")
    netns.sweep_stale()
    tmp_path = tmp_path_factory.mktemp("netns")
    net = netns.Network()
    try:
        for name in ("hub", "s0", "s1", "p1", "cli"):
            net.add_host(name)
        hub = net.hosts["hub"]
        c = Cluster(net, str(tmp_path), f"redis://{hub.address}:{REDIS_PORT}/0", str(tmp_path / "redis.sock"))
        _start_redis(net, c, binary)
        c.model_dir = make_tiny_model(str(tmp_path / "model"))
        c.config = write_config(str(tmp_path / "deploy.toml"), c.url, c.model_dir, PIPELINES, **LIMITS)
        c.hexgen("hub", "head", "head", "--log-level", "INFO")
        c.worker("s1", "p0", 1, "--max-num-seqs", "3")
        c.worker("s0", "p0", 0, "--max-num-seqs", "3")  # automatic rendezvous host
        c.worker("p1", "p1", 1, "--max-num-seqs", "3")
        c.worker("p1", "p1", 0, "--max-num-seqs", "3", "--advertise-host", net.hosts["p1"].address)
        c.wait_ready(["p0", "p1"])
        yield c
    finally:
        net.close()


def held_by(r: redis.Redis, pipeline: str) -> dict[str, int]:
    """Request id -> result events posted, for the work entries ``pipeline`` holds now."""
    out = {}
    rows = r.xpending_range(C.work_stream("tiny"), C.PIPELINES_GROUP, "-", "+", 100,
                            consumername=C.PIPELINE_CONSUMER_PREFIX + pipeline)
    for row in rows:
        entry = r.xrange(C.work_stream("tiny"), row["message_id"], row["message_id"])
        if entry:
            req, _ = decode_work_item(entry[0][1])
            out[req.request_id] = r.xlen(C.result_stream(req.request_id))
    return out


def _client(c: Cluster, prefix: str, prompts: list[str], n: int) -> subprocess.Popen:
    argv = [sys.executable, "-m", "tests.netns_client", c.url, str(n), *prompts, "--prefix", prefix]
    with open(os.path.join(c.dir, f"{prefix}.jsonl"), "wb") as out, \
            open(os.path.join(c.dir, "client.log"), "ab") as err:
        proc = c.net.popen("cli", argv, cwd=REPO, stdout=out, stderr=err, env={**os.environ, "PYTHONPATH": REPO})
    c.procs["client"] = proc
    return proc


def _answers(c: Cluster, prefix: str, proc: subprocess.Popen, timeout_s: float) -> list[dict]:
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the client got no answer to every request within {timeout_s}s:\n{c.logs()}")
    assert proc.returncode == 0, c.log("client")
    with open(os.path.join(c.dir, f"{prefix}.jsonl"), encoding="utf-8") as f:
        return sorted((json.loads(line) for line in f), key=lambda a: int(a["id"][len(prefix):]))


def test_rendezvous_and_groups_cross_real_interfaces(cluster):
    c, hosts = cluster, cluster.net.hosts
    p0, p1 = c.pipeline("p0"), c.pipeline("p1")
    assert p0["rendezvous"].startswith(f"tcp://{hosts['s0'].address}:"), p0  # chosen automatically
    assert p1["rendezvous"].startswith(f"tcp://{hosts['p1'].address}:"), p1  # --advertise-host
    for name in ("worker-p0-0", "worker-p0-1", "worker-p1-0", "worker-p1-1"):  # not the hostname's 127.0.0.1
        assert "gloo uses interface eth0" in c.log(name, 200_000), c.log(name)
    with c.redis() as r:
        addrs = {w: r.hget(C.worker_key(w), "addr").decode() for w in ("p0:0", "p0:1", "p1:0", "p1:1")}
    assert addrs == {"p0:0": hosts["s0"].address, "p0:1": hosts["s1"].address, "p1:0": hosts["p1"].address,
                     "p1:1": hosts["p1"].address}
    answers = _answers(c, "warm", _client(c, "warm", PROMPTS[:4], 8), 120)
    assert [a.get("finish_reason") for a in answers] == ["length"] * 4, answers


def test_cut_link_mid_generation(cluster):
    c = cluster
    r = c.redis()
    client = _client(c, "cut", PROMPTS, N_TOKENS)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until p0 is mid-generation on some request
        held = held_by(r, "p0")
        if held and any(3 <= n < N_TOKENS // 2 for n in held.values()):
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"p0 never held a request mid-generation: {held_by(r, 'p0')}\n{c.logs()}")
    stranded = int(r.hget(C.worker_key("p0:1"), "pid"))
    old_instance = r.hget(C.worker_key("p0:1"), "instance")
    c.net.cut("s1")
    t_cut = time.monotonic()
    answers = _answers(c, "cut", client, 150)
    answered_s = time.monotonic() - t_cut

    assert [a["id"] for a in answers] == [f"cut{i}" for i in range(len(PROMPTS))]
    for a in answers:
        assert "error" not in a, a
        events = [parse_event(f) for _, f in r.xrange(C.result_stream(a["id"]))]
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        assert [e.seq for e in tokens] == list(range(N_TOKENS)), a["id"]  # no gap, no duplicate
        assert sum(isinstance(e, DoneEvent) for e in events) == 1 and isinstance(events[-1], DoneEvent)
        assert a["token_ids"] == [i for e in tokens for i in e.ids]
    assert r.xpending(C.work_stream("tiny"), C.PIPELINES_GROUP)["pending"] == 0

    from tests.test_serving_integration import offline_reference

    ref = offline_reference(c.model_dir, PIPELINES[0], [(p, False) for p in PROMPTS], N_TOKENS)
    assert [a["token_ids"] for a in answers] == [w.token_ids for w in ref]
    assert "peer group broken" in c.log("worker-p0-0", 200_000), "stage 0's watchdog did not fire"
    resumed = c.log("worker-p1-0", 200_000) + c.log("worker-p1-1", 200_000)
    assert "resuming at seq" in resumed, f"p1 resumed nothing (p0 held {held})"

    c.net.restore("s1")
    t_restore = time.monotonic()
    c.wait_ready(["p0"], generation=2, timeout_s=120)
    reformed_s = time.monotonic() - t_restore
    assert r.hget(C.worker_key("p0:1"), "instance") != old_instance
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{stranded}") and time.monotonic() < deadline:
        time.sleep(0.2)
    # the stranded rank is gone (its watchdog or, once the link is back, gloo's reset ended it: either is fine)
    assert not os.path.exists(f"/proc/{stranded}"), "the stranded stage-1 rank is still running"

    again = _answers(c, "after", _client(c, "after", PROMPTS[:4], 8), 120)
    assert [a.get("finish_reason") for a in again] == ["length"] * 4, again
    r.close()
    print(f"\nnetns: {len(held)} requests held by p0 at the cut; every answer in {answered_s:.1f}s after the "
          f"cut; p0 re-formed {reformed_s:.1f}s after the restore")
