"""Measure layouts under load for the planner's validation (docs/planner.md): one engine run per layout.

    python scripts/planner_measure.py RUNS.json OUT.json [NAME,NAME...]   (default: every run, in file order)

Names given run in that order, and a repeated name runs again (recorded as "name#2", ...): alternating A/B
comparisons.

RUNS.json: {"preset": "llama-2-70b", "dtype": "bf16", "requests": 256, "prompt_range": [64, 512],
            "output_range": [32, 256], "seed": 0, "max_num_seqs": 128,
            "runs": [{"name": "tp4", "hetero": [4], "partition": [80], "micro_batches": 0, "cuda_graphs": true,
                      "emulate": "", "devices": [0, 1, 2, 3]}, ...],
            "emulate_by_device": {"2": "40:24", "3": "16:16"}}
A run may set its own "requests", "prompt_range", "output_range", "max_num_seqs" and "async_steps", and
"tp_ratio" (uneven TP shards per stage, e.g. [[3, 1]]).

Every run offers the same fixed-seed requests at once (after a warm-up phase) and records output tokens/s,
TTFT/TPOT percentiles and the mean request latency; ``emulate`` (or the spec's ``emulate_by_device``) sets
``EngineConfig.emulate_devices`` for its ranks. A run that fails is recorded with its error and the next one still runs.
"""
from __future__ import annotations

import json
import sys
import time
import traceback

from hexgen.bench.engine_bench import at_once, run_engine
from hexgen.bench.stats import percentile, summarize
from hexgen.bench.workload import Shape, make_requests, mixed_shapes
from hexgen.config import EngineConfig, Layout, preset
from hexgen.engine.runner import ModelSpec


def emulate_text(run: dict, by_device: dict) -> str:
    """``EngineConfig.emulate_devices`` of a run: its own ``emulate`` text, else the spec's per-physical-device
    profiles (``{"2": "40:24"}``: cuda:2 has 40 SMs and 24 GiB) mapped onto the ranks that use each device."""
    if run.get("emulate"):
        return run["emulate"]
    devices = run.get("devices") or list(range(sum(run["hetero"])))
    return ",".join(f"{r}={by_device[str(d)]}" for r, d in enumerate(devices) if str(d) in by_device)


def measure(spec: dict, run: dict) -> dict:
    cfg = preset(spec["preset"])
    model = ModelSpec(preset=spec["preset"], random_weights=True)
    layout = Layout.build(cfg, run["hetero"], run.get("partition"), run.get("tp_ratio"))
    engine = EngineConfig(dtype=spec.get("dtype", "bf16"),
                          device=spec.get("device", "cuda"),
                          cuda_graphs=run.get("cuda_graphs", True) and spec.get("device", "cuda") == "cuda",
                          micro_batches=run.get("micro_batches", 0),
                          max_num_seqs=run.get("max_num_seqs", spec.get("max_num_seqs", 128)),
                          async_steps=run.get("async_steps", True), async_steps_tp=run.get("async_steps_tp", False),
                          max_num_batched_tokens=spec.get("max_num_batched_tokens", 2048),
                          gpu_memory_fraction=spec.get("gpu_memory_fraction", 0.9),
                          emulate_devices=emulate_text(run, spec.get("emulate_by_device", {})))
    spec = {**spec, **{k: run[k] for k in ("requests", "prompt_range", "output_range") if k in run}}
    shapes = mixed_shapes(spec["requests"], tuple(spec["prompt_range"]), tuple(spec["output_range"]),
                          spec.get("seed", 0))
    requests = make_requests(shapes, cfg.vocab_size, "req", spec.get("seed", 0))
    warm = make_requests([Shape(spec["prompt_range"][0], 8)] * 4, cfg.vocab_size, "warm", seed=99)
    t0 = time.monotonic()
    res = run_engine(layout, model, engine, at_once([warm, requests]), run.get("devices"))
    mine = [res.timings[r.request_id] for r in requests]
    out = summarize(mine)
    lat = [t.tokens[-1] - t.offered for t in mine]
    out.update(latency_mean_s=round(sum(lat) / len(lat), 3), latency_p50_s=round(percentile(lat, 50), 3),
               requests_per_s=round(len(mine) / out["span_s"], 3), run_wall_s=round(res.wall_s, 1),
               ranks=[vars(r) if not hasattr(r, 'to_dict') else r.to_dict() for r in res.ranks],
               total_s=round(time.monotonic() - t0, 1))
    return out


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    results = {"spec": spec, "runs": {}}
    by_name = {run["name"]: run for run in spec["runs"]}
    names = sys.argv[3].split(",") if len(sys.argv) > 3 else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        print(f"planner_measure: no run named {', '.join(unknown)} in {sys.argv[1]}", file=sys.stderr)
        return 2
    seen: dict[str, int] = {}
    for name in names:  # in the order given; a name given again runs again (key "name#2", ...)
        run = by_name[name]
        seen[name] = seen.get(name, 0) + 1
        key = name if seen[name] == 1 else f"{name}#{seen[name]}"
        print(f"=== {run['name']}: {run['hetero']} / {run.get('partition')} tp_ratio={run.get('tp_ratio', [])} "
              f"mb={run.get('micro_batches', 0)} emulate={run.get('emulate', '')!r}", flush=True)
        try:
            res = measure(spec, run)
        except Exception as e:  # noqa: BLE001 - record and go on to the next layout
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
        results["runs"][key] = {**run, **res}
        print(json.dumps(res), flush=True)
        with open(sys.argv[2], "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
