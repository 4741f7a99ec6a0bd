#!/usr/bin/env python3
"""Time the head's per-request hop in isolation: a private redis-server, one Head, requests one at a time.

For each request the entry is XADDed and read back as the head reads it, then ``Head.handle_entry`` runs and is
timed (entry in hand → work item written and acked). The same prompts are also timed piece by piece: the
parse + validate + tokenize work (``Head._prepare``, no Redis), one empty round trip (PING) and the work
item's encoding. Prints p50 / p90 / mean per piece::

    .venv/bin/python scripts/head_hop_bench.py [--requests 200] [--tokenizer DIR] [--prompt-tokens 64 256]

The tokenizer defaults to the embedded default model's (SmolLM2-135M-Instruct). redis-server must be on PATH.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hexgen.bench.stats import percentile  # noqa: E402
from hexgen.demo import Deployment, start_redis  # noqa: E402
from hexgen.head.service import Head  # noqa: E402
from hexgen.wire import keys as C  # noqa: E402
from hexgen.wire.protocol import encode_work_item  # noqa: E402
from hexgen.wire.settings import (  # noqa: E402
    LimitSettings,
    ModelSettings,
    RedisSettings,
    Settings,
    async_redis,
)


def _prompts(tok, n: int, lo: int, hi: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = [t for t in tok.get_vocab() if t.isalpha()][:5000]
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def _row(name: str, ms: list[float]) -> str:
    return f"{name:<52}{percentile(ms, 50):>9.3f}{percentile(ms, 90):>9.3f}{sum(ms) / len(ms):>9.3f}"


async def bench(url: str, tok, prompts: list[str]) -> dict[str, list[float]]:
    settings = Settings(model=ModelSettings(name="bench", preset="tiny"), redis=RedisSettings(url),
                        limits=LimitSettings())
    r = async_redis(url, socket_timeout=10)
    head = Head(settings, tok, 8192, redis=r, consumer="head-bench")
    await head.setup()
    out: dict[str, list[float]] = {"handle_entry (whole hop)": [], "prepare: parse, validate, tokenize": [],
                                   "encode_work_item": [], "one round trip (PING)": []}
    for i, prompt in enumerate(prompts):
        fields = {"prompt": prompt, "max_new_tokens": "16", "temperature": "0", "id": f"b{i}"}
        await r.xadd(C.REQUESTS_STREAM, fields)
        [(_s, [(eid, got)])] = await r.xreadgroup(C.HEADS_GROUP, head.consumer, {C.REQUESTS_STREAM: ">"}, count=1)
        t0 = time.perf_counter()
        await head.handle_entry(eid.decode(), got)
        t1 = time.perf_counter()
        req, model = await head._prepare(eid.decode(), f"p{i}", got)
        t2 = time.perf_counter()
        encode_work_item(req, model)
        t3 = time.perf_counter()
        await r.ping()
        t4 = time.perf_counter()
        for k, a, b in zip(out, (t0, t1, t2, t3), (t1, t2, t3, t4)):
            out[k].append(1e3 * (b - a))
        if i % 50 == 49:
            await r.delete(head.work_stream)
            await r.xgroup_create(head.work_stream, C.PIPELINES_GROUP, id="0", mkstream=True)
    await r.aclose()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--tokenizer", default="")
    ap.add_argument("--prompt-tokens", type=int, nargs=2, default=(64, 256))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    path = args.tokenizer
    if not path:
        from hexgen.cli.fetch import ensure_default_model

        path = ensure_default_model(progress=False)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = _prompts(tok, args.requests, *args.prompt_tokens, args.seed)
    with tempfile.TemporaryDirectory(prefix="hexgen-head-bench-") as tmp:
        dep = Deployment(tmp)
        try:
            start_redis(dep)
            res = asyncio.run(bench(dep.url, tok, prompts))
        finally:
            dep.shutdown()
    warm = 10
    print(f"{'piece (ms)':<52}{'p50':>9}{'p90':>9}{'mean':>9}")
    for k, v in res.items():
        print(_row(k, v[warm:]))
    print(f"load average (1, 5, 15 min): {[round(x, 2) for x in os.getloadavg()]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
