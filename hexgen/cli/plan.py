"""`hexgen plan`: validate a layout against a model and show each stage's TP ranks and layers; or, with
--cluster, plan a heterogeneous cluster (replicas, stages, TP degrees, layer splits) and write a deployment."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import Any

from hexgen.cli.generate import add_layout_args, resolve_model
from hexgen.config import Layout, ModelConfig, normalize_dtype, preset, valid_tp_degrees
from hexgen.errors import ConfigError, HexGenError
from hexgen.quantization import weight_format
from hexgen.wire import keys as C


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hexgen plan", description=__doc__)
    add_layout_args(p)
    p.add_argument("--json", action="store_true")
    g = p.add_argument_group("cluster planning")
    g.add_argument("--cluster", help="cluster TOML (config/clusters/): plan replicas and stages for it")
    g.add_argument("--model-path", help="Hugging Face model directory (its config.json); or --preset")
    g.add_argument("--model-name", help="model name in the deployment file (default: preset or folder name)")
    g.add_argument("--slo-latency", type=float, default=30.0, help="end-to-end latency bound in s (0: none)")
    g.add_argument(
        "--slo-rate",
        type=float,
        default=0.0,
        help="requests/s to serve with the lowest latency (default 0: maximise the rate)",
    )
    g.add_argument("--workload-prompt", type=int, default=512, help="mean prompt tokens")
    g.add_argument("--workload-output", type=int, default=128, help="mean output tokens")
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=256,
        help="requests in flight per replica at most (the workers' --max-num-seqs; default 256)",
    )
    g.add_argument("--time-budget", type=float, default=30.0, help="search time limit in s")
    g.add_argument("--seed", type=int, default=0, help="search seed")
    g.add_argument("--calibration", nargs="+", metavar="FILE", help="calibration JSON from `bin/hexgen profile`")
    g.add_argument("--out", help="write the deployment TOML here (bin/head / bin/worker --config)")
    g.add_argument("--redis-url", default=C.DEFAULT_REDIS_URL, help="Redis URL written into the deployment")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cluster:
            return _plan_cluster(args)
        cfg = resolve_model(args).config()
        layout = Layout.build(cfg, args.hetero_config, args.pp_partition)
    except HexGenError as e:
        print(f"hexgen plan: {e}", file=sys.stderr)
        return 2
    stages: list[dict[str, Any]] = [
        {"stage": s.index, "tp": s.tp, "layers": [s.layer_start, s.layer_end - 1], "ranks": s.ranks}
        for s in layout.stages()
    ]
    if args.json:
        print(
            json.dumps(
                {
                    "layout": layout.describe(),
                    "world_size": layout.world_size,
                    "stages": stages,
                    "valid_tp_degrees": valid_tp_degrees(cfg),
                }
            )
        )
        return 0
    print(
        f"{layout.describe()}  (world size {layout.world_size}; valid TP degrees: "
        f"{', '.join(map(str, valid_tp_degrees(cfg)))})"
    )
    for s in stages:
        print(f"  stage {s['stage']}: TP {s['tp']}, layers {s['layers'][0]}-{s['layers'][1]}, ranks {s['ranks']}")
    return 0


def _plan_cluster(args: argparse.Namespace) -> int:
    from hexgen.planner.calibration import load_calibration
    from hexgen.planner.cluster import load_cluster
    from hexgen.planner.costmodel import CostModel
    from hexgen.planner.report import plan_table, plan_to_dict, plan_to_toml
    from hexgen.planner.search import (
        Slo,
        Workload,
        best_symmetric,
        plan_cluster,
        symmetric_options,
    )

    path = args.model_path or args.model
    if bool(path) == bool(args.preset):
        raise ConfigError("--model-path, --preset: give exactly one with --cluster")
    cfg = ModelConfig.from_dir(path) if path else preset(args.preset)
    cfg = replace(cfg, quantization=weight_format(cfg.quantization, args.quantization))
    dtype = normalize_dtype(args.dtype or "bf16")
    cal = tuple(load_calibration(f) for f in args.calibration) if args.calibration else None
    cost = CostModel(cfg, dtype_bytes=4 if dtype == "float32" else 2, calibration=cal)
    cluster = load_cluster(args.cluster)
    workload = Workload(args.workload_prompt, args.workload_output, args.max_num_seqs)
    slo = Slo(args.slo_latency, args.slo_rate)
    plan = plan_cluster(cluster, cost, workload, slo, time_budget_s=args.time_budget, seed=args.seed)
    baseline = best_symmetric(cluster, cost, workload, slo)
    pure = [o for o in symmetric_options(cluster, cost, workload, slo)[:2]]
    name = args.model_name or args.preset or os.path.basename(os.path.normpath(path))
    if args.out:
        text = plan_to_toml(
            plan,
            model_name=name,
            model_path=os.path.abspath(path) if path else None,
            preset=args.preset,
            dtype=dtype,
            quantization=args.quantization,
            redis_url=args.redis_url,
            config_path=args.out,
        )
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    if args.json:
        print(
            json.dumps(
                {
                    "plan": plan_to_dict(plan),
                    "best_symmetric": plan_to_dict(baseline) if baseline else None,
                    "gain": plan.rate / baseline.rate if baseline and baseline.rate > 0 else None,
                    "symmetric": [
                        {
                            "name": o.name,
                            "tp": o.tp,
                            "pp": o.pp,
                            "fits": o.plan is not None,
                            "rate": o.plan.rate if o.plan else 0.0,
                            "reason": o.reason,
                        }
                        for o in pure
                    ],
                    "out": args.out,
                }
            )
        )
        return 0
    notes = [
        f"{o.name} (TP {o.tp} x PP {o.pp}): " + (o.reason if o.reason or o.plan is None else f"{o.plan.rate:.2f} req/s")
        for o in pure
    ]
    print(plan_table(plan, baseline=baseline, notes=notes))
    if args.out:
        print(f"wrote {args.out}: bin/head --config {args.out}; workers: see the comments in the file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
