"""Cache-aware dispatch without engines: the head's choice of pipeline from the published prefix
summaries (hexgen/head/routing.py), the summary's codec and publication, and the pipelines' hand-over of
preferred entries (workers/routing.py through the real Prefetcher on fakeredis): to a live pipeline with
room only, found there as its own, and taken over by another pipeline after the lease when the preferred
one never takes it."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import fakeredis
import pytest

from hexgen.engine.block_hash import block_hashes, prefix_seed
from hexgen.engine.gauges import StageGauges
from hexgen.engine.kv_cache import BlockManager
from hexgen.engine.types import Request, SamplingParams
from hexgen.head.routing import PrefixRouter, matched_blocks, pick
from hexgen.wire import figures as F
from hexgen.wire.prefix_summary import (
    MAX_SUMMARY_HASHES,
    PREFER_FIELD,
    PrefixSummary,
    decode_summary,
    encode_summary,
    handover_stream,
    prefix_summary_key,
)
from hexgen.wire.protocol import ProtocolError, encode_work_item
from hexgen.wire.text import as_text
from tests.waiting import wait_until
from tests.test_prefetch import WORK, config, make_prefetcher, pending, take_until  # noqa: F401 (fixture)
from workers.metrics import FiguresPublisher

pytestmark = pytest.mark.timeout(60)
SEED = prefix_seed("tiny", "float32", "auto")
SYSTEM = list(range(100, 140))  # 40 tokens: 2 blocks of 16 (the third is partial)


def summary(pid: str, tokens: list[int], room: int = 4) -> PrefixSummary:
    return PrefixSummary(pid, SEED, 16, room, frozenset(block_hashes(tokens, 16, SEED)))


def test_pick_prefers_the_longest_held_prefix_with_room():
    ask = SYSTEM + [7] * 30  # 70 tokens: 4 full blocks
    a = summary("a", SYSTEM[:16])  # first block only
    b = summary("b", ask)  # all of it
    assert matched_blocks(ask, a) == 1 and matched_blocks(ask, b) == 4
    assert pick(ask, [a, b]) == "b"
    assert pick(ask, [a, summary("b", ask, room=0)]) == "a"  # a full pipeline is not offered work
    assert pick(list(range(500, 560)), [a, b]) is None  # nobody holds it: pull by capacity
    other_seed = PrefixSummary("c", SEED + 1, 16, 4, b.hashes)  # another model or dtype: its hashes differ
    assert pick(ask, [other_seed]) is None
    # The last token is never looked up (the engine computes at least one): a prompt of exactly one block
    assert matched_blocks(SYSTEM[:16], summary("d", SYSTEM[:16])) == 0


def test_summary_codec_caps_and_checks():
    hashes = block_hashes(SYSTEM * 4, 16, SEED)
    s = decode_summary("p1", encode_summary(SEED, 16, 3, hashes))
    assert (s.seed, s.block_size, s.room, s.hashes) == (SEED, 16, 3, frozenset(hashes))
    assert len(encode_summary(SEED, 16, 3, list(range(MAX_SUMMARY_HASHES + 5)))["hashes"]) == 8 * MAX_SUMMARY_HASHES
    with pytest.raises(ProtocolError, match="seed, block_size and room"):
        decode_summary("p1", {"seed": "x", "block_size": "16", "room": "1"})
    with pytest.raises(ProtocolError, match="malformed"):
        decode_summary("p1", {"seed": "1", "block_size": "16", "room": "1", "hashes": b"123"})


def test_stage_zero_publishes_its_summary_with_a_ttl(server):
    client = fakeredis.FakeRedis(server=server)
    blocks = BlockManager(8, 16, True, SEED)
    held = blocks.allocate(2)
    for b, h in zip(held, block_hashes(SYSTEM, 16, SEED)):
        blocks.register(b, h)
    sched = SimpleNamespace(running=[1], waiting=[], max_num_seqs=4, blocks=blocks,
                            stats=SimpleNamespace(preemptions=0, prefix_queries=0, prefix_hits=0))
    g = StageGauges(kv_blocks_total=8)
    g.observe_scheduler(sched, 0)
    pub = FiguresPublisher(lambda _t: client, "p0", 0, "tiny", g, F.Tally(), interval_s=1.0)
    pub.publish()
    key = prefix_summary_key("tiny", "p0")
    s = decode_summary("p0", client.hgetall(key))
    assert s.room == 3 and s.hashes == frozenset(block_hashes(SYSTEM, 16, SEED)) and s.seed == SEED
    assert 0 < client.pttl(key) <= 4000
    router = PrefixRouter(fakeredis.FakeAsyncRedis(server=server), "tiny", refresh_s=0)
    assert asyncio.run(router.prefer(SYSTEM + [1, 2, 3])) == "p0"
    pub.publish(final=True)
    assert not client.exists(key)  # a stopping pipeline is offered nothing more
    assert asyncio.run(router.prefer(SYSTEM + [1, 2, 3])) is None


def add(r, rid: str, prefer: str | None) -> str:
    item = encode_work_item(Request(rid, [1, 2, 3], SamplingParams(max_new_tokens=4)), "tiny")
    if prefer:
        item[PREFER_FIELD] = prefer.encode()
    return as_text(r.xadd(WORK, item))


def live(r, pid: str, room: int) -> None:
    r.hset(prefix_summary_key("tiny", pid), mapping=encode_summary(SEED, 16, room, []))


def test_entries_go_to_their_live_preferred_pipeline_with_room(make_prefetcher, r):
    live(r, "p1", 4)
    live(r, "full", 0)
    p0, admit0 = make_prefetcher("p0")
    assert p0.take(8, 0.3) == []  # creates the group
    e_p1 = add(r, "to-p1", "p1")
    add(r, "to-p0", "p0")
    add(r, "to-full", "full")  # preferred pipeline has no room: served here
    add(r, "to-dead", "p9")  # preferred pipeline silent (no summary): served here
    add(r, "plain", None)
    got = take_until(p0, 4)
    assert sorted(q.request_id for q in got) == ["plain", "to-dead", "to-full", "to-p0"]
    assert pending(r)[e_p1] == "pipeline-p1" and p0.handover.handed_over == 1
    p1, admit1 = make_prefetcher("p1")
    (mine,) = take_until(p1, 1)
    assert mine.request_id == "to-p1" and mine.meta["entry"] == e_p1
    assert admit1.calls == [("to-p1", e_p1, True, 1)]  # one delivery: a hand-over, not a take-over
    assert pending(r)[e_p1] == "pipeline-p1"
    wait_until(lambda: r.xlen(handover_stream("tiny", "p1")) == 0, 5.0)  # its wake-up entry was consumed


def test_a_preferred_pipeline_that_never_takes_its_entry_loses_it_after_the_lease(make_prefetcher, r):
    live(r, "ghost", 4)  # published, then died before reading anything
    p0, admit0 = make_prefetcher("p0", lease_s=1.0)
    assert p0.take(8, 0.3) == []
    e = add(r, "orphan", "ghost")
    assert take_until(p0, 1, timeout_s=0.5) == [] and pending(r)[e] == "pipeline-ghost"
    (got,) = take_until(p0, 1, timeout_s=5.0)  # XAUTOCLAIM after the lease: served exactly once, here
    assert got.request_id == "orphan" and admit0.calls[-1][2:] == (True, 2)
    assert pending(r)[e] == "pipeline-p0"


def test_bench_workloads_share_what_they_say():
    from hexgen.bench.prefix import PrefixOptions, multi_turn_phases, seen_phases, shared_phases

    o = PrefixOptions(groups=3, per_group=4, system_len=40, question_len=8, output_len=5, conversations=2, turns=3)
    [shared] = shared_phases(o, 320)
    assert len(shared) == 12 and all(len(r.prompt_ids) == 48 for r in shared)
    assert shared[0].prompt_ids[:40] == shared[3].prompt_ids[:40] != shared[4].prompt_ids[:40]
    turns = multi_turn_phases(o, 320)
    assert [len(t) for t in turns] == [2, 2, 2]
    for a, b in zip(turns, turns[1:]):  # each turn resends the previous one, its reply and a new question
        for x, y in zip(a, b):
            assert y.prompt_ids[: len(x.prompt_ids)] == x.prompt_ids and len(y.prompt_ids) == len(x.prompt_ids) + 13
    first, seen = (p[0] for p in seen_phases(o, 320))
    assert first.prompt_ids[:40] == seen.prompt_ids[:40] and first.prompt_ids != seen.prompt_ids
    with pytest.raises(ValueError, match="workload"):
        PrefixOptions(workload="chat")
