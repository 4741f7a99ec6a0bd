"""Cache-aware dispatch end to end: redis-server, a head and two one-stage CPU pipelines of a tiny random
Llama. Conversations resend their history turn after turn, one request at a time; with the head's prefix
routing on, every later turn reuses its history's blocks on the pipeline that served the last turn. With
routing off (plain pull by capacity) a turn lands on whichever pipeline reads first: by chance sometimes
where its history is, so the comparison is at least as high, and the check that routing works is that no
later turn misses."""
from __future__ import annotations

import asyncio
import os

import pytest

from hexgen.client import HexGenClient
from hexgen.head.routing import pick
from hexgen.wire.prefix_summary import decode_summary, prefix_summary_key
from tests.serving_harness import Deployment, PipelineSpec, make_tiny_model, write_config
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PIPES = [PipelineSpec("p0", (1,), (4,)), PipelineSpec("p1", (1,), (4,))]
CONVERSATIONS = 4
TURNS = 3
WORDS = "apple river stone cloud maple ember frost harbor lantern meadow orchid pepper quartz saddle".split()


def deploy(tmp: str, routing: bool) -> Deployment:
    from tests.redis_server import RedisServer, redis_server_binary

    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(binary)
    url = server.start()
    model_dir = make_tiny_model(os.path.join(tmp, "model"))
    config = write_config(os.path.join(tmp, "deploy.toml"), url, model_dir, PIPES, heartbeat_ttl_s=2,
                          heartbeat_interval_s=0.3, lease_s=3.0, block_ms=500)
    with open(config, "a", encoding="utf-8") as f:
        f.write(f"\n[engine]\nprefix_routing = {'true' if routing else 'false'}\n")
    dep = Deployment(url, config, model_dir, tmp, server)
    try:
        dep.start_head()
        for p in PIPES:
            dep.start_worker(p.id, 0)
        dep.wait_ready([p.id for p in PIPES])
    except BaseException:
        dep.stop()
        raise
    return dep


def held_somewhere(dep: Deployment, ids: list[int]) -> bool:
    r = dep.client()
    try:
        summaries = []
        for p in PIPES:
            fields = r.hgetall(prefix_summary_key("tiny", p.id))
            if fields:
                summaries.append(decode_summary(p.id, fields))
        return pick(ids, summaries) is not None
    finally:
        r.close()


def conversation_hit_rate(dep: Deployment) -> tuple[float, list[int]]:
    """Prompt tokens of turns after the first that the prefix cache supplied, over their prompt tokens; and
    the cached tokens of each of those turns."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dep.model_dir)
    prompts = [f"conversation {c}: " + " ".join(WORDS[c:] + WORDS[:c]) * 3 for c in range(CONVERSATIONS)]
    cached = total = 0
    per_turn: list[int] = []

    async def ask(prompt: str):
        async with HexGenClient(dep.url, block_ms=500, timeout_s=120) as client:
            return await client.generate(prompt=prompt, max_new_tokens=4, temperature=0)

    for turn in range(TURNS):
        for c in range(CONVERSATIONS):
            res = asyncio.run(ask(prompts[c]))
            if turn:
                cached += res.cached_tokens
                total += res.prompt_tokens
                per_turn.append(res.cached_tokens)
            # the next turn resends this one with the reply and a new question
            wait_until(lambda p=prompts[c]: held_somewhere(dep, tok(p)["input_ids"] + [0]), 15.0,
                       what="the pipeline's summary shows the conversation")
            prompts[c] = prompts[c] + res.text + f" and then {WORDS[turn]} again?"
    return cached / total, per_turn


def test_routing_beats_pull_by_capacity_on_conversations(tmp_path):
    rates, hits = {}, {}
    for routing in (True, False):
        dep = deploy(str(tmp_path / f"routing-{routing}"), routing)
        try:
            rates[routing], hits[routing] = conversation_hit_rate(dep)
        finally:
            dep.stop()
    print(f"prompt-token hit rate of later turns: routing on {rates[True]:.3f}, off {rates[False]:.3f}; "
          f"cached tokens per later turn: on {hits[True]}, off {hits[False]}")
    assert all(n > 0 for n in hits[True]), hits  # routed: every later turn is sent where its history is
    assert rates[True] >= rates[False], rates
    assert rates[True] > 0.5, rates  # and finds most of its history there
