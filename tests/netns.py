"""Hosts made of Linux network namespaces, for tests that need a real network between HexGen's processes.

:class:`Network` creates one private namespace that holds a bridge (the "switch") and, per host, a namespace
whose ``eth0`` is one end of a veth pair; the other end is a port of the bridge. Each host gets its own IPv4
address on one /24, so every TCP connection between hosts crosses real interfaces (veth, bridge, veth) and
nothing can take a 127.0.0.1 shortcut. The root namespace is never touched: no interface, route or address of
the machine running the tests changes, so several test runs (and other users) can share the machine.

``cut(host)`` / ``restore(host)`` set the host's switch port down / up: its link is gone both ways, as if its
cable were pulled (the host keeps its address, its sockets see no reset). ``popen(host, argv)`` starts a
process inside a host (``ip netns exec``). ``close()`` kills what was started, deletes every namespace (the
veth pairs and the bridge go with them) and is safe to call twice; names carry a random suffix so that a run
killed before its cleanup never collides with the next one (``sweep_stale`` removes such leftovers).

Needs root and iproute2 (``ip netns``); :func:`unavailable` says why not, for a clear pytest skip.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field

PREFIX = "hxnet"  # every namespace this module creates starts with it
SUBNET = "10.77.0"  # private to the switch namespace: it cannot clash with the machine's own networks


class NetnsError(RuntimeError):
    """An ``ip`` command failed while building or changing the test network."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def unavailable() -> str | None:
    """Why network namespaces cannot be used here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the tests as root)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    name = f"{PREFIX}probe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", name)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns add` does not work here: {e}"
    try:
        _ip("-n", name, "link", "add", "br0", "type", "bridge")
    except NetnsError as e:
        return f"cannot create a bridge in a network namespace: {e}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


def sweep_stale(max_age_s: float = 3600.0) -> None:
    """Delete namespaces of this module left by runs that were killed (older than ``max_age_s``)."""
    root = "/run/netns"
    try:
        names = os.listdir(root)
    except OSError:
        return
    now = time.time()
    for name in names:
        if name.startswith(PREFIX):
            try:
                age = now - os.stat(os.path.join(root, name)).st_mtime
            except OSError:
                continue
            if age > max_age_s:
                _ip("netns", "del", name, check=False)


@dataclass
class Host:
    name: str  # short name in the test ("hub", "s0", ...)
    netns: str  # namespace name (globally unique)
    address: str  # IPv4 address of its eth0
    port: str  # its port on the switch (inside the switch namespace)


@dataclass
class Network:
    """A switch and the hosts on it; see the module docstring."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    _switch: str = ""

    def __post_init__(self) -> None:
        self._switch = f"{PREFIX}{self.tag}sw"
        _ip("netns", "add", self._switch)
        try:
            _ip("-n", self._switch, "link", "set", "lo", "up")
            _ip("-n", self._switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self._switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def add_host(self, name: str) -> Host:
        """A new namespace with ``eth0`` at the next address, linked to the switch; its link is up."""
        index = len(self.hosts) + 1
        host = Host(name, f"{PREFIX}{self.tag}{name}", f"{SUBNET}.{index}", f"port{index}")
        self.hosts[name] = host  # registered first, so close() removes it even if a step below fails
        _ip("netns", "add", host.netns)
        _ip("-n", host.netns, "link", "set", "lo", "up")
        _ip("-n", self._switch, "link", "add", host.port, "type", "veth", "peer", "name", "eth0",
            "netns", host.netns)
        _ip("-n", self._switch, "link", "set", host.port, "master", "br0")
        _ip("-n", self._switch, "link", "set", host.port, "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        return host

    def cut(self, name: str) -> None:
        """Pull the host's cable: its switch port goes down (no packet in or out, no reset sent)."""
        _ip("-n", self._switch, "link", "set", self.hosts[name].port, "down")

    def restore(self, name: str) -> None:
        _ip("-n", self._switch, "link", "set", self.hosts[name].port, "up")

    def command(self, name: str, argv: list[str]) -> list[str]:
        """``argv`` run inside host ``name``."""
        return ["ip", "netns", "exec", self.hosts[name].netns, *argv]

    def popen(self, name: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` inside host ``name`` in its own process group; killed by :meth:`close`."""
        proc = subprocess.Popen(self.command(name, argv), start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def run(self, name: str, argv: list[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(name, argv), capture_output=True, text=True, timeout=timeout_s)

    def kill_all(self) -> None:
        """SIGKILL every process group started with :meth:`popen` (workers' rank processes included)."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        self.kill_all()
        for host in list(self.hosts.values()):
            _ip("netns", "del", host.netns, check=False)
        if self._switch:
            _ip("netns", "del", self._switch, check=False)
        self.hosts.clear()
        self._switch = ""

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
