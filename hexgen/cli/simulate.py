"""`hexgen simulate`: simulate a request stream through a deployment plan and print latency, throughput and SLO
attainment.

The plan comes either from the planner (``--cluster FILE``: plan_cluster first) or from an explicit layout of
one replica on one node (``--hetero-config`` / ``--pp-partition`` and ``--gpu TYPE``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import dataclass
from typing import Any

from hexgen.cli.flags import add_tp_ratio_flag
from hexgen.errors import ConfigError, HexGenError


@dataclass(frozen=True)
class LengthRange:
    """Token lengths: fixed (``lo == hi``) or uniform in [lo, hi]."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.hi:
            raise ConfigError(f"length range: {self.lo}:{self.hi} must satisfy 1 <= lo <= hi")

    @property
    def mean(self) -> int:
        return (self.lo + self.hi) // 2


def parse_length(text: str) -> LengthRange:
    """``"512"`` (fixed) or ``"128:1024"`` (uniform)."""
    try:
        parts = [int(x) for x in text.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or LO:HI") from None
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r} is not N or LO:HI")
    try:
        return LengthRange(parts[0], parts[-1])
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hexgen simulate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="Hugging Face model directory (its config.json gives the shape)")
    model.add_argument("--preset", help="model shape preset, e.g. llama-2-7b")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="bf16")
    p.add_argument("--calibration", nargs="+", metavar="FILE", help="calibration JSON from `hexgen profile`")
    src = p.add_argument_group("deployment (one of)")
    src.add_argument("--cluster", help="cluster TOML: run the planner first and simulate its plan")
    src.add_argument("--time-budget", type=float, default=30.0, help="planner search budget, s (with --cluster)")
    src.add_argument(
        "--hetero-config",
        "--hetero_config",
        dest="hetero_config",
        type=int,
        nargs="+",
        metavar="TP",
        help="TP degree of each stage of one replica, e.g. 2 1",
    )
    src.add_argument(
        "--pp-partition",
        "--pp_partition",
        dest="pp_partition",
        type=int,
        nargs="+",
        metavar="LAYERS",
        help="layers of each stage (default: in proportion to TP)",
    )
    add_tp_ratio_flag(src)
    src.add_argument("--gpu", help="device type of the explicit layout's node, e.g. H100")
    w = p.add_argument_group("request stream")
    w.add_argument(
        "--rate", type=float, default=math.inf, help="Poisson arrivals, requests/s (default: inf, all at once)"
    )
    w.add_argument("--num-requests", type=int, default=1000)
    w.add_argument("--prompt-len", type=parse_length, default=LengthRange(512, 512), metavar="N|LO:HI")
    w.add_argument("--output-len", type=parse_length, default=LengthRange(128, 128), metavar="N|LO:HI")
    w.add_argument("--slo-latency", type=float, default=30.0, help="end-to-end latency bound, s (0: none)")
    w.add_argument("--seed", type=int, default=0)
    e = p.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=int, default=None, help="default: each replica's planned max batch")
    e.add_argument("--max-num-batched-tokens", type=int, default=2048)
    e.add_argument("--no-micro-batches", action="store_true", help="one micro-batch in flight per replica")
    p.add_argument(
        "--max-rate",
        action="store_true",
        help="also bisect for the highest rate meeting the SLO for --attainment of requests",
    )
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--json", action="store_true")
    return p


def _cost_model(args: argparse.Namespace):
    from hexgen.config import ModelConfig, preset
    from hexgen.planner.costmodel import CostModel

    cfg = preset(args.preset) if args.preset else ModelConfig.from_dir(args.model)
    calibration = None
    if args.calibration:
        from hexgen.planner.calibration import load_calibration

        calibration = tuple(load_calibration(f) for f in args.calibration)
    return CostModel(cfg, dtype_bytes=4 if args.dtype == "fp32" else 2, calibration=calibration)


def _explicit_plan(args: argparse.Namespace, cost, workload, slo):
    """One replica of ``--hetero-config`` stages on one node of ``--gpu`` devices."""
    from hexgen.config import Layout
    from hexgen.planner.cluster import cluster_from_dict
    from hexgen.planner.search import Plan, evaluate_replica

    if not args.gpu:
        raise ConfigError("--gpu: an explicit layout needs the device type of its node, e.g. --gpu H100")
    layout = Layout.build(cost.model, args.hetero_config, args.pp_partition, args.tp_ratio)
    stages_spec = list(layout.stages())
    cluster = cluster_from_dict(
        {"nodes": [{"name": "node0", "gpu": args.gpu, "count": sum(s.tp for s in stages_spec)}]}
    )
    if layout.tp_ratio:  # uneven stages: costed rank by rank
        from hexgen.planner.uneven_plan import evaluate_layout

        uneven = evaluate_layout(cluster, cost, workload, slo, layout)
        if uneven is None:
            raise ConfigError(f"--tp-ratio: layout {layout.describe()} on {args.gpu} does not fit or meet the SLO")
        return Plan((uneven,), (), uneven.rate, 0.0, uneven.latency_s, "explicit layout"), cluster
    gpus = cluster.gpus()
    stages, at = [], 0
    for s in stages_spec:
        stages.append((tuple(gpus[at : at + s.tp]), s.layer_end - s.layer_start))
        at += s.tp
    replica = evaluate_replica(stages, cluster, cost, workload, slo)
    if replica is None:
        raise ConfigError(
            f"--hetero-config: layout {layout.describe()} on {args.gpu} does not fit the model and "
            "its KV cache in memory (or cannot meet the SLO at any load)"
        )
    plan = Plan(
        replicas=(replica,),
        unused=(),
        rate=replica.rate,
        search_s=0.0,
        latency_s=replica.latency_s,
        name="explicit layout",
    )
    return plan, cluster


def _lengths(args: argparse.Namespace):
    """The stream's (prompt, output) pairs, or a fixed Workload; and the mean Workload the planner sees."""
    from hexgen.planner.search import Workload

    mean = Workload(prompt_len=args.prompt_len.mean, output_len=args.output_len.mean)
    if args.prompt_len.lo == args.prompt_len.hi and args.output_len.lo == args.output_len.hi:
        return mean, mean
    rng = random.Random(f"hexgen-simulate-lengths-{args.seed}")
    p, o = args.prompt_len, args.output_len
    pairs = [(rng.randint(p.lo, p.hi), rng.randint(o.lo, o.hi)) for _ in range(args.num_requests)]
    return pairs, mean


def result_table(res) -> str:
    """The SimResult as aligned text lines."""
    bound = "SLO"
    return "\n".join(
        [
            f"requests    {res.completed}/{res.num_requests} completed ({res.rejected} rejected) in "
            f"{res.duration_s:.2f} s",
            f"throughput  {res.throughput_rps:.3f} req/s, {res.output_tok_s:.1f} output tok/s",
            f"TTFT        p50 {res.ttft_p50:.4f} s   p99 {res.ttft_p99:.4f} s",
            f"TPOT        p50 {res.tpot_p50:.4f} s   p99 {res.tpot_p99:.4f} s",
            f"latency     p50 {res.latency_p50:.3f} s   p99 {res.latency_p99:.3f} s   mean {res.latency_mean:.3f} s",
            f"{bound:<11} {100 * res.slo_attainment:.1f}% of requests within the latency bound",
            f"engine      {res.steps} micro-batches, peak {res.peak_running} running/replica, "
            f"{res.preemptions} preemptions, busiest stage computing {100 * res.bottleneck_util:.0f}% of the time",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from hexgen.planner.search import Slo, plan_cluster
        from hexgen.planner.simulator import SimConfig, max_rate_under_slo, simulate

        if bool(args.cluster) == bool(args.hetero_config):
            raise ConfigError("--cluster / --hetero-config: give exactly one deployment source")
        cost = _cost_model(args)
        stream, mean = _lengths(args)
        slo = Slo(latency_s=args.slo_latency)
        if args.cluster:
            from hexgen.planner.cluster import load_cluster

            cluster = load_cluster(args.cluster)
            plan = plan_cluster(cluster, cost, mean, slo, time_budget_s=args.time_budget, seed=args.seed)
        else:
            plan, cluster = _explicit_plan(args, cost, mean, slo)
        config = SimConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
        micro = not args.no_micro_batches
        res = simulate(
            plan,
            cost,
            cluster,
            rate=args.rate,
            num_requests=args.num_requests,
            workload=stream,
            slo=slo,
            seed=args.seed,
            micro_batches=micro,
            config=config,
        )
        max_rate = None
        if args.max_rate:
            max_rate = max_rate_under_slo(
                plan,
                cost,
                cluster,
                stream,
                slo,
                args.attainment,
                num_requests=min(args.num_requests, 500),
                seed=args.seed,
                micro_batches=micro,
                config=config,
            )
    except HexGenError as e:
        print(f"hexgen simulate: {e}", file=sys.stderr)
        return 2
    if args.json:
        from hexgen.planner.report import plan_to_dict

        out: dict[str, Any] = {"plan": plan_to_dict(plan), "result": res.as_dict()}
        if max_rate is not None:
            out["max_rate_under_slo"] = max_rate
            out["attainment"] = args.attainment
        print(json.dumps(out, indent=2, default=str))
        return 0
    from hexgen.planner.report import plan_table

    print(plan_table(plan, compare=False))
    print()
    rate = "all at once" if math.isinf(args.rate) else f"Poisson {args.rate:g} req/s"
    print(
        f"simulated {args.num_requests} requests ({rate}; prompt {args.prompt_len.lo}"
        f"{'' if args.prompt_len.lo == args.prompt_len.hi else ':' + str(args.prompt_len.hi)}, output "
        f"{args.output_len.lo}{'' if args.output_len.lo == args.output_len.hi else ':' + str(args.output_len.hi)}"
        f" tokens; SLO {args.slo_latency:g} s; seed {args.seed})"
    )
    print(result_table(res))
    if max_rate is not None:
        print(f"max rate    {max_rate:.3f} req/s with {100 * args.attainment:.0f}% of requests within the SLO")
    return 0


if __name__ == "__main__":
    sys.exit(main())
