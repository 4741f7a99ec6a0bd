#!/usr/bin/env python3
"""What taking work costs the stage-0 engine thread per step: ``RedisSource.poll(64, 0)`` timed against a
private redis-server, once per simulated step (a sleep), with a work item arriving every 10th step::

    .venv/bin/python scripts/serve_poll_cost.py [--step-ms 20] [--seconds 4]

Run it from the root of the tree to measure (it imports that tree's hexgen). Prints the p50 / p90 / mean of
the call. Needs redis-server (tests/redis_server.py finds it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import redis  # noqa: E402

from hexgen.engine.types import Request, SamplingParams  # noqa: E402
from hexgen.wire import keys as C  # noqa: E402
from hexgen.wire.protocol import encode_work_item  # noqa: E402
from tests.redis_server import RedisServer, redis_server_binary  # noqa: E402
from workers.intake import RedisSource  # noqa: E402
from workers.io_config import IOConfig  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step-ms", type=float, default=20.0, help="simulated engine step (default 20 ms)")
    p.add_argument("--seconds", type=float, default=4.0, help="how long to run (default 4 s)")
    args = p.parse_args()
    binary = redis_server_binary()
    if binary is None:
        print("redis-server is not installed", file=sys.stderr)
        return 2
    server = RedisServer(binary)
    url = server.start()
    r = redis.Redis.from_url(url)
    src = RedisSource(IOConfig(url, "tiny", "p0")).start()
    try:
        src.poll(64, 0.2)  # creates the group
        costs: list[float] = []
        taken = 0
        for i in range(int(args.seconds * 1000 / args.step_ms)):
            if i % 10 == 0:
                req = Request(f"r{i}", [1, 2, 3], SamplingParams(max_new_tokens=4))
                r.xadd(C.work_stream("tiny"), encode_work_item(req, "tiny"))
            time.sleep(args.step_ms / 1000)
            t = time.perf_counter()
            out = src.poll(64, 0.0)
            costs.append(time.perf_counter() - t)
            taken += len(out)
            for q in out:
                src.finished(q.request_id)
    finally:
        src.close()
        r.close()
        server.stop()
    costs.sort()
    print(f"poll(64, 0) on the engine thread, {args.step_ms:g} ms steps: p50 {1e6 * statistics.median(costs):.1f} us, "
          f"p90 {1e6 * costs[int(0.9 * len(costs))]:.1f} us, mean {1e6 * statistics.mean(costs):.1f} us over "
          f"{len(costs)} steps; {taken} requests taken")
    return 0


if __name__ == "__main__":
    sys.exit(main())
