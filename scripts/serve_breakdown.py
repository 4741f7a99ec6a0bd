#!/usr/bin/env python3
"""Where a request's time to first token goes on the Redis path, hop by hop.

Runs the ``hexgen bench serve`` workload (same flags, same requests, same arrival times) through a private
redis-server, ``hexgen head`` and ``hexgen worker`` started with ``HEXGEN_TRACE_TIMING=1``
(hexgen.wire.trace): the head, the stage-0 source and the sink stamp ``time.monotonic()`` into each request,
the client stamps its XADD and the arrival of the first token. CLOCK_MONOTONIC is host-wide, so the stamps of
the four processes compare. Prints the median / p90 / mean of every hop of the first token::

    .venv/bin/python scripts/serve_breakdown.py --rate 0.5 --num-requests 32 --prompt-range 64 256 \\
        --output-range 16 32 [--direct] [--out breakdown.json]

The sink's own ``posted`` stamp (its EVALSHA returned) is in the JSON but not a hop: the client often reads the
token before the writer thread gets the GIL back. ``--direct`` first runs the same requests through the engine
directly (run_offline), as bench serve does, for its p50 TTFT. Engine flags (--max-num-seqs, --kv-tokens, ...)
are bench's.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hexgen.bench.engine_bench import run_engine  # noqa: E402
from hexgen.bench.modes import BenchSetup  # noqa: E402
from hexgen.bench.serve import (  # noqa: E402  # noqa: E402
    ServeOptions,
    build_items,
    run_redis_path,
    serve_tokenizer,
    sleep_until,
    worker_engine_overrides,
)
from hexgen.bench.stats import percentile, summarize  # noqa: E402
from hexgen.bench.workload import mixed_shapes, poisson_offsets  # noqa: E402
from hexgen.cli.bench import _parser  # noqa: E402
from hexgen.cli.generate import resolve_engine, resolve_model  # noqa: E402
from hexgen.config import Layout  # noqa: E402
from hexgen.wire import keys as C  # noqa: E402
from hexgen.wire import trace  # noqa: E402

# (label, from stamp, to stamp); "arrival", "send" and "client" are the client's own stamps
HOPS = (
    ("scheduled arrival -> client XADD (client's event loop)", "arrival", "send"),
    ("client XADD -> head has the entry (XREADGROUP)", "send", "head_read"),
    ("head: validate, tokenize", "head_read", "head_tok"),
    ("head: queue-depth check (in the submit script)", "head_tok", "head_send"),
    ("head submit script / MULTI -> prefetch thread's XREADGROUP", "head_send", "src_read"),
    ("prefetch queue -> engine loop takes it (end of a running step)", "src_read", "src_take"),
    ("engine loop took it -> first token sampled (prefill)", "src_take", "emit"),
    ("sink: queued -> writer thread has it", "emit", "picked"),
    ("sink writer thread -> client has the token (EVALSHA, wake)", "picked", "client"),
    ("total: scheduled arrival -> first token at the client", "arrival", "client"),
    ("total minus the engine hop", None, None),
    ("client XADD -> first token at the client, minus the engine hop", "send", None),
)
IDLE_TAKE_S = 1e-3  # a request "found the engine idle" when the engine loop took it within this of its read


async def traced_offer(url: str, items, timeout_s: float = 900.0) -> dict[str, dict[str, float]]:
    """Offer ``items`` like bench serve; return per request the client's stamps merged with the servers'."""
    from hexgen.client import HexGenClient

    async with HexGenClient(url, block_ms=1000, timeout_s=timeout_s) as client:
        t0 = time.monotonic() + 0.05

        async def one(item) -> tuple[str, dict[str, float]]:
            arrival = t0 + item.offset
            await sleep_until(arrival)
            p = item.request.params
            stream = client.stream(prompt=item.text, request_id=item.request.request_id, temperature=0,
                                   max_new_tokens=p.max_new_tokens, ignore_eos=True)
            row = {"arrival": arrival, "send": time.monotonic()}  # the XADD is the stream's first await
            async for _ev in stream:
                row.setdefault("client", time.monotonic())
            return item.request.request_id, row

        rows = dict(await asyncio.gather(*(one(i) for i in items)))
        for _eid, fields in await client.redis.xrange(C.TRACE_STREAM):
            f = {k.decode(): v.decode() for k, v in fields.items()}
            if f.get("id") in rows:
                rows[f["id"]].update({k: float(v) for k, v in f.items() if k != "id"})
        return rows


def hop_table(rows: dict[str, dict[str, float]]) -> list[dict]:
    out = []
    for label, a, b in HOPS:
        if b is None:  # the engine hop starts when the engine loop has the request
            vals = [r["client"] - r[a or "arrival"] - (r["emit"] - r.get("src_take", r.get("src_read")))
                    for r in rows.values() if "emit" in r]
        else:
            vals = [r[b] - r[a] for r in rows.values() if a in r and b in r]
        ms = [1e3 * v for v in vals]
        out.append({"hop": label, "n": len(ms), "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
                    "mean_ms": sum(ms) / len(ms) if ms else None})
    return out


def idle_rows(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The requests the engine loop took within IDLE_TAKE_S of the prefetch thread's read (no running step)."""
    return {k: r for k, r in rows.items() if "src_take" in r and r["src_take"] - r["src_read"] <= IDLE_TAKE_S}


def main() -> int:
    argv = sys.argv[1:]
    direct = "--direct" in argv
    argv = [a for a in argv if a != "--direct"]
    args = _parser().parse_args(["serve", *argv])
    model = resolve_model(args)
    layout = Layout.build(model.config(), args.hetero_config, args.pp_partition)
    engine = resolve_engine(args, layout, cuda_graphs=args.cuda_graphs, gpu_memory_fraction=args.gpu_memory_fraction,
                            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                            cpu_kv_tokens=args.kv_tokens)
    setup = BenchSetup(model, layout, engine, "scripts/serve_breakdown.py " + " ".join(sys.argv[1:]))
    opts = ServeOptions(args.num_requests or 32, tuple(args.prompt_range or (64, 256)),
                        tuple(args.output_range or (16, 64)), args.seed, args.rate, log_dir=args.log_dir,
                        tokenizer=args.tokenizer)
    tok = serve_tokenizer(setup, opts)
    vocab = min(model.config().vocab_size, len(tok))
    shapes = mixed_shapes(opts.num_requests, opts.prompt_range, opts.output_range, opts.seed)
    offsets = poisson_offsets(len(shapes), opts.rate, opts.seed) if opts.rate else [0.0] * len(shapes)
    warm_shapes = mixed_shapes(4, (opts.prompt_range[0],) * 2, (8, 8), opts.seed + 99)
    result: dict = {"command": setup.command}
    if direct:
        warm = build_items(tok, warm_shapes, vocab, 99, [0.0] * 4, "warm-d")
        items = build_items(tok, shapes, vocab, opts.seed, offsets, "direct-")
        run = run_engine(layout, model, engine, [[(i.offset, i.request) for i in warm],
                                                 [(i.offset, i.request) for i in items]])
        result["direct"] = summarize([run.timings[i.request.request_id] for i in items])
    os.environ[trace.ENV] = "1"  # the head and the worker inherit it
    warm = build_items(tok, warm_shapes, vocab, 99, [0.0] * 4, "warm-r")
    items = build_items(tok, shapes, vocab, opts.seed, offsets, "redis-")
    rows, _ready_s = run_redis_path(setup, opts, worker_engine_overrides(setup), warm, items,
                                    say=lambda m: print(m, file=sys.stderr), offer_fn=traced_offer)
    result["load_avg_1_5_15m"] = [round(x, 2) for x in os.getloadavg()]
    result["hops"] = hop_table(rows)
    result["hops_engine_idle"] = hop_table(idle_rows(rows))
    result["requests"] = rows
    for title, key in (("all requests", "hops"), ("requests that found the engine idle", "hops_engine_idle")):
        print(f"{title + ': hop':<60}{'n':>4}{'p50 ms':>10}{'p90 ms':>10}{'mean ms':>10}")
        for h in result[key]:
            cells = "".join(f"{'-' if h[k] is None else format(h[k], '.2f'):>10}"
                            for k in ("p50_ms", "p90_ms", "mean_ms"))
            print(f"{h['hop']:<60}{h['n']:>4}{cells}")
    if direct:
        print(f"direct engine: TTFT p50 {result['direct']['ttft_p50_ms']:.1f} ms")
    print(f"load average (1, 5, 15 min): {result['load_avg_1_5_15m']}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
