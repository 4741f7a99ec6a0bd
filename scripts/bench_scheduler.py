"""Host time of the stage-0 scheduler alone (no model): ``schedule`` calls on a load like the benches'.

    python3 scripts/bench_scheduler.py [--seqs 512] [--micro-batches 4] [--compare-by-value]

2,000 requests (prompts 64–1,024, outputs 32–512, seed 0) are queued; each step's plan is answered with one
sampled token per sampling row, with up to ``--micro-batches`` plans in flight as the pipelined loop keeps
them. Prints the mean milliseconds per ``schedule`` call over 400 calls. ``--compare-by-value`` gives
``Sequence`` a dataclass-generated ``__eq__`` (comparing token lists): the cost of comparing sequences by value.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hexgen.engine import scheduler as sched  # noqa: E402
from hexgen.engine.kv_cache import BlockManager  # noqa: E402
from hexgen.engine.plan import StepResult  # noqa: E402
from hexgen.engine.types import Request, SamplingParams  # noqa: E402


def _by_value() -> None:
    names = [f.name for f in dataclasses.fields(sched.Sequence)]

    def eq(a, b):
        if b.__class__ is a.__class__:
            return tuple(getattr(a, n) for n in names) == tuple(getattr(b, n) for n in names)
        return NotImplemented
    sched.Sequence.__eq__ = eq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=512, help="max_num_seqs")
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--compare-by-value", action="store_true")
    args = ap.parse_args()
    if args.compare_by_value:
        _by_value()
    rng = random.Random(0)
    s = sched.Scheduler(BlockManager(40000, 16), args.seqs, 4096, 4096, args.micro_batches)
    for i in range(2000):
        s.add(Request(f"r{i}", list(range(rng.randint(64, 1024))),
                      SamplingParams(max_new_tokens=rng.randint(32, 512), ignore_eos=True)))
    spent, calls, in_flight = 0.0, 0, []
    while not s.idle and calls < args.calls:
        t = time.perf_counter()
        plan = s.schedule(calls)
        spent += time.perf_counter() - t
        calls += 1
        if plan is not None:
            in_flight.append(plan)
        if in_flight and (plan is None or len(in_flight) >= args.micro_batches):
            done = in_flight.pop(0)
            running = {x.seq_id: x for x in s.running}
            res = StepResult(done.step_id)
            for sid, samples in zip(done.seq_ids, done.sample):
                if samples and sid in running:
                    seq = running[sid]
                    res.seq_ids.append(sid)
                    res.tokens.append(5)
                    res.finished.append(seq.num_output + 1 >= seq.request.params.max_new_tokens)
            s.update(done, res)
    how = "by value" if args.compare_by_value else "by identity"
    print(f"sequences compared {how}: max_num_seqs {args.seqs}, {args.micro_batches} micro-batches: "
          f"{1e3 * spent / calls:.2f} ms a schedule call ({calls} calls, {len(s.running)} running at the end)")


if __name__ == "__main__":
    main()
