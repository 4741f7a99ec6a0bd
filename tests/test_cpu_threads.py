"""Torch threads of CPU ranks sized by every rank that shares the host (hexgen/engine/threads.py,
workers/host_threads.py): the arithmetic, the registry count (fakeredis), the engine thread applying a count
another thread recorded, the flags, and two real one-stage pipelines on one host settling on half the cores
each. Timing is measured in docs/benchmarks.md, never asserted here."""
from __future__ import annotations

import re
import threading
import time

import fakeredis
import pytest
import torch

from hexgen.engine.threads import CpuThreads, host_cores, threads_per_rank
from hexgen.wire import keys as C
from workers.host_threads import HostRankWatch, count_host_ranks
from workers.registry import Registry


@pytest.mark.parametrize("cores,ranks,fixed,want", [
    (2, 1, 0, 2),  # alone: every core
    (2, 2, 0, 1),  # two one-stage pipelines on a 2-core host: one thread each, not two
    (2, 4, 0, 1),  # more ranks than cores: never 0
    (16, 3, 0, 5),
    (16, 2, 3, 3),  # --threads fixes it
    (2, 1, 4, 4),
])
def test_threads_per_rank(cores, ranks, fixed, want):
    assert threads_per_rank(cores, ranks, fixed) == want


def test_total_threads_never_exceed_the_cores_when_ranks_fit():
    for cores in range(1, 33):
        for ranks in range(1, cores + 1):
            assert ranks * threads_per_rank(cores, ranks) <= cores


def test_host_cores_is_this_process_affinity():
    assert 1 <= host_cores() <= 4096


def test_engine_thread_applies_a_count_another_thread_recorded():
    before = torch.get_num_threads()
    try:
        threads = CpuThreads(0, ranks_on_host=1, cores=4)
        assert threads.apply() == 4 and torch.get_num_threads() == 4
        t = threading.Thread(target=threads.set_ranks_on_host, args=(4,))
        t.start()
        t.join()
        assert torch.get_num_threads() == 4  # set_num_threads acts on the calling thread only: not yet
        assert threads.apply() == 1 and torch.get_num_threads() == 1
        fixed = CpuThreads(3, ranks_on_host=1, cores=4)
        fixed.set_ranks_on_host(8)
        assert fixed.apply() == 3
    finally:
        torch.set_num_threads(before)


def _register(client, pipeline: str, rank: int, host: str, device: str = "cpu") -> Registry:
    reg = Registry(client, pipeline, world_size=1, layout="x", model="tiny", heartbeat_ttl_s=5)
    rec = reg.new_record(rank, 0, 0, device=device, memory=1, version="0")
    rec = type(rec)(**{**rec.__dict__, "host": host})
    reg.register(rank, rec)
    return reg


def test_count_host_ranks_counts_live_cpu_ranks_of_every_pipeline_on_the_host():
    client = fakeredis.FakeRedis()
    _register(client, "p1", 0, "hostA")
    _register(client, "p2", 0, "hostA")
    _register(client, "p2", 1, "hostA")
    _register(client, "p3", 0, "hostB")  # another host
    _register(client, "p4", 0, "hostA", device="cuda:0 H200")  # a GPU rank takes no intra-op threads
    _register(client, "p5", 0, "hostA")
    client.delete(C.heartbeat_key("p5:0"))  # a dead rank's record
    assert count_host_ranks(client, "hostA") == 3
    assert count_host_ranks(client, "hostB") == 1
    assert count_host_ranks(client, "hostC") == 0


def test_watch_shrinks_threads_when_a_pipeline_joins_the_host():
    client = fakeredis.FakeRedis()
    _register(client, "p1", 0, "hostA")
    threads = CpuThreads(0, ranks_on_host=1, cores=2)
    watch = HostRankWatch(client, "hostA", threads, interval_s=0.02, at_least=1)
    assert watch.count() == 1 and threads.wanted() == 2
    watch.start()
    try:
        _register(client, "p2", 0, "hostA")  # a second one-stage pipeline starts on the same host
        deadline = time.monotonic() + 10
        while threads.ranks_on_host != 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert threads.ranks_on_host == 2 and threads.wanted() == 1
        client.delete(C.heartbeat_key("p2:0"))  # it leaves: the survivor gets its cores back
        deadline = time.monotonic() + 10
        while threads.ranks_on_host != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert threads.wanted() == 2
    finally:
        watch.stop()
        watch.join(5)


def test_worker_flags_and_settings():
    from hexgen.cli.worker import build_parser, engine_overrides
    from hexgen.errors import ConfigError
    from hexgen.wire.settings import settings_from_dict

    args = build_parser().parse_args(["--stage", "0", "--threads", "1", "--kv-cache-dtype", "fp8"])
    assert engine_overrides(args) == {"cpu_threads": 1, "kv_cache_dtype": "fp8"}
    assert engine_overrides(build_parser().parse_args(["--stage", "0"])) == {}
    s = settings_from_dict({"model": {"preset": "tiny"}, "kv_cache_dtype": "fp8"})
    assert s.kv_cache_dtype == "fp8"
    with pytest.raises(ConfigError, match="kv_cache_dtype: 'fp16' must be one of auto, fp8"):
        settings_from_dict({"model": {"preset": "tiny"}, "kv_cache_dtype": "fp16"})
    with pytest.raises(ConfigError, match="cpu_threads: -1 must be ≥ 0"):
        from hexgen.config import EngineConfig
        EngineConfig(cpu_threads=-1)


@pytest.mark.slow
def test_two_pipelines_on_one_host_share_its_cores(tmp_path):
    """Two one-stage pipelines started together on this host: each rank's count of the host's CPU ranks
    reaches 2 (at formation, or from its watch when the other registered later), and its engine applies
    cores // 2 threads by the next step it runs (both serve requests here)."""
    from tests.serving_harness import PipelineSpec, start_deployment

    dep = start_deployment(str(tmp_path), [PipelineSpec("p1", (1,), (4,)), PipelineSpec("p2", (1,), (4,))])
    try:
        cores = host_cores()
        want = str(max(1, cores // 2))
        start = re.compile(r"torch threads: (\d+) \((\d+) cores, (\d+) ranks on this host")
        moved = re.compile(r"(\d+) CPU ranks on host \S+ now")
        applied = re.compile(r"torch threads \d+ -> (\d+) \((\d+) cores, (\d+) ranks on this host")
        r = dep.client()
        for i in range(12):
            r.xadd(C.REQUESTS_STREAM, {"prompt": f"hello {i}", "max_new_tokens": "8", "id": f"t{i}"})
        deadline = time.monotonic() + 120
        done: set[str] = set()
        while len(done) < 12 and time.monotonic() < deadline:
            for i in range(12):
                last = r.xrevrange(C.result_stream(f"t{i}"), count=1)
                if last and last[0][1].get(b"event") == b"done":
                    done.add(f"t{i}")
            time.sleep(0.2)
        assert len(done) == 12
        logs = {p: dep.log(f"worker-{p}-0", tail=1_000_000) for p in ("p1", "p2")}
        for p, text in logs.items():
            first = start.findall(text)
            assert first and first[0][1] == str(cores), text[-2000:]
            counts = [int(first[0][2])] + [int(n) for n in moved.findall(text)]
            assert counts[-1] == 2, (p, counts)
            threads = [first[0][0]] + [a[0] for a in applied.findall(text)]
            if counts[0] == 2:  # counted both at formation
                assert threads[0] == want
            else:  # the other pipeline registered later: the next step applied the new count
                assert threads[-1] == want, (p, threads)
        r.close()
    finally:
        dep.stop()
