"""The cluster description: nodes of GPUs, the links inside each node and the network between nodes.

Read from a TOML file (examples in config/clusters/)::

    [network]                      # between nodes (default: 10 Gbit/s, 50 us)
    bandwidth_gbps = 100           # Gbit/s
    latency_us = 10
    [devices.MyGPU]                # optional: a new device or an override (base = a built-in to start from)
    base = "A6000"
    memory_gib = 48
    mem_bandwidth_gbs = 768        # GB/s
    peak_tflops = 155
    [[nodes]]
    name = "a6000-box"
    gpu = "A6000"
    count = 4
    memory_gib = 48                # optional per-node override of the device memory
    link_bandwidth_gbs = 32        # GB/s GPU<->GPU inside the node (default by device, see INTRA_DEFAULTS)
    link_latency_us = 5

Link bandwidths are *effective* rates (what an NCCL all-reduce or send/recv achieves, its "bus bandwidth"), not
signalling rates; the cost model uses them as given.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from hexgen.errors import ConfigError
from hexgen.planner.devices import DEVICE_SPECS, GB, TFLOPS, DeviceSpec, GiB, device_spec


@dataclass(frozen=True)
class Link:
    """A point-to-point or collective link: effective bandwidth (bytes/s) and per-message latency (s)."""

    bandwidth: float  # bytes/s
    latency: float  # s

    def __post_init__(self) -> None:
        b, lat = self.bandwidth, self.latency
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not (0 < b < math.inf):
            raise ConfigError(f"link bandwidth: {b!r} must be a finite number > 0 (bytes/s)")
        if isinstance(lat, bool) or not isinstance(lat, (int, float)) or not (0 <= lat < math.inf):
            raise ConfigError(f"link latency: {lat!r} must be a finite number >= 0 (seconds)")


# Default GPU<->GPU link inside a node, by device. NVLink rates are effective all-reduce bus bandwidths,
# about 80% of the per-direction NVLink rate: H100/H200 NVLink4 450 GB/s/dir -> 360; A100 NVLink3 300 -> 240;
# V100 NVLink2 150 -> 120. PCIe 4.0 x16 is 32 GB/s/dir, ~25 effective; the T4 is PCIe 3.0 (16 -> ~12).
NVLINK_H100 = Link(360 * GB, 5e-6)
NVLINK_A100 = Link(240 * GB, 5e-6)
NVLINK_V100 = Link(120 * GB, 5e-6)
PCIE4 = Link(25 * GB, 10e-6)
PCIE3 = Link(12 * GB, 10e-6)
# A CPU "node" exchanges tensors through shared memory (gloo): about the host's copy bandwidth.
HOST_SHM = Link(10 * GB, 20e-6)
INTRA_DEFAULTS: dict[str, Link] = {
    "H100": NVLINK_H100,
    "H200": NVLINK_H100,
    "A100-40GB": NVLINK_A100,
    "A100-80GB": NVLINK_A100,
    "V100": NVLINK_V100,
    "T4": PCIE3,
    "CPU": HOST_SHM,
}
# Between nodes when [network] is absent: 10 Gbit/s Ethernet (TCP), 50 us.
DEFAULT_INTER = Link(10e9 / 8, 50e-6)

MAX_COUNT = 1024


def default_intra(dev: DeviceSpec) -> Link:
    """The default intra-node link of a device: NVLink for SXM parts (H100/H200/A100/V100), PCIe otherwise."""
    return INTRA_DEFAULTS.get(dev.name, PCIE4)


@dataclass(frozen=True)
class Node:
    """One host: ``count`` GPUs of one type and the link between them."""

    name: str
    device: DeviceSpec
    count: int  # GPUs on this node
    intra: Link  # GPU<->GPU inside the node (NVLink / PCIe)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"node name: {self.name!r} must be a non-empty string")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or not 1 <= self.count <= MAX_COUNT:
            raise ConfigError(f"node {self.name} count: {self.count!r} must be an integer in [1, {MAX_COUNT}]")


@dataclass(frozen=True)
class Gpu:
    """One device of the cluster: its node, its index on that node (cuda:<index>) and its spec."""

    node: str  # node name
    index: int  # device index on the node (cuda:<index>)
    device: DeviceSpec

    def __str__(self) -> str:
        return f"{self.node}:{self.index}"


@dataclass(frozen=True)
class Cluster:
    """Nodes plus the network between them."""

    nodes: tuple[Node, ...]
    inter: Link  # between nodes

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ConfigError("nodes: the cluster needs at least one [[nodes]] entry")
        seen: set[str] = set()
        for n in self.nodes:
            if n.name in seen:
                raise ConfigError(f"nodes: name {n.name!r} appears twice; node names must be unique")
            seen.add(n.name)

    def gpus(self) -> list[Gpu]:
        """Every GPU, node by node in file order, index 0..count-1 within a node."""
        return [Gpu(n.name, i, n.device) for n in self.nodes for i in range(n.count)]

    def node(self, name: str) -> Node:
        """The node called ``name``."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(f"node: {name!r} is not in the cluster; nodes: {', '.join(n.name for n in self.nodes)}")

    def link(self, a: Gpu, b: Gpu) -> Link:
        """The intra-node link if ``a`` and ``b`` share a node, else the inter-node network."""
        return self.node(a.node).intra if a.node == b.node else self.inter

    @property
    def num_gpus(self) -> int:
        return sum(n.count for n in self.nodes)


def load_cluster(path: str) -> Cluster:
    """Read a cluster TOML file; ConfigError (naming the key) on unknown keys or bad values."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cluster: cannot read {path!r}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"cluster: {path!r} is not valid TOML: {e}") from e
    return cluster_from_dict(data)


_TOP_KEYS = ("name", "description", "network", "devices", "nodes")
_NETWORK_KEYS = ("bandwidth_gbps", "latency_us")
_DEVICE_KEYS = ("base", "memory_gib", "mem_bandwidth_gbs", "peak_tflops")
_NODE_KEYS = ("name", "gpu", "count", "memory_gib", "link_bandwidth_gbs", "link_latency_us")
# Allowed ranges (inclusive low unless noted) for numeric keys.
_RANGES = {
    "bandwidth_gbps": (1e-3, 1e5),
    "latency_us": (0.0, 1e6),
    "memory_gib": (1e-3, 1e5),
    "mem_bandwidth_gbs": (1e-3, 1e6),
    "peak_tflops": (1e-4, 1e5),
    "link_bandwidth_gbs": (1e-3, 1e5),
    "link_latency_us": (0.0, 1e6),
}


def _check_keys(d: Any, where: str, allowed: tuple[str, ...]) -> Mapping:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(d).__name__}")
    for k in d:
        if k not in allowed:
            raise ConfigError(f"{where}.{k}: unknown key; allowed keys: {', '.join(allowed)}")
    return d


def _number(d: Mapping, key: str, where: str) -> float | None:
    if key not in d:
        return None
    v = d[key]
    lo, hi = _RANGES[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ConfigError(f"{where}.{key}: {v!r} must be a number in [{lo:g}, {hi:g}]")
    return float(v)


def _devices(table: Any) -> dict[str, DeviceSpec]:
    if table is None:
        return {}
    if not isinstance(table, Mapping):
        raise ConfigError("devices: expected tables like [devices.MyGPU]")
    out: dict[str, DeviceSpec] = {}
    for name, d in table.items():
        where = f"devices.{name}"
        d = _check_keys(d, where, _DEVICE_KEYS)
        base_name = d.get("base")
        if base_name is not None and not isinstance(base_name, str):
            raise ConfigError(
                f"{where}.base: {base_name!r} must be a device name; known: {', '.join(sorted(DEVICE_SPECS))}"
            )
        base = None
        if base_name is not None:
            base = device_spec(base_name, out)
        else:
            try:
                base = device_spec(name)
            except ConfigError:
                base = None
        mem, bw, fl = (_number(d, k, where) for k in ("memory_gib", "mem_bandwidth_gbs", "peak_tflops"))
        if base is None:
            if mem is None or bw is None or fl is None:
                missing = [
                    k for k, v in zip(("memory_gib", "mem_bandwidth_gbs", "peak_tflops"), (mem, bw, fl)) if v is None
                ]
                raise ConfigError(f"{where}: a new device needs {', '.join(missing)} (or base = a known device)")
            base = DeviceSpec(name, int(mem * GiB), bw * GB, fl * TFLOPS)
        out[name] = DeviceSpec(
            name,
            int(mem * GiB) if mem is not None else base.memory_bytes,
            bw * GB if bw is not None else base.mem_bandwidth,
            fl * TFLOPS if fl is not None else base.peak_flops,
        )
    return out


def _node(d: Any, i: int, overrides: Mapping[str, DeviceSpec], names: set[str]) -> Node:
    where = f"nodes[{i}]"
    d = _check_keys(d, where, _NODE_KEYS)
    name = d.get("name", f"node{i}")
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ConfigError(f"{where}.name: {name!r} must be a non-empty string without spaces")
    if name in names:
        raise ConfigError(f"{where}.name: {name!r} is used by another node; node names must be unique")
    names.add(name)
    if "gpu" not in d:
        raise ConfigError(f'{where}.gpu: missing; give a device name, e.g. gpu = "A6000"')
    if not isinstance(d["gpu"], str):
        raise ConfigError(f"{where}.gpu: {d['gpu']!r} must be a device name string")
    try:
        dev = device_spec(d["gpu"], overrides)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e}") from e
    count = d.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
        raise ConfigError(f"{where}.count: {count!r} must be an integer in [1, {MAX_COUNT}]")
    mem = _number(d, "memory_gib", where)
    if mem is not None:
        dev = replace(dev, memory_bytes=int(mem * GiB))
    base_link = default_intra(dev)
    bw = _number(d, "link_bandwidth_gbs", where)
    lat = _number(d, "link_latency_us", where)
    intra = Link(
        bw * GB if bw is not None else base_link.bandwidth, lat / 1e6 if lat is not None else base_link.latency
    )
    return Node(name, dev, count, intra)


def cluster_from_dict(d: Mapping) -> Cluster:
    """Build a Cluster from a parsed TOML mapping; unknown keys / bad values -> ConfigError naming the key."""
    d = _check_keys(d, "cluster", _TOP_KEYS)
    for k in ("name", "description"):
        if k in d and not isinstance(d[k], str):
            raise ConfigError(f"{k}: {d[k]!r} must be a string")
    inter = DEFAULT_INTER
    if "network" in d:
        net = _check_keys(d["network"], "network", _NETWORK_KEYS)
        bw = _number(net, "bandwidth_gbps", "network")
        lat = _number(net, "latency_us", "network")
        inter = Link(
            bw * 1e9 / 8 if bw is not None else DEFAULT_INTER.bandwidth,
            lat / 1e6 if lat is not None else DEFAULT_INTER.latency,
        )
    overrides = _devices(d.get("devices"))
    nodes = d.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise ConfigError("nodes: give at least one [[nodes]] table (name, gpu, count)")
    names: set[str] = set()
    return Cluster(tuple(_node(n, i, overrides, names) for i, n in enumerate(nodes)), inter)
