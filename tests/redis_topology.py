"""Redis set-ups beyond one plain server, for reliability and security tests: a server on a fixed port that
can be killed and started again (on its AOF files, or wiped), TLS-only servers, servers with an ACL file,
and a master + replica + three sentinels on loopback.

Every process is a child of the test; :meth:`RedisNode.stop` / :meth:`SentinelSet.stop` kill them and
remove their folders.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from tests.redis_server import RedisServerError, redis_server_binary

READY = "Ready to accept connections"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary_or_skip() -> str:
    binary = redis_server_binary()
    if binary is None:
        import pytest

        pytest.skip("redis-server is not installed (apt-get install redis-server, or set REDIS_SERVER)")
    return binary


@dataclass
class RedisNode:
    """One redis-server (or sentinel) child on a fixed port. ``args`` are extra command-line options.

    ``start()`` may be called again after ``kill()``: same port, same folder (AOF restart), or a fresh empty
    folder with ``wipe=True`` (a new, empty server on the same address).
    """

    binary: str
    args: tuple[str, ...] = ()
    port: int = 0
    tls: bool = False  # the port is a TLS port (--port 0 --tls-port PORT)
    sentinel_conf: str = ""  # run as a sentinel with this config text
    dir: str = ""
    proc: subprocess.Popen | None = None
    starts: int = 0
    _root: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self._root = tempfile.mkdtemp(prefix="hexgen-redis-")
        self.dir = os.path.join(self._root, "data")
        os.makedirs(self.dir)

    @property
    def log_path(self) -> str:
        return os.path.join(self._root, f"redis-{self.port}-{self.starts}.log")

    def start(self, *, wipe: bool = False, timeout_s: float = 15.0) -> "RedisNode":
        if self.proc is not None and self.proc.poll() is None:
            raise RedisServerError(f"redis on port {self.port} is already running")
        if wipe:
            shutil.rmtree(self.dir, ignore_errors=True)
            os.makedirs(self.dir)
        self.starts += 1
        port_args = ("--port", "0", "--tls-port", str(self.port)) if self.tls else ("--port", str(self.port))
        cmd = [self.binary]
        if self.sentinel_conf:
            conf = os.path.join(self.dir, "sentinel.conf")
            if not os.path.exists(conf):  # sentinel rewrites its file: keep what it learnt across restarts
                with open(conf, "w", encoding="utf-8") as f:
                    f.write(self.sentinel_conf)
            cmd += [conf, "--sentinel"]
        cmd += [*port_args, "--bind", "127.0.0.1", "--dir", self.dir, "--logfile", self.log_path, *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RedisServerError(f"redis-server on port {self.port} exited {self.proc.returncode}: "
                                       f"{self.log()}")
            if READY in self.log() or (self.sentinel_conf and "Sentinel ID is" in self.log()):
                return self
            time.sleep(0.02)
        self.kill()
        raise RedisServerError(f"redis-server on port {self.port} not ready after {timeout_s}s: {self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the server and wait for it to exit (SIGKILL by default: no shutdown, no final fsync)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self._root, ignore_errors=True)

    def url(self, userinfo: str = "", query: str = "", db: int = 0) -> str:
        scheme = "rediss" if self.tls else "redis"
        auth = f"{userinfo}@" if userinfo else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}/{db}" + (f"?{query}" if query else "")


SERVICE = "hexgen-test"


@dataclass
class SentinelSet:
    """A master, one replica and three sentinels on loopback (quorum 2), fast failover settings."""

    binary: str
    down_after_ms: int = 1000
    failover_timeout_ms: int = 5000
    master: RedisNode = field(init=False)
    replica: RedisNode = field(init=False)
    sentinels: list[RedisNode] = field(init=False)

    def __post_init__(self) -> None:
        self.master = RedisNode(self.binary, ("--save", "", "--appendonly", "no"))
        self.replica = RedisNode(self.binary, ("--save", "", "--appendonly", "no", "--replicaof", "127.0.0.1",
                                               str(self.master.port)))
        conf = (f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n")
        self.sentinels = [RedisNode(self.binary, sentinel_conf=conf) for _ in range(3)]

    def start(self) -> "SentinelSet":
        try:
            self.master.start()
            self.replica.start()
            import redis

            r = redis.Redis(port=self.replica.port, socket_timeout=5)
            deadline = time.monotonic() + 15
            while r.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise RedisServerError(f"replica never synced: {self.replica.log()}")
                time.sleep(0.05)
            r.close()
            for s in self.sentinels:
                s.start()
            self.wait_sentinels_know_replica()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_sentinels_know_replica(self, timeout_s: float = 20.0) -> None:
        """Until every sentinel lists the replica and the other sentinels (needed before a failover)."""
        import redis

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ok = True
            for s in self.sentinels:
                c = redis.Redis(port=s.port, socket_timeout=2)
                try:
                    m = c.sentinel_master(SERVICE)
                    ok &= int(m.get("num-slaves", 0)) >= 1 and int(m.get("num-other-sentinels", 0)) >= 2
                finally:
                    c.close()
            if ok:
                return
            time.sleep(0.1)
        raise RedisServerError("sentinels did not discover the replica and each other")

    def master_port(self) -> int:
        """The master's port as the first sentinel reports it."""
        import redis

        c = redis.Redis(port=self.sentinels[0].port, socket_timeout=2)
        try:
            return int(c.sentinel_get_master_addr_by_name(SERVICE)[1])
        finally:
            c.close()

    def url(self, userinfo: str = "", query: str = "") -> str:
        """``redis+sentinel://`` URL naming the three sentinels and the service."""
        auth = f"{userinfo}@" if userinfo else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{auth}{hosts}/{SERVICE}/0" + (f"?{query}" if query else "")

    def stop(self) -> None:
        for node in [*self.sentinels, self.replica, self.master]:
            node.stop()
