"""The run spec of the uneven-TP measurement on an emulated unequal GPU pair (bench/gpu.sh uneven-emulated):

    python scripts/uneven_runs.py CLUSTER.toml PRESET OUT.json [REQUESTS [EMULATE]]

For PRESET on the cluster (two single-GPU nodes of different devices joined by NVLink, e.g.
config/clusters/h200x2-emulated.toml; node i is cuda:i) it writes three runs for scripts/planner_measure.py:
uneven TP 2 at the planner's ratio (hexgen/planner/uneven_plan.py), even TP 2, and the planner's best
two-stage asymmetric PP layout (either stage order, its layer split) — each offered the same REQUESTS
(1,000) fixed-seed requests at once. cuda:1 is cut down to EMULATE (SMs:GiB, default 40:80, the cluster file's
H200-40SM; hexgen/engine/emulation.py).
"""
from __future__ import annotations

import json
import sys

from hexgen.config import preset
from hexgen.planner.cluster import load_cluster
from hexgen.planner.costmodel import CostModel
from hexgen.planner.replica import Evaluator
from hexgen.planner.search import Slo, Workload
from hexgen.planner.uneven_plan import uneven_candidate

PROMPT, OUTPUT = (64, 512), (32, 256)


def main() -> int:
    cluster_path, name, out = sys.argv[1], sys.argv[2], sys.argv[3]
    requests = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
    emulate = sys.argv[5] if len(sys.argv) > 5 else "40:80"
    cluster = load_cluster(cluster_path)
    if len(cluster.nodes) != 2 or any(n.count != 1 for n in cluster.nodes):
        print("uneven_runs: the cluster must be two nodes of one GPU each", file=sys.stderr)
        return 2
    cost = CostModel(preset(name))
    workload = Workload(sum(PROMPT) // 2, sum(OUTPUT) // 2, 256)
    ev = Evaluator(cluster, cost, workload, 0.0)
    found = uneven_candidate(ev, Slo(0.0))
    if found is None or not found[0].replicas[0].stages[0].tp_ratio:
        print(f"uneven_runs: the planner finds no uneven ratio for {name} on {cluster_path}", file=sys.stderr)
        return 2
    stage = found[0].replicas[0].stages[0]
    index = {n.name: i for i, n in enumerate(cluster.nodes)}
    devices = [index[g.node] for g in stage.gpus]  # rank r on cuda:devices[r], the faster GPU first
    ratio = ":".join(map(str, stage.tp_ratio))
    pp = [(key, ev.best(key)) for key in (((0, 1), (1, 1)), ((1, 1), (0, 1)))]
    key, best = max(((k, e) for k, e in pp if e is not None), key=lambda ke: ke[1].rate)
    tag, n = name.replace("llama-", "l"), cost.model.num_layers
    runs = [
        {"name": f"{tag}-uneven-{ratio.replace(':', 'to')}", "hetero": [2], "partition": [n],
         "tp_ratio": [list(stage.tp_ratio)], "devices": devices,
         "predicted_rate": round(found[0].rate, 3), "notes": list(found[0].notes)},
        {"name": f"{tag}-even-tp2", "hetero": [2], "partition": [n], "devices": devices},
        {"name": f"{tag}-pp-{'-'.join(map(str, best.layers))}", "hetero": [1, 1], "partition": list(best.layers),
         "devices": [ni for ni, _ in key], "predicted_rate": round(best.rate, 3)},
    ]
    spec = {"preset": name, "dtype": "bf16", "requests": requests, "prompt_range": list(PROMPT),
            "output_range": list(OUTPUT), "seed": 0, "max_num_seqs": 256, "max_num_batched_tokens": 2048,
            "gpu_memory_fraction": 0.9, "emulate_by_device": {"1": emulate}, "runs": runs}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=1)
    print(f"{name}: uneven TP 2 at {ratio} on cuda:{devices}; PP {best.layers} on cuda:{[ni for ni, _ in key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
