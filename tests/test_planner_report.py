"""Planner report: the table, JSON, the deployment TOML (loads with load_settings) and `hexgen plan --cluster`."""
from __future__ import annotations

import json

import pytest

from hexgen.cli.plan import main as plan_main
from hexgen.config import PRESETS, Layout
from hexgen.errors import ConfigError
from hexgen.planner.cluster import cluster_from_dict
from hexgen.planner.costmodel import CostModel
from hexgen.planner.report import plan_table, plan_to_dict, plan_to_toml
from hexgen.planner.search import Slo, Workload, best_symmetric, plan_cluster
from hexgen.wire.settings import load_settings

CLUSTER = {
    "network": {"bandwidth_gbps": 9, "latency_us": 50},
    "nodes": [{"name": "a6000-box", "gpu": "A6000", "count": 4}, {"name": "a5000-box", "gpu": "A5000", "count": 2},
              {"name": "a4000-box", "gpu": "A4000", "count": 2}],
}
CLUSTER_TOML = """
[network]
bandwidth_gbps = 9
latency_us = 50
[[nodes]]
name = "a6000-box"
gpu = "A6000"
count = 4
[[nodes]]
name = "a5000-box"
gpu = "A5000"
count = 2
[[nodes]]
name = "a4000-box"
gpu = "A4000"
count = 2
[[nodes]]
name = "h100-box"
gpu = "H100"
count = 4
"""


@pytest.fixture(scope="module")
def planned():
    cluster = cluster_from_dict(CLUSTER)
    cost = CostModel(PRESETS["llama-2-70b"])
    plan = plan_cluster(cluster, cost, Workload(), Slo(), max_iters=800)
    return cluster, cost, plan, best_symmetric(cluster, cost, Workload(), Slo())


def test_toml_loads_and_layouts_validate(planned, tmp_path):
    _, cost, plan, _ = planned
    text = plan_to_toml(plan, model_name="llama-2-70b-chat", model_path=None, preset="llama-2-70b", dtype="bf16",
                        redis_url="redis://redis.internal:6379/0", config_path="deploy.toml")
    path = tmp_path / "deploy.toml"
    path.write_text(text)
    s = load_settings(str(path), env={})
    assert s.dtype == "bfloat16" and s.device == "cuda" and s.model.name == "llama-2-70b-chat"
    assert s.redis.url == "redis://redis.internal:6379/0"
    assert len(s.pipelines) == len(plan.replicas)
    for p, r in zip(s.pipelines, plan.replicas):
        layout = Layout.build(cost.model, p.hetero_config, p.pp_partition)
        assert layout.hetero_config == r.hetero_config and layout.pp_partition == r.pp_partition
        assert p.devices == tuple(f"cuda:{g.index}" for st in r.stages for g in st.gpus)
        for j, st in enumerate(r.stages):
            assert (f"#     on {st.node}: bin/worker --config deploy.toml --pipeline {p.id} --stage {j} "
                    f"--max-num-seqs {r.max_batch}") in text
    assert "bin/head --config deploy.toml" in text


def test_toml_with_model_path(planned, tmp_path):
    _, _, plan, _ = planned
    text = plan_to_toml(plan, model_name="m", model_path="/models/Llama-2-70b-hf", preset=None, dtype="fp16",
                        redis_url="redis://localhost:6379/0")
    path = tmp_path / "d.toml"
    path.write_text(text)
    s = load_settings(str(path), env={})
    assert s.model.path == "/models/Llama-2-70b-hf" and s.dtype == "float16"
    with pytest.raises(ConfigError, match="exactly one"):
        plan_to_toml(plan, model_name="m", model_path="/x", preset="tiny", dtype="bf16", redis_url="redis://h")


def test_table_and_dict(planned):
    _, _, plan, sym = planned
    table = plan_table(plan, baseline=sym, notes=["pure TP (TP 8 x PP 1): TP 8 would span 3 nodes"])
    assert "replica r0" in table and "a6000-box:" in table and "predicted gain" in table
    assert "best symmetric layout: TP 4 x PP 1" in table and "span 3 nodes" in table
    assert "best symmetric layout: none fits" in plan_table(plan)
    assert "best symmetric" not in plan_table(plan, compare=False)
    d = json.loads(json.dumps(plan_to_dict(plan)))
    assert d["replicas"][0]["id"] == "r0"
    assert sum(st["layers"][1] - st["layers"][0] + 1 for st in d["replicas"][0]["stages"]) == 80


def test_cli_cluster_mode(tmp_path, capsys):
    cl = tmp_path / "cluster.toml"
    cl.write_text(CLUSTER_TOML)
    out = tmp_path / "deploy.toml"
    rc = plan_main(["--cluster", str(cl), "--preset", "llama-2-70b", "--time-budget", "10", "--out", str(out),
                    "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["plan"]["rate"] > 0 and res["best_symmetric"] is not None and res["gain"] >= 1.0
    assert {o["name"] for o in res["symmetric"]} == {"pure TP", "pure PP"}
    s = load_settings(str(out), env={})
    assert len(s.pipelines) == len(res["plan"]["replicas"])
    rc = plan_main(["--cluster", str(cl), "--preset", "llama-2-70b", "--time-budget", "5", "--slo-latency", "60"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "predicted gain" in text and "pure PP" in text


def test_cli_cluster_errors(tmp_path, capsys):
    cl = tmp_path / "cluster.toml"
    cl.write_text('[[nodes]]\nname = "s"\ngpu = "A4000"\ncount = 1\n')
    assert plan_main(["--cluster", str(cl), "--preset", "llama-2-70b", "--time-budget", "2"]) == 2
    assert "nothing fits" in capsys.readouterr().err
    assert plan_main(["--cluster", str(cl)]) == 2
    assert "--model-path, --preset" in capsys.readouterr().err


def test_cli_layout_mode_unchanged(capsys):
    assert plan_main(["--preset", "tiny", "--random-weights", "--hetero-config", "2", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["world_size"] == 3 and [s["tp"] for s in res["stages"]] == [2, 1]
