"""PipelineGroups' CPU side channel: broadcast_bytes across a TP group of two gloo ranks."""
from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from hexgen.config import Layout, preset
from hexgen.procs import free_port
from hexgen.parallel.groups import PipelineGroups

SIZES = [0, 10, 4088, 4089, 10000]  # around the one-message limit (4096 bytes with an 8-byte length)


def _payload(n: int) -> bytes:
    return bytes((i * 7 + n) % 251 for i in range(n))


def _rank(rank: int, init: str, q) -> None:
    g = PipelineGroups(Layout.build(preset("tiny"), [2]), rank, init, torch.device("cpu"))
    try:
        got = [g.broadcast_bytes(_payload(n) if rank == 0 else None) for n in SIZES]
        q.put((rank, [x == _payload(n) for x, n in zip(got, SIZES)]))
    finally:
        g.close()


@pytest.mark.slow
def test_broadcast_bytes_every_size():
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank, args=(r, init, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = dict(q.get() for _ in range(2))
    assert results == {0: [True] * len(SIZES), 1: [True] * len(SIZES)}
