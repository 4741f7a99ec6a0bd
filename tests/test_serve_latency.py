"""Serving latency: bench serve's paired TTFT differences and client send lateness; the head's queue depth."""
from __future__ import annotations

from hexgen.bench.serve import _Item
from hexgen.bench.serve_report import client_lateness, paired_ttft_diff
from hexgen.bench.stats import RequestTiming
from hexgen.engine.types import Request, SamplingParams


def timing(offered: float, first: float) -> RequestTiming:
    return RequestTiming(offered, [first, first + 0.05])


def test_paired_diff_compares_each_request_with_itself():
    # p50s fall on different requests (0.30 vs 0.40 s) though each request is only 1 ms slower via Redis
    direct = [timing(0, 0.1), timing(0, 0.3), timing(0, 0.5), timing(0, 0.2), timing(0, 0.9)]
    redis = [timing(0, 0.101), timing(0, 0.301), timing(0, 0.501), timing(0, 0.401), timing(0, 0.901)]
    sent = [0.0005] * 5
    out = paired_ttft_diff(direct, redis, sent)
    assert out["ttft_paired_diff_p50_ms"] == 1.0
    assert out["ttft_paired_diff_from_send_p50_ms"] == 0.5
    assert "ttft_paired_diff_from_send_p50_ms" not in paired_ttft_diff(direct, redis)


def test_client_lateness_counts_from_the_scheduled_arrival():
    items = [_Item(0.0, "x", Request(f"r{i}", [1], SamplingParams(max_new_tokens=2))) for i in range(3)]
    timings = [timing(10.0, 10.3), timing(20.0, 20.2), timing(30.0, 30.4)]
    sent = {"r0": 10.001, "r1": 20.002, "r2": 30.003}
    out = client_lateness(items, timings, sent)
    assert out == {"client_send_late_p50_ms": 2.0, "ttft_from_send_p50_ms": 299.0}


def test_group_depth_matches_queue_status_depth():
    """The head's one-MULTI depth (XLEN + XINFO GROUPS) counts what QueueStatus.depth counts."""
    from hexgen.head.status import QueueStatus, group_depth

    groups = [{"name": b"other", "pending": 9, "lag": 9}, {"name": b"pipelines", "pending": 2, "lag": 3}]
    assert group_depth(7, groups, "pipelines") == 5 == QueueStatus("s", "pipelines", 7, 2, 3).depth
    assert group_depth(7, [{"name": "pipelines", "pending": 2, "lag": None}], "pipelines") == 7  # lag unknown
    assert group_depth(4, groups[:1], "pipelines") == 4  # no such group: everything is queued
    assert group_depth(0, [], "pipelines") == 0


async def test_the_client_sends_at_the_scheduled_time_not_when_asyncio_wakes():
    """bench serve's sleep_until: never early, and late by far less than an asyncio timer (which wakes up to a
    millisecond late: epoll's millisecond timeout) so that the client's timer stops counting in the TTFT."""
    import statistics
    import time

    from hexgen.bench.serve import sleep_until

    late = []
    for i in range(30):
        deadline = time.monotonic() + 0.004 + 0.001 * (i % 3)
        await sleep_until(deadline)
        late.append(time.monotonic() - deadline)
    assert min(late) >= 0
    assert statistics.median(late) < 5e-4, late  # an asyncio timer: up to 1e-3 (a loaded CI host has slack)
