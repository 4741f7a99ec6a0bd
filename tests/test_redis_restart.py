"""Redis going away under load, on one deployment (head + a one-stage pipeline on a fixed port):

1. SIGKILL of an AOF (appendfsync everysec) redis-server mid-generation, restarted on its files: every
   request completes, each position once (seq checked), nothing left pending.
2. Redis wiped (SIGKILL, then a new empty server on the same address): groups, the function library, the
   epoch and the registrations are recreated by head and workers; each in-flight request either completes or
   ends with a clear :class:`~hexgen.client.RequestLost` error at the client (the documented choice: no
   resubmission); new requests are served again.
"""
from __future__ import annotations

import asyncio
import os
import time

import pytest

from hexgen.client import HexGenClient, RequestLost
from hexgen.wire import keys as K
from hexgen.wire.protocol import DoneEvent, TokenEvent, parse_event
from tests.redis_topology import RedisNode, binary_or_skip
from tests.reliability_harness import deploy, wait_until
from tests.serving_harness import PipelineSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
N_TOKENS = 30
PIPELINE = PipelineSpec("p0", (1,), (4,))


@pytest.fixture
def dep(tmp_path):
    node = RedisNode(binary_or_skip(), ("--save", "", "--appendonly", "yes", "--appendfsync", "everysec"))
    node.start()
    d = deploy(str(tmp_path), node, [PIPELINE], url=node.url(), worker_args=("--max-num-seqs", "4"))
    d.node = node
    yield d
    print(d.logs()[-6000:] if os.environ.get("HEXGEN_TEST_LOGS") else "")
    d.stop()


def posted(r, rid: str) -> int:
    return r.xlen(K.result_stream(rid))


async def start_requests(client, prefix: str, n: int):
    return [asyncio.create_task(client.generate(f"{prefix} {i} once upon a time", request_id=f"{prefix}{i}",
                                                max_new_tokens=N_TOKENS, ignore_eos=True)) for i in range(n)]


async def test_aof_restart_completes_everything_and_a_wipe_errors_cleanly(dep):
    node, r = dep.node, dep.client()
    async with HexGenClient(dep.url, block_ms=200, timeout_s=150) as client:
        # ---- 1. SIGKILL + restart on the AOF files --------------------------------------------------------
        tasks = await start_requests(client, "a", 6)
        await wait_until(lambda: any(posted(r, f"a{i}") >= 5 for i in range(6)), 60, "a request mid-generation")
        node.kill()
        t_kill = time.monotonic()
        await asyncio.sleep(0.5)
        node.start()
        results = await asyncio.gather(*tasks)
        aof_recovery_s = time.monotonic() - t_kill
        for res in results:
            assert res.completion_tokens == N_TOKENS and len(res.token_ids) == N_TOKENS, res.id
            events = [parse_event(f) for _, f in r.xrange(K.result_stream(res.id))]
            assert [e.seq for e in events if isinstance(e, TokenEvent)] == list(range(N_TOKENS)), res.id
            assert sum(isinstance(e, DoneEvent) for e in events) == 1, res.id
        await wait_until(lambda: r.xpending(K.work_stream("tiny"), K.PIPELINES_GROUP)["pending"] == 0, 30,
                         "every work entry acked")

        # ---- 2. wiped: a new empty server on the same address -----------------------------------------------
        epoch = r.get(K.EPOCH_KEY)
        assert epoch
        tasks = await start_requests(client, "w", 6)
        await wait_until(lambda: any(posted(r, f"w{i}") >= 5 for i in range(6)), 60, "a request mid-generation")
        node.kill()
        node.start(wipe=True)
        t_wipe = time.monotonic()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        lost = [o for o in outcomes if isinstance(o, RequestLost)]
        done = [o for o in outcomes if not isinstance(o, BaseException)]
        others = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, RequestLost)]
        assert not others, others
        assert lost, "no in-flight request noticed the wipe"
        assert all(o.completion_tokens == N_TOKENS for o in done)
        answered_s = time.monotonic() - t_wipe
        res = await client.generate("after the wipe", max_new_tokens=4, ignore_eos=True)
        serving_again_s = time.monotonic() - t_wipe
        assert res.completion_tokens == 4
        assert r.get(K.EPOCH_KEY) not in (None, epoch)
        groups = {g["name"] for g in r.xinfo_groups(K.REQUESTS_STREAM)}
        assert groups == {K.HEADS_GROUP.encode()}
        ranks = [K.worker_key(f"p0:{rank}") for rank in range(sum(PIPELINE.hetero_config))]
        await wait_until(lambda: r.exists(*ranks) == len(ranks), 10, "registrations")
        await wait_until(lambda: r.hget(K.pipeline_key("p0"), "rendezvous"), 10, "the pipeline record")
    memory = r.info("memory")["used_memory_peak_human"]
    r.close()
    logs = dep.logs()
    print(f"\nAOF restart: 6 requests, 0 lost, {logs.count('resuming at seq')} resumed after the lease, all done "
          f"{aof_recovery_s:.1f}s after the SIGKILL; wipe: "
          f"{len(lost)} in-flight requests got RequestLost, {len(done)} completed, all answered "
          f"{answered_s:.1f}s and a new request served {serving_again_s:.1f}s after the empty server started; "
          f"Redis peak memory {memory}")
