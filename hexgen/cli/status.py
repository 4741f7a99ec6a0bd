"""``hexgen status [--json]``: workers, pipelines and queue depths, read from Redis."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hexgen.errors import ConfigError
from hexgen.head.status import StatusReport, collect_status, format_status
from hexgen.wire.settings import REDIS_URL_ENV, async_redis, load_redis_url, redact_url


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hexgen status", description="Show HexGen workers, pipelines and queues")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--config", help="deployment TOML file (only [redis] url is read)")
    parser.add_argument("--redis-url", help=f"Redis URL (overrides ${REDIS_URL_ENV} and the file)")
    return parser


async def fetch_status(url: str) -> StatusReport:
    r = async_redis(url, socket_timeout=10)
    try:
        return await collect_status(r)
    finally:
        await r.aclose()


async def fetch_placement(url: str) -> dict:
    """Agents and the deployed plan (automatic placement)."""
    from hexgen.head.placement import placement_status

    r = async_redis(url, socket_timeout=10)
    try:
        return await placement_status(r)
    finally:
        await r.aclose()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        url = load_redis_url(args.config, args.redis_url)
        report = asyncio.run(fetch_status(url))
        placement = asyncio.run(fetch_placement(url))
    except ConfigError as e:
        print(f"hexgen status: {e}", file=sys.stderr)
        return 2
    except (RedisConnectionError, RedisTimeoutError) as e:
        print(f"hexgen status: cannot reach Redis at {redact_url(url)}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**report.to_dict(), "placement": placement}, indent=2, sort_keys=True))
    else:
        from hexgen.head.placement import format_placement

        extra = format_placement(placement)
        print(format_status(report) + (f"\n\n{extra}" if extra else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
