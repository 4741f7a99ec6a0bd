"""Device specs and the cluster TOML (hexgen/planner/devices.py, hexgen/planner/cluster.py)."""
from __future__ import annotations

import os

import pytest

from hexgen.errors import ConfigError
from hexgen.planner.cluster import (DEFAULT_INTER, NVLINK_A100, NVLINK_H100, PCIE4, Cluster, Gpu, Link, Node,
                                    cluster_from_dict, load_cluster)
from hexgen.planner.devices import DEVICE_SPECS, GiB, DeviceSpec, device_spec, guess_device_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTERS = os.path.join(ROOT, "config", "clusters")


def one_node(**node) -> dict:
    return {"nodes": [{"name": "n0", "gpu": "A6000", "count": 2, **node}]}


# -- devices ----------------------------------------------------------------------------------------------------
def test_builtins_cover_the_issue_list():
    for name in ("H100", "H200", "A100-40GB", "A100-80GB", "A6000", "A5000", "A4000", "L40S", "L4", "RTX4090",
                 "RTX3090", "T4", "V100", "CPU"):
        assert name in DEVICE_SPECS


def test_datasheet_numbers():
    h100 = DEVICE_SPECS["H100"]
    assert h100.peak_flops == pytest.approx(989.4e12)
    assert h100.mem_bandwidth == pytest.approx(3.35e12)
    a6000 = DEVICE_SPECS["A6000"]
    assert a6000.mem_bandwidth == pytest.approx(768e9)
    assert a6000.peak_flops == pytest.approx(154.8e12)
    assert 47 * GiB < a6000.memory_bytes <= 48 * GiB
    assert DEVICE_SPECS["A5000"].peak_flops == pytest.approx(111.1e12)
    assert DEVICE_SPECS["A4000"].mem_bandwidth == pytest.approx(448e9)


@pytest.mark.parametrize("spelling,name", [
    ("h100", "H100"), ("H100", "H100"), ("a100_80gb", "A100-80GB"), ("A100-40GB", "A100-40GB"),
    ("rtx 4090", "RTX4090"), ("RTX-A6000", "A6000"), ("a6000", "A6000"), ("l40s", "L40S"), ("cpu", "CPU"),
])
def test_lookup_is_case_and_punctuation_insensitive(spelling, name):
    assert device_spec(spelling).name == name


def test_unknown_device_lists_the_known_names():
    with pytest.raises(ConfigError) as e:
        device_spec("B200")
    msg = str(e.value)
    assert "'B200'" in msg and "H100" in msg and "A6000" in msg and "CPU" in msg


def test_overrides_win_over_builtins():
    mine = DeviceSpec("A6000", 40 * GiB, 700e9, 100e12)
    assert device_spec("a6000", {"A6000": mine}) is mine
    assert device_spec("h100", {"A6000": mine}).name == "H100"


@pytest.mark.parametrize("field,value", [("memory_bytes", 0), ("mem_bandwidth", -1.0), ("peak_flops", 0.0),
                                         ("memory_bytes", 1.5)])
def test_device_spec_validation_names_the_field(field, value):
    kw = dict(name="X", memory_bytes=GiB, mem_bandwidth=1e9, peak_flops=1e12)
    kw[field] = value
    with pytest.raises(ConfigError, match=field):
        DeviceSpec(**kw)


@pytest.mark.parametrize("label,name", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA A100-SXM4-40GB", "A100-40GB"), ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
    ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"), ("NVIDIA RTX A6000", "A6000"), ("Tesla T4", "T4"),
    ("NVIDIA GeForce RTX 4090", "RTX4090"), ("NVIDIA B200", None),
])
def test_guess_device_name(label, name):
    assert guess_device_name(label) == name


# -- cluster ----------------------------------------------------------------------------------------------------
def test_minimal_cluster_defaults():
    c = cluster_from_dict(one_node())
    assert c.inter == DEFAULT_INTER
    assert c.nodes[0].intra == PCIE4
    assert [str(g) for g in c.gpus()] == ["n0:0", "n0:1"]
    assert c.num_gpus == 2


def test_nvlink_default_for_sxm_parts():
    c = cluster_from_dict({"nodes": [{"name": "h", "gpu": "h100", "count": 4},
                                     {"name": "a", "gpu": "A100-80GB", "count": 2}]})
    assert c.nodes[0].intra == NVLINK_H100
    assert c.nodes[1].intra == NVLINK_A100
    assert 300e9 <= NVLINK_H100.bandwidth <= 450e9


def test_units_and_overrides():
    c = cluster_from_dict({
        "network": {"bandwidth_gbps": 100, "latency_us": 10},
        "devices": {"MyGPU": {"base": "A6000", "peak_tflops": 120}},
        "nodes": [{"name": "box", "gpu": "mygpu", "count": 3, "memory_gib": 40, "link_bandwidth_gbs": 32,
                   "link_latency_us": 5}],
    })
    assert c.inter == Link(12.5e9, 10e-6)
    node = c.nodes[0]
    assert node.device.name == "MyGPU"
    assert node.device.peak_flops == pytest.approx(120e12)
    assert node.device.mem_bandwidth == DEVICE_SPECS["A6000"].mem_bandwidth
    assert node.device.memory_bytes == 40 * GiB
    assert node.intra == Link(32e9, 5e-6)


def test_new_device_needs_all_fields():
    with pytest.raises(ConfigError, match=r"devices\.Z.*peak_tflops"):
        cluster_from_dict({"devices": {"Z": {"memory_gib": 8, "mem_bandwidth_gbs": 100}},
                           "nodes": [{"gpu": "Z"}]})
    c = cluster_from_dict({"devices": {"Z": {"memory_gib": 8, "mem_bandwidth_gbs": 100, "peak_tflops": 10}},
                           "nodes": [{"gpu": "z", "count": 1}]})
    assert c.nodes[0].device == DeviceSpec("Z", 8 * GiB, 100e9, 10e12)


def test_builtin_device_table_overrides_fields():
    c = cluster_from_dict({"devices": {"CPU": {"memory_gib": 16}}, "nodes": [{"gpu": "cpu", "count": 2}]})
    dev = c.nodes[0].device
    assert dev.memory_bytes == 16 * GiB and dev.mem_bandwidth == DEVICE_SPECS["CPU"].mem_bandwidth


@pytest.mark.parametrize("d,key", [
    ({"nodes": [{"gpu": "A6000", "cout": 2}]}, "nodes[0].cout"),
    ({"nodes": [{"gpu": "A6000", "count": 0}]}, "nodes[0].count"),
    ({"nodes": [{"gpu": "A6000", "count": 2.5}]}, "nodes[0].count"),
    ({"nodes": [{"gpu": "A6000", "memory_gib": -1}]}, "nodes[0].memory_gib"),
    ({"nodes": [{"gpu": "A6000", "link_bandwidth_gbs": "fast"}]}, "nodes[0].link_bandwidth_gbs"),
    ({"nodes": [{"gpu": "B300"}]}, "nodes[0].gpu"),
    ({"nodes": [{"count": 2}]}, "nodes[0].gpu"),
    ({"nodes": [{"name": "a", "gpu": "L4"}, {"name": "a", "gpu": "L4"}]}, "nodes[1].name"),
    ({"network": {"bandwidth_gbps": 0}, "nodes": [{"gpu": "L4"}]}, "network.bandwidth_gbps"),
    ({"network": {"latency": 5}, "nodes": [{"gpu": "L4"}]}, "network.latency"),
    ({"devices": {"X": {"base": "A6000", "tflops": 1}}, "nodes": [{"gpu": "X"}]}, "devices.X.tflops"),
    ({"nodes": []}, "nodes"),
    ({"gpus": 4, "nodes": [{"gpu": "L4"}]}, "cluster.gpus"),
])
def test_errors_name_the_key(d, key):
    with pytest.raises(ConfigError) as e:
        cluster_from_dict(d)
    assert key in str(e.value)


def test_range_is_in_the_message():
    with pytest.raises(ConfigError, match=r"\[1, 1024\]"):
        cluster_from_dict({"nodes": [{"gpu": "A6000", "count": 4096}]})


def test_link_same_node_or_network():
    nodes = [{"name": "a", "gpu": "H100", "count": 2}, {"name": "b", "gpu": "L4", "count": 1}]
    c = cluster_from_dict({"network": {"bandwidth_gbps": 8}, "nodes": nodes})
    a0, a1, b0 = c.gpus()
    assert c.link(a0, a1) == NVLINK_H100
    assert c.link(a0, b0) == Link(1e9, DEFAULT_INTER.latency)
    assert c.node("b").device.name == "L4"
    with pytest.raises(ConfigError, match="'zz'"):
        c.node("zz")
    assert Gpu("a", 1, a0.device) == a1


def test_dataclass_validation():
    with pytest.raises(ConfigError, match="bandwidth"):
        Link(0.0, 1e-6)
    with pytest.raises(ConfigError, match="latency"):
        Link(1e9, -1.0)
    with pytest.raises(ConfigError, match="count"):
        Node("n", DEVICE_SPECS["L4"], 0, PCIE4)
    with pytest.raises(ConfigError, match="nodes"):
        Cluster((), DEFAULT_INTER)


def test_load_cluster_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_cluster(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[[nodes]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_cluster(str(bad))


def test_example_clusters_load():
    case = load_cluster(os.path.join(CLUSTERS, "hexgen-case-study.toml"))
    assert [(n.device.name, n.count) for n in case.nodes] == [("A6000", 4), ("A5000", 2), ("A4000", 2)]
    assert case.inter.bandwidth < 2e9  # ~10 Gbit/s Ethernet
    h100 = load_cluster(os.path.join(CLUSTERS, "h100x4.toml"))
    assert h100.num_gpus == 4 and h100.nodes[0].intra == NVLINK_H100
    mixed = load_cluster(os.path.join(CLUSTERS, "mixed-64.toml"))
    assert mixed.num_gpus == 64
    assert len({g.device.name for g in mixed.gpus()}) == 5
