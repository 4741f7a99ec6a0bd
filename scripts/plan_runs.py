"""Turn `hexgen plan --json` output into scripts/planner_measure.py runs: the planner's layout against the best
symmetric one, on the GPUs the plan names (docs/planner.md, "Measured validation").

    python scripts/plan_runs.py PLAN.json CLUSTER.toml BASE.json OUT.json

BASE.json is a planner_measure spec without "runs" (load, engine settings, "emulate_by_device"). The i-th GPU
of the cluster file (nodes in order, then each node's indices) is taken to be cuda:i on the machine that runs
the measurement. One run per plan: the first replica of each (a measurement machine serves one at a time).
"""
from __future__ import annotations

import json
import sys

from hexgen.planner.cluster import load_cluster


def runs_for(plan: dict, name: str, physical: dict[tuple[str, int], int], micro_batches: int = 0) -> dict:
    rep = plan["replicas"][0]
    devices = [physical[(s["node"], d)] for s in rep["stages"] for d in s["devices"]]
    return {"name": name, "hetero": rep["hetero_config"], "partition": rep["pp_partition"],
            "micro_batches": micro_batches, "devices": devices,
            "predicted_rate": rep["rate"], "from": plan.get("name", name)}


def main() -> int:
    if len(sys.argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    plan_path, cluster_path, base_path, out_path = sys.argv[1:]
    with open(plan_path, encoding="utf-8") as f:
        planned = json.load(f)
    with open(base_path, encoding="utf-8") as f:
        spec = json.load(f)
    cluster = load_cluster(cluster_path)
    physical = {(g.node, g.index): i for i, g in enumerate(cluster.gpus())}
    runs = [runs_for(planned["plan"], "planned", physical)]
    if planned.get("best_symmetric"):
        runs.append(runs_for(planned["best_symmetric"], "best-symmetric", physical))
    spec["runs"] = runs
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=1)
    for r in runs:
        print(f"{r['name']}: hetero {r['hetero']} / partition {r['partition']} on cuda {r['devices']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
