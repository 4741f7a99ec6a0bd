"""Start a throw-away redis-server for integration tests: free port, temp dir, no persistence."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

from hexgen.procs import free_port


class RedisServerError(RuntimeError):
    """redis-server could not be started."""


def redis_server_binary() -> str | None:
    """Path of redis-server (REDIS_SERVER env overrides), or None when it is not installed."""
    return os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # -NOAUTH: up, with requirepass
    except OSError:
        return False


class RedisServer:
    """A redis-server child process; ``start()`` returns its URL, ``stop()`` kills it and removes its dir."""

    def __init__(self, binary: str, extra_args: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.dir = ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, attempts: int = 5, timeout_s: float = 10.0) -> str:
        self.dir = tempfile.mkdtemp(prefix="hexgen-redis-")
        last = ""
        for _ in range(attempts):
            self.port = free_port()
            log = os.path.join(self.dir, f"redis-{self.port}.log")
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                 "--save", "", "--appendonly", "no", "--logfile", log, *self.extra_args],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _ping(self.port):
                    return self.url
                time.sleep(0.02)
            last = self._read_log(log)
            self._kill()  # port taken between probe and bind, or too slow: try another port
        self.stop()
        raise RedisServerError(f"redis-server did not start after {attempts} attempts: {last}")

    def _read_log(self, log: str) -> str:
        try:
            with open(log, encoding="utf-8", errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def stop(self) -> None:
        self._kill()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""

    def __enter__(self) -> "RedisServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
