"""Redis failover under Sentinel: a master, a replica and three sentinels on loopback.

1. The loss window of asynchronous replication, measured: writers XADD as fast as they can, the replica
   falls behind (paused for 0.5 s), the master is SIGKILLed, and we count the acknowledged entries the
   promoted replica does not have — without WAIT, and with ``WAIT 1`` after each XADD (the
   ``wait_replicas`` knob), where none may be missing.
2. Serving across a failover: head, a pipeline and the client all connect with a
   ``redis+sentinel://`` URL; the master is SIGKILLed under load; every request whose XADD was acknowledged
   completes (seq checked on the new master), and all three follow the new master by themselves.
"""
from __future__ import annotations

import asyncio
import signal
import statistics
import threading
import time

import pytest
import redis

from hexgen.client import HexGenClient
from hexgen.wire import keys as K
from hexgen.wire.protocol import DoneEvent, TokenEvent, parse_event
from tests.redis_topology import SentinelSet, binary_or_skip
from tests.reliability_harness import deploy, wait_until
from tests.serving_harness import PipelineSpec

pytestmark = [pytest.mark.slow]
WRITERS = 4
MIN_ACKED = 200  # acknowledged XADDs before the replica starts lagging


@pytest.fixture
def sentinels():
    s = SentinelSet(binary_or_skip()).start()
    yield s
    s.stop()


PAYLOAD = b"x" * 16384


def _write_until_killed(port: int, use_wait: bool, stop: threading.Event, acked: list, latencies: list,
                        lagging: threading.Event) -> None:
    r = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=1)
    while not stop.is_set():
        t = time.perf_counter()
        try:
            eid = r.xadd("loss:test", {"p": PAYLOAD})
            if use_wait and r.wait(1, 100) < 1:
                continue  # not known to be on the replica: not acknowledged to the caller
        except (redis.ConnectionError, redis.TimeoutError):
            return
        if not lagging.is_set():
            latencies.append(time.perf_counter() - t)
        acked.append(eid)


def measure_loss(s: SentinelSet, use_wait: bool, write_s: float = 0.5, lag_s: float = 0.5) -> dict:
    """Acknowledged XADDs missing on the promoted replica after SIGKILL of the master. The writers run at
    least ``write_s`` and until MIN_ACKED of their XADDs are acknowledged; then the replica is paused
    (SIGSTOP) for ``lag_s`` before the kill: a replica that lags, as one does under load or across a slow
    link, holds none of what the master acknowledged meanwhile."""
    old, new = (s.master, s.replica) if s.master_port() == s.master.port else (s.replica, s.master)
    stop, lagging, acked, lat = threading.Event(), threading.Event(), [], []
    threads = [threading.Thread(target=_write_until_killed, args=(old.port, use_wait, stop, acked, lat, lagging))
               for _ in range(WRITERS)]
    for t in threads:
        t.start()
    time.sleep(write_s)
    deadline = time.monotonic() + 20  # a loaded machine: WAIT may need a while before the first acknowledgements
    while len(acked) < MIN_ACKED and time.monotonic() < deadline:
        time.sleep(0.05)
    lagging.set()
    new.proc.send_signal(signal.SIGSTOP)
    time.sleep(lag_s)
    old.kill()
    new.proc.send_signal(signal.SIGCONT)
    t_kill = time.monotonic()
    stop.set()
    for t in threads:
        t.join(10)
    deadline = time.monotonic() + 30
    while s.master_port() != new.port:
        assert time.monotonic() < deadline, "no failover within 30s"
        time.sleep(0.05)
    failover_s = time.monotonic() - t_kill
    r = redis.Redis(port=new.port, socket_timeout=5)
    present = {eid for eid, _ in r.xrange("loss:test")}
    r.delete("loss:test")
    r.close()
    lost = [eid for eid in acked if eid not in present]
    return {"acked": len(acked), "lost": len(lost), "failover_s": failover_s,
            "p50_ms": statistics.median(lat) * 1000 if lat else 0.0}


def rejoin_old_master(s: SentinelSet) -> None:
    """Start the killed node again (empty); the sentinels make it a replica of the new master."""
    old = s.master if s.master.proc is None else s.replica
    old.start()
    r = redis.Redis(port=old.port, socket_timeout=2)
    deadline = time.monotonic() + 30
    while r.info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, f"old master never became a replica: {old.log()}"
        time.sleep(0.1)
    r.close()
    s.wait_sentinels_know_replica()


@pytest.mark.timeout(120)
def test_wait_closes_the_async_replication_loss_window(sentinels):
    without = measure_loss(sentinels, use_wait=False)
    rejoin_old_master(sentinels)
    with_wait = measure_loss(sentinels, use_wait=True)
    print(f"\nloss window, {WRITERS} writers of 16 KiB entries on loopback, replica 0.5 s behind: without WAIT "
          f"{without['lost']} of {without['acked']} acknowledged XADDs lost (p50 {without['p50_ms']:.3f} ms a "
          f"write before the lag); with WAIT 1 "
          f"{with_wait['lost']} of {with_wait['acked']} lost (p50 {with_wait['p50_ms']:.3f} ms); failover "
          f"{without['failover_s']:.1f}s / {with_wait['failover_s']:.1f}s")
    assert without["acked"] >= MIN_ACKED and with_wait["acked"] >= MIN_ACKED
    assert with_wait["lost"] == 0


def check_stream(r: redis.Redis, rid: str, n_tokens: int) -> None:
    events = [parse_event(f) for _, f in r.xrange(K.result_stream(rid))]
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert [e.seq for e in tokens] == list(range(n_tokens)), rid
    assert sum(isinstance(e, DoneEvent) for e in events) == 1 and isinstance(events[-1], DoneEvent), rid


@pytest.mark.timeout(200)
async def test_head_workers_and_client_follow_a_failover(sentinels, tmp_path):
    url = sentinels.url(query="wait_replicas=1&wait_timeout_ms=500")
    dep = deploy(str(tmp_path), None, [PipelineSpec("p0", (1,), (4,))], url=url,
                 worker_args=("--max-num-seqs", "4"))
    n_tokens = 24
    try:
        async with HexGenClient(url, block_ms=200, timeout_s=120) as client:
            async def one(i: int):
                return await client.generate(f"request {i} tells a story", request_id=f"s{i}",
                                             max_new_tokens=n_tokens, ignore_eos=True)

            first = [asyncio.create_task(one(i)) for i in range(4)]
            r = dep.client()
            await wait_until(lambda: any(r.xlen(K.result_stream(f"s{i}")) >= 3 for i in range(4)), 60,
                             "a request mid-generation")
            r.close()
            master = sentinels.master
            master.kill()
            t_kill = time.monotonic()
            later = [asyncio.create_task(one(i)) for i in range(4, 6)]  # sent during the failover
            results = await asyncio.gather(*first, *later, return_exceptions=True)
            recovery_s = time.monotonic() - t_kill
        errors = [res for res in results if isinstance(res, BaseException)]
        assert not errors, f"{errors}\n{dep.logs()}"
        assert all(res.completion_tokens == n_tokens for res in results)
        assert sentinels.master_port() == sentinels.replica.port
        r = dep.client()  # through the sentinels: the new master
        for res in results:
            check_stream(r, res.id, n_tokens)
        assert r.xpending(K.work_stream("tiny"), K.PIPELINES_GROUP)["pending"] == 0
        memory = r.info("memory")["used_memory_peak_human"]
        r.close()
        print(f"\nfailover under load: {len(results)} requests, 0 lost, all done {recovery_s:.1f}s after the "
              f"SIGKILL of the master; new master's peak memory {memory}")
    finally:
        dep.stop()
