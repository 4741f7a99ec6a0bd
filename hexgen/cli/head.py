"""``bin/head``: parse flags → Settings → :func:`hexgen.head.service.run_head`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from hexgen.cli.flags import env_log_level
from hexgen.errors import ConfigError
from hexgen.head.service import run_head
from hexgen.wire import trace
from hexgen.wire.settings import API_KEY_ENV, add_settings_args, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="head", description="HexGen head: validate, tokenize and queue requests from hexgen:requests"
    )
    add_settings_args(parser)
    parser.add_argument(
        "--log-level",
        default=env_log_level("INFO"),
        help="DEBUG, INFO, WARNING, ERROR (default $HEXGEN_LOG_LEVEL, else INFO)",
    )
    h = parser.add_argument_group("HTTP API (OpenAI-compatible; docs/http-api.md)")
    h.add_argument("--http-port", type=int, help="serve HTTP on this port (default: [http] port; 0: off)")
    h.add_argument("--http-host", help="address to listen on (default: [http] host, 127.0.0.1)")
    h.add_argument(
        "--api-key",
        help=f"key /v1/* requests must send as 'Authorization: Bearer <key>' (default: "
        f"${API_KEY_ENV}, then [http] api_key; prefer those: a flag shows in ps)",
    )
    g = parser.add_argument_group("automatic placement")
    g.add_argument(
        "--auto-plan",
        action="store_true",
        help="plan the stages of the registered agents "
        "(bin/worker without --stage) and re-plan when agents join or leave",
    )
    g.add_argument(
        "--slo-latency",
        type=float,
        default=30.0,
        help="end-to-end latency bound per request in seconds (0: none; default 30)",
    )
    g.add_argument("--plan-prompt-len", type=int, default=512, help="mean prompt tokens to plan for (512)")
    g.add_argument("--plan-output-len", type=int, default=128, help="mean output tokens to plan for (128)")
    g.add_argument(
        "--plan-max-num-seqs",
        type=int,
        default=64,
        help="requests in flight per pipeline to plan for: the agents' --max-num-seqs (default 64, the engine's)",
    )
    g.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds the set of agents must stay unchanged before a re-plan (default: 2 heartbeat intervals)",
    )
    g.add_argument("--plan-time-budget", type=float, default=10.0, help="seconds the search may take (10)")
    g.add_argument(
        "--network-gbps", type=float, default=0.0, help="network between nodes in Gbit/s (default: the planner's 10)"
    )
    return parser


def placement_options(args: argparse.Namespace, settings):
    """The planner the head's placement loop asks (from the flags), or None without --auto-plan."""
    if not args.auto_plan:
        return None
    from hexgen.planner.placement import PlacementOptions, Placer

    return Placer(
        settings,
        PlacementOptions(
            slo_latency_s=args.slo_latency,
            prompt_len=args.plan_prompt_len,
            output_len=args.plan_output_len,
            max_num_seqs=args.plan_max_num_seqs,
            settle_s=args.settle,
            time_budget_s=args.plan_time_budget,
            network_gbps=args.network_gbps,
        ),
    )


def http_settings_overrides(args: argparse.Namespace) -> dict:
    """The dotted [http] overrides of the flags (None: not given)."""
    return {"http.port": args.http_port, "http.host": args.http_host, "http.api_key": args.api_key}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args, extra=http_settings_overrides(args))
        placement = placement_options(args, settings)
    except ConfigError as e:
        print(f"head: {e}", file=sys.stderr)
        return 2
    trace.configure(settings.trace_timing)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(run_head(settings, placement=placement))
    except ConfigError as e:
        print(f"head: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
