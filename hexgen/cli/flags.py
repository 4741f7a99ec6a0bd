"""What the CLIs share: the engine flags of ``hexgen generate``, ``hexgen bench`` and ``bin/worker`` (kernel
choices, ``--kernel NAME=VALUE``, see ``hexgen.config.KernelConfig``, and device emulation), and the log level
from the environment (``HEXGEN_LOG_LEVEL``), read here and passed down."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from typing import Any

from hexgen.config import KERNEL_CHOICES, KernelConfig, parse_limits

LOG_LEVEL_ENV = "HEXGEN_LOG_LEVEL"


def env_log_level(default: str = "WARNING") -> str:
    """The log level the environment asks for (``HEXGEN_LOG_LEVEL``), else ``default``."""
    return os.environ.get(LOG_LEVEL_ENV) or default


def _kernel_help() -> str:
    names = ", ".join(f"{f.name} ({'/'.join(KERNEL_CHOICES.get(f.name, ('on', 'off')))})" for f in fields(KernelConfig))
    return (
        f"kernel choice NAME=VALUE, repeatable, e.g. --kernel gemv=cublas --kernel fused=off; names: {names}; "
        f"default: {KernelConfig().describe()}"
    )


def add_tp_ratio_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--tp-ratio 2:1 1``: each stage's per-rank shares (uneven TP shards, ``hexgen.shards``)."""
    p.add_argument(
        "--tp-ratio",
        "--tp_ratio",
        dest="tp_ratio",
        nargs="+",
        metavar="SHARES",
        help="each stage's per-rank shares, colon-separated, stages like --hetero-config, e.g. 2:1 1 "
        "(default: even shards)",
    )


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", action="append", default=[], metavar="NAME=VALUE", help=_kernel_help())
    p.add_argument(
        "--emulate-devices",
        default="",
        metavar="RANK=SMS:GIB,...",
        help="cut GPUs down to fewer SMs and less memory, per global rank, e.g. 2=40:24,3=16:16 "
        "(0 keeps that resource; hexgen/engine/emulation.py)",
    )
    p.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        default=None,
        help="do not reuse the KV blocks of earlier requests' prefixes (default: reuse them; TOML "
        "[engine] prefix_cache)",
    )


def engine_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig fields these flags set (validated; those not given keep the engine's defaults)."""
    out: dict[str, Any] = {}
    if args.kernel:
        out["kernels"] = KernelConfig.from_flags(args.kernel)
    if args.emulate_devices:
        out["emulate_devices"] = tuple(sorted(parse_limits(args.emulate_devices).items()))
    if getattr(args, "prefix_cache", None) is not None:
        out["prefix_cache"] = args.prefix_cache
    return out
