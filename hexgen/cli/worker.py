"""``bin/worker``: parse flags → WorkerOptions → :class:`workers.supervisor.Worker` (the TP ranks of one stage),
or, without ``--stage``, AgentOptions → :class:`workers.agent.Agent` (waits for the planning head's assignment).

    bin/worker --config config/demo.toml --stage 1 [--pipeline p0] [--devices 0,1] [--redis-url URL]
    bin/worker --config deploy.toml [--devices 0,1,2,3] [--node NAME] [--gpu-type H100]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from hexgen.cli.flags import add_engine_flags, engine_fields, env_log_level
from hexgen.config import KV_CACHE_DTYPES
from hexgen.errors import HexGenError
from hexgen.logutil import setup_logging
from hexgen.quantization import QUANTIZATIONS
from hexgen.wire.settings import add_settings_args, settings_from_args

ADVERTISE_HOST_ENV = "HEXGEN_ADVERTISE_HOST"


def _devices(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated device indices, e.g. 0,1") from e
    if not out or any(d < 0 for d in out):
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated device indices ≥ 0, e.g. 0,1")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="worker",
        description="HexGen worker: start the TP ranks of one stage "
        "of one pipeline; they register in Redis and form the pipeline with the "
        "other stages' workers. Without --stage: a placement agent that offers "
        "this host's devices to bin/head --auto-plan and runs the stages it assigns.",
    )
    add_settings_args(p)
    p.add_argument(
        "--stage",
        type=int,
        help="stage index of this worker (0 = first); without it the worker "
        "is a placement agent that offers --devices to bin/head --auto-plan and runs what it assigns",
    )
    p.add_argument("--pipeline", help="pipeline id from the config (default: its only pipeline)")
    p.add_argument("--devices", type=_devices, default=(), help="CUDA device index per rank, e.g. 0,1")
    p.add_argument(
        "--advertise-host",
        default=os.environ.get(ADVERTISE_HOST_ENV),
        help=f"rendezvous address other hosts reach stage 0 rank 0 at (stage 0 only; default "
        f"${ADVERTISE_HOST_ENV}, else 127.0.0.1 when all ranks share a host, else the address "
        "on the route to Redis)",
    )
    p.add_argument(
        "--drain-timeout", type=float, default=120.0, help="seconds to finish in-flight work on SIGTERM (default 120)"
    )
    p.add_argument(
        "--form-timeout", type=float, default=0.0, help="seconds to wait for the other stages (default 0: forever)"
    )
    p.add_argument(
        "--no-restart",
        dest="restart",
        action="store_false",
        help="exit instead of restarting ranks when the pipeline breaks",
    )
    p.add_argument("--max-restarts", type=int, default=10, help="restarts allowed within 10 minutes")
    p.add_argument("--max-num-seqs", type=int, help="requests in flight per pipeline (engine default 64)")
    p.add_argument("--kv-tokens", type=int, help="KV cache capacity in tokens per rank on CPU")
    p.add_argument("--cuda-graphs", action="store_true", help="capture decode steps in CUDA graphs")
    add_engine_flags(p)
    p.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default=None,
        help="KV cache: auto (the model dtype) or fp8 (e4m3); default: the config's kv_cache_dtype",
    )
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="weights: auto (the checkpoint's format) or fp8 (e4m3, quantized at load); default: the config's",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU: torch threads per rank (default: the host's cores shared evenly by every CPU rank "
        "registered on this host, of all pipelines, recounted while running)",
    )
    p.add_argument(
        "--log-level",
        default=env_log_level("INFO"),
        help="DEBUG, INFO, WARNING, ERROR (default $HEXGEN_LOG_LEVEL, else INFO)",
    )
    a = p.add_argument_group("placement agent (no --stage)")
    a.add_argument("--node", help="node name the planner sees (default: the hostname)")
    a.add_argument("--agent-id", help="registry id of this agent (default: the node name); one agent per id")
    a.add_argument("--gpu-type", help="device spec name (default: from torch.cuda.get_device_name; CPU on cpu)")
    a.add_argument(
        "--memory-gib", type=float, help="memory per device to report (default: the device's total; the host's on cpu)"
    )
    return p


def agent_main(args: argparse.Namespace, engine: dict) -> int:
    """``bin/worker`` without ``--stage``: run a placement agent."""
    setup_logging("agent", "-", args.log_level)
    from workers.agent import Agent, AgentOptions, detect_devices

    if args.pipeline:
        print("worker: --pipeline needs --stage; an agent runs whatever pipeline the head assigns", file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args)
        kind, memory, devices = detect_devices(settings, args.devices, args.gpu_type, args.memory_gib)
        node = args.node or socket.gethostname().split(".")[0]
        opts = AgentOptions(
            settings=settings,
            agent_id=args.agent_id or node,
            node=node,
            device_type=kind,
            memory=memory,
            devices=devices,
            advertise_host=args.advertise_host or None,
            drain_timeout_s=args.drain_timeout,
            restart=args.restart,
            max_restarts=args.max_restarts,
            engine_overrides=engine,
            log_level=args.log_level,
        )
        agent = Agent(opts)
    except HexGenError as e:
        print(f"worker: {e}", file=sys.stderr)
        return 2
    return agent.run()


def engine_overrides(args: argparse.Namespace) -> dict:
    """The EngineConfig fields the flags set (those not given keep the engine's defaults)."""
    out = {
        k: v
        for k, v in (
            ("max_num_seqs", args.max_num_seqs),
            ("cpu_kv_tokens", args.kv_tokens),
            ("cuda_graphs", args.cuda_graphs or None),
            ("kv_cache_dtype", args.kv_cache_dtype),
            ("quantization", args.quantization),
            ("cpu_threads", args.threads),
        )
        if v is not None
    }
    return {**out, **engine_fields(args)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        engine = engine_overrides(args)
    except HexGenError as e:
        print(f"worker: {e}", file=sys.stderr)
        return 2
    if args.stage is None:
        return agent_main(args, engine)
    setup_logging("parent", args.stage, args.log_level)
    from workers.options import WorkerOptions, pick_pipeline
    from workers.supervisor import Worker

    try:
        settings = settings_from_args(args)
        opts = WorkerOptions(
            settings=settings,
            pipeline_id=pick_pipeline(settings, args.pipeline),
            stage=args.stage,
            devices=args.devices,
            advertise_host=args.advertise_host or None,
            drain_timeout_s=args.drain_timeout,
            form_timeout_s=args.form_timeout,
            restart=args.restart,
            max_restarts=args.max_restarts,
            engine_overrides=engine,
            log_level=args.log_level,
        )
        worker = Worker(opts)
    except HexGenError as e:
        print(f"worker: {e}", file=sys.stderr)
        return 2
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
