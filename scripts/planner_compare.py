"""The planner's predictions beside what scripts/planner_measure.py measured (docs/planner.md, "Measured
validation"): for each measured layout, the cost model (with the calibrations) and the simulator predict the
same fixed-seed requests offered at once, with the engine's settings; prints a table and the ranking.

    python scripts/planner_compare.py MEASURED.json CLUSTER.toml [--calibration FILE ...] [--rank-devices 0 1]

``--rank-devices``: which GPU of the cluster (in ``Cluster.gpus()`` order) each rank of a run used, by the
run's ``devices`` list (default: GPU i for device i).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from hexgen.bench.workload import mixed_shapes
from hexgen.config import preset
from hexgen.planner.calibration import load_calibration
from hexgen.planner.cluster import load_cluster
from hexgen.planner.costmodel import CostModel
from hexgen.planner.plans import Plan, Slo, Workload
from hexgen.planner.search import evaluate_replica
from hexgen.planner.simulator import SimConfig, simulate


def predict(run: dict, spec: dict, cluster, cost) -> dict | None:
    """Simulated figures of one measured run; None when the planner cannot express the layout (a TP group
    across two device types)."""
    gpus = cluster.gpus()
    devices = run.get("devices") or list(range(sum(run["hetero"])))
    spec = {**spec, **{k: run[k] for k in ("requests", "prompt_range", "output_range") if k in run}}
    stages, r = [], 0
    for tp, layers in zip(run["hetero"], run["partition"]):
        stages.append((tuple(gpus[d] for d in devices[r:r + tp]), layers))
        r += tp
    shapes = mixed_shapes(spec["requests"], tuple(spec["prompt_range"]), tuple(spec["output_range"]),
                          spec.get("seed", 0))
    pairs = [(s.prompt, s.output) for s in shapes]
    workload = Workload(round(sum(p for p, _ in pairs) / len(pairs)), round(sum(o for _, o in pairs) / len(pairs)))
    try:
        replica = evaluate_replica(stages, cluster, cost, workload, Slo(0.0))
    except Exception as e:  # noqa: BLE001 - a layout outside the planner's rules: no prediction
        return {"error": str(e)}
    if replica is None:
        return {"error": "does not fit"}
    plan = Plan((replica,), (), replica.rate, 0.0)
    cfg = SimConfig(max_num_seqs=spec.get("max_num_seqs", 128),
                    max_num_batched_tokens=spec.get("max_num_batched_tokens", 2048))
    res = simulate(plan, cost, cluster, rate=math.inf, num_requests=len(pairs), workload=pairs, slo=Slo(0.0),
                   micro_batches=run.get("micro_batches", 0) != 1, config=cfg)
    return {"output_tokens_per_s": res.output_tok_s, "requests_per_s": res.throughput_rps,
            "latency_mean_s": res.latency_mean, "ttft_p50_ms": res.ttft_p50 * 1e3, "tpot_p50_ms": res.tpot_p50 * 1e3,
            "kv_tokens": min(s.kv_tokens for s in replica.stages)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("measured")
    p.add_argument("cluster")
    p.add_argument("--calibration", nargs="*", default=[])
    p.add_argument("--json", help="write predictions and measurements here")
    args = p.parse_args()
    with open(args.measured, encoding="utf-8") as f:
        data = json.load(f)
    spec = data["spec"]
    cluster = load_cluster(args.cluster)
    cal = tuple(load_calibration(c) for c in args.calibration) or None
    cost = CostModel(preset(spec["preset"]), calibration=cal)
    rows = []
    print(f"{'layout':<16} {'measured tok/s':>14} {'predicted':>10} {'ratio':>6} {'meas lat s':>10} "
          f"{'pred lat s':>10} {'ratio':>6} {'meas TPOT ms':>12} {'pred TPOT ms':>12}")
    for name, run in data["runs"].items():
        if "error" in run:
            print(f"{name:<16} measured run failed: {run['error']}")
            continue
        pred = predict(run, spec, cluster, cost)
        rows.append({"name": name, "measured": {k: run[k] for k in ("output_tokens_per_s", "requests_per_s",
                                                                    "latency_mean_s", "ttft_p50_ms", "tpot_p50_ms")},
                     "predicted": pred})
        if pred is None or "error" in pred:
            print(f"{name:<16} {run['output_tokens_per_s']:>14.1f} {'—':>10} {'':>6} {run['latency_mean_s']:>10.2f} "
                  f"{'—':>10} {'':>6} {run['tpot_p50_ms']:>12.1f}   no prediction: {pred and pred['error']}")
            continue
        print(f"{name:<16} {run['output_tokens_per_s']:>14.1f} {pred['output_tokens_per_s']:>10.1f} "
              f"{pred['output_tokens_per_s'] / run['output_tokens_per_s']:>6.2f} {run['latency_mean_s']:>10.2f} "
              f"{pred['latency_mean_s']:>10.2f} {pred['latency_mean_s'] / run['latency_mean_s']:>6.2f} "
              f"{run['tpot_p50_ms']:>12.1f} {pred['tpot_p50_ms']:>12.1f}")
    both = [r for r in rows if r["predicted"] and "error" not in r["predicted"]]
    by_meas = [r["name"] for r in sorted(both, key=lambda r: -r["measured"]["output_tokens_per_s"])]
    by_pred = [r["name"] for r in sorted(both, key=lambda r: -r["predicted"]["output_tokens_per_s"])]
    print(f"ranking by throughput, measured:  {' > '.join(by_meas)}")
    print(f"ranking by throughput, predicted: {' > '.join(by_pred)}  ({'same' if by_meas == by_pred else 'DIFFERENT'})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"cluster": args.cluster, "calibration": args.calibration, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
