"""Small process helpers shared by the launcher, the registry, the demo, the benches and the tests.

:func:`spawn` starts a child in its own session with its output in a log file, so the child and everything it
starts (a worker's rank processes) form one process group that :meth:`Child.reap` can end whatever happens;
:func:`stop_in_order` asks groups of children to stop (SIGTERM), one group after another, each within a grace
period, and then reaps them all.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (whoever needs it binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Child:
    """A child process leading its own process group, its output in ``log``."""

    name: str
    proc: subprocess.Popen
    log: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 25) -> str:
        """The last lines of the child's log (progress bars' carriage returns read as line ends)."""
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return "".join(f.read().replace("\r", "\n").splitlines(True)[-lines:])
        except OSError:
            return ""

    def terminate(self, timeout_s: float) -> int:
        """SIGTERM, then wait up to ``timeout_s``; a child still running is killed. Returns the exit code
        (-9 when it had to be killed)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.reap()
            return -9

    def reap(self) -> None:
        """SIGKILL the child's whole process group and wait for the child."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)


def spawn(
    name: str, argv: Sequence[str], log: str, *, env: Mapping[str, str] | None = None, cwd: str | None = None
) -> Child:
    """Start ``argv`` in a new session, stdin closed, stdout and stderr appended to ``log``."""
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            list(argv),
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    return Child(name, proc, log)


def stop_in_order(groups: Sequence[Sequence[Child]], grace_s: float) -> None:
    """SIGTERM each group in turn and give it ``grace_s`` to exit; then reap every child's process group."""
    for group in groups:
        for c in group:
            if c.alive():
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for c in group:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    for group in groups:
        for c in group:
            c.reap()
