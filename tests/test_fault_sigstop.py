"""A pipeline frozen past its lease (SIGSTOP of its rank mid-generation, SIGCONT after 3 leases): the other
pipeline takes its requests over and resumes them; when the frozen one wakes up, its late posts are refused
or match what is there, so every request still reads each position once and one ``done``."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from hexgen.client import HexGenClient
from hexgen.wire import keys as C
from hexgen.wire.protocol import DoneEvent, TokenEvent, parse_event
from tests.serving_harness import PipelineSpec, start_deployment
from tests.test_fault import held_by

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]
PIPELINES = [PipelineSpec("p0", (1,), (4,)), PipelineSpec("p1", (1,), (4,))]
N_TOKENS = 40
LEASE_S = 2.0


@pytest.fixture
def dep(tmp_path):
    d = start_deployment(str(tmp_path), PIPELINES, worker_args=("--max-num-seqs", "3"), lease_s=LEASE_S,
                         result_ttl_s=600)
    yield d
    d.stop()


async def test_pipeline_frozen_past_its_lease_loses_and_duplicates_nothing(dep):
    r = dep.client()
    async with HexGenClient(dep.url, block_ms=200, timeout_s=120) as client:
        tasks = [asyncio.create_task(client.generate(f"prompt {i} once upon a time", request_id=f"z{i}",
                                                     max_new_tokens=N_TOKENS, ignore_eos=True)) for i in range(6)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until p0 is mid-generation
            held = held_by(r, "p0")
            if held and any(3 <= n < N_TOKENS // 2 for n in held.values()):
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail(f"p0 never held a request mid-generation: {held_by(r, 'p0')}")
        frozen = dep.rank_pid("p0", 0)
        os.kill(frozen, signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            deadline = time.monotonic() + 60  # p1 takes p0's entries after the lease
            while time.monotonic() < deadline and any(k in held_by(r, "p0") for k in held):
                await asyncio.sleep(0.1)
            taken_s = time.monotonic() - t_stop
            await asyncio.sleep(max(0.0, 3 * LEASE_S - taken_s))
        finally:
            os.kill(frozen, signal.SIGCONT)
        results = await asyncio.gather(*tasks)
        recovery_s = time.monotonic() - t_stop
    for res in results:
        events = [parse_event(f) for _, f in r.xrange(C.result_stream(res.id))]
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        assert [e.seq for e in tokens] == list(range(N_TOKENS)), res.id
        assert sum(isinstance(e, DoneEvent) for e in events) == 1 and isinstance(events[-1], DoneEvent), res.id
        assert len(res.token_ids) == N_TOKENS
    deadline = time.monotonic() + 30
    while r.xpending(C.work_stream("tiny"), C.PIPELINES_GROUP)["pending"] and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert r.xpending(C.work_stream("tiny"), C.PIPELINES_GROUP)["pending"] == 0
    r.close()
    print(f"\nSIGSTOP past the lease: {len(held)} requests held by the frozen pipeline, taken over "
          f"{taken_s:.1f}s after the stop; 6 requests, 0 lost, 0 duplicated, all done {recovery_s:.1f}s after it")
