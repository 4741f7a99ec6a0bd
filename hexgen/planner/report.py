"""A plan as a table (``bin/hexgen plan``), as JSON, and as a deployment TOML that ``bin/head`` and
``bin/worker`` run as is (one ``[[pipelines]]`` table per replica, with a comment per stage saying where it runs
and the worker command for it)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from hexgen.config import normalize_dtype
from hexgen.planner.plans import Plan, ReplicaPlan, StagePlan

GiB = float(1 << 30)
_DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def replica_id(index: int) -> str:
    """Pipeline id of the index-th replica in the deployment file."""
    return f"r{index}"


def _devices(stage: StagePlan) -> str:
    return f"{stage.node}:" + ",".join(str(g.index) for g in stage.gpus)


def _replica_line(i: int, r: ReplicaPlan) -> str:
    return (
        f"replica {replica_id(i)}: hetero-config {' '.join(map(str, r.hetero_config))} / pp-partition "
        f"{' '.join(map(str, r.pp_partition))}; batch {r.max_batch}, {r.rate:.2f} req/s, latency "
        f"{r.latency_s:.1f} s, decode step {r.decode_step_s * 1e3:.1f} ms"
    )


def plan_summary(plan: Plan) -> str:
    """One line: replicas, GPUs, predicted rate and latency."""
    return (
        f"{plan.name}: {len(plan.replicas)} replica(s) on {plan.num_gpus} GPUs ({len(plan.unused)} unused), "
        f"{plan.rate:.2f} req/s, mean latency {plan.latency_s:.1f} s"
    )


def plan_table(plan: Plan, *, baseline: Plan | None = None, notes: Sequence[str] = (), compare: bool = True) -> str:
    """The plan per replica and stage (devices as node:index, TP, layers, memory, KV), then any ``notes`` (e.g.
    why pure TP / pure PP do not fit) and, when ``compare``, the comparison with ``baseline`` (the best
    symmetric layout)."""
    lines = [plan_summary(plan) + f"; search {plan.search_s:.2f} s"]
    head = (
        f"  {'stage':>5}  {'devices':<24} {'GPU':<10} {'TP':>3}  {'layers':<9} {'mem/GPU GiB':>14}  {'KV tokens':>10}"
    )
    for i, r in enumerate(plan.replicas):
        lines += [_replica_line(i, r), head]
        for j, s in enumerate(r.stages):
            mem = f"{s.memory_bytes / GiB:.1f}/{s.gpus[0].device.memory_bytes / GiB:.1f}"
            lines.append(
                f"  {j:>5}  {_devices(s):<24} {s.device_name:<10} {s.tp:>3}  "
                f"{f'{s.layer_start}-{s.layer_end - 1}':<9} {mem:>14}  {s.kv_tokens:>10}"
            )
    if plan.unused:
        lines.append("unused: " + ", ".join(str(g) for g in plan.unused))
    for note in notes:
        lines.append(note)
    if not compare:
        return "\n".join(lines)
    if baseline is None:
        lines.append("best symmetric layout: none fits")
    else:
        lines.append("best symmetric layout: " + plan_summary(baseline))
        for i, r in enumerate(baseline.replicas):
            lines.append("  " + _replica_line(i, r) + " on " + ", ".join(_devices(s) for s in r.stages))
        if baseline.rate > 0:
            lines.append(
                f"predicted gain: {plan.rate / baseline.rate:.2f}x the request rate "
                f"({plan.rate:.2f} vs {baseline.rate:.2f} req/s)"
            )
    return "\n".join(lines)


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as plain JSON-able data."""
    return {
        "name": plan.name,
        "rate": plan.rate,
        "latency_s": plan.latency_s,
        "search_s": plan.search_s,
        "unused": [str(g) for g in plan.unused],
        "replicas": [
            {
                "id": replica_id(i),
                "hetero_config": list(r.hetero_config),
                "pp_partition": list(r.pp_partition),
                "max_batch": r.max_batch,
                "rate": r.rate,
                "latency_s": r.latency_s,
                "decode_step_s": r.decode_step_s,
                "stages": [
                    {
                        "node": s.node,
                        "gpu": s.device_name,
                        "devices": [g.index for g in s.gpus],
                        "tp": s.tp,
                        "layers": [s.layer_start, s.layer_end - 1],
                        "memory_bytes": s.memory_bytes,
                        "kv_tokens": s.kv_tokens,
                    }
                    for s in r.stages
                ],
            }
            for i, r in enumerate(plan.replicas)
        ],
    }


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a TOML basic string


def plan_to_toml(
    plan: Plan,
    *,
    model_name: str,
    model_path: str | None,
    preset: str | None,
    dtype: str,
    redis_url: str,
    config_path: str = "deploy.toml",
    quantization: str = "auto",
) -> str:
    """A deployment file for ``plan``; loads with hexgen.wire.settings.load_settings. ``config_path`` is
    the name the worker commands in its comments use; ``quantization`` other than auto is written out."""
    if bool(model_path) == bool(preset):
        from hexgen.errors import ConfigError

        raise ConfigError("model_path, preset: give exactly one")
    dt = _DTYPE_SHORT[normalize_dtype(dtype)]
    out = [
        f"# Planned by `bin/hexgen plan`: {plan_summary(plan)}.",
        "# Start the workers below (any order; they find each other through Redis), then on any host:",
        f"#   bin/head --config {config_path}",
        f"dtype = {_q(dt)}",
        'device = "cuda"',
        *([f"quantization = {_q(quantization)}"] if quantization != "auto" else []),
        "",
        "[redis]",
        f"url = {_q(redis_url)}",
        "",
        "[model]",
        f"name = {_q(model_name)}",
    ]
    out.append(f"path = {_q(model_path)}" if model_path else f"preset = {_q(preset or '')}")
    for i, r in enumerate(plan.replicas):
        pid = replica_id(i)
        out += ["", f"# Pipeline {pid}: {_replica_line(i, r).partition(': ')[2]}"]
        for j, s in enumerate(r.stages):
            out.append(
                f"#   stage {j}: TP {s.tp} on {s.node} ({s.device_name} cuda:"
                f"{','.join(str(g.index) for g in s.gpus)}), layers {s.layer_start}-{s.layer_end - 1}"
            )
            out.append(
                f"#     on {s.node}: bin/worker --config {config_path} --pipeline {pid} --stage {j} "
                f"--max-num-seqs {r.max_batch}"
            )
        devices = [f"cuda:{g.index}" for s in r.stages for g in s.gpus]
        out += [
            "[[pipelines]]",
            f"id = {_q(pid)}",
            f"hetero_config = [{', '.join(map(str, r.hetero_config))}]",
            f"pp_partition = [{', '.join(map(str, r.pp_partition))}]",
            f"devices = [{', '.join(_q(d) for d in devices)}]",
        ]
    return "\n".join(out) + "\n"
