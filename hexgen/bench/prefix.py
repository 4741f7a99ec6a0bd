"""``hexgen bench prefix``: the prefix cache on against off, in one run, on shared-prefix workloads.

- ``shared``: SGLang's "generated shared prefix" shape: ``groups`` × ``per_group`` requests, each group's
  requests starting with the same ``system_len``-token system prompt, then a ``question_len``-token
  question of their own, ``output_len`` tokens each; every request offered at once.
- ``multi-turn``: ``conversations`` × ``turns``: turn k of every conversation is offered once turn k−1 of
  all of them has finished, and resends the whole history: the earlier questions, each followed by a reply
  of ``output_len`` tokens, then the new question. The replies are fixed tokens, not the ones generated
  (the offline source cannot feed generated tokens back), so a turn reuses the history's prompt part and
  recomputes the replies as a chat front end resending different replies would.
- ``seen``: the TTFT of a question after a ``system_len``-token system prompt the engine has already seen,
  against the first time (one request at a time).

Requests ignore EOS so every run makes the same number of tokens. Each run starts with a warm-up request
that shares nothing with the workload.
"""

from __future__ import annotations

import dataclasses
import random

from hexgen.bench.engine_bench import at_once, run_engine
from hexgen.bench.modes import BenchSetup, device_info
from hexgen.bench.stats import summarize
from hexgen.bench.workload import random_prompt
from hexgen.engine.types import Request, SamplingParams

WORKLOADS = ("shared", "multi-turn", "seen")


@dataclasses.dataclass(frozen=True)
class PrefixOptions:
    workload: str = "shared"
    groups: int = 64
    per_group: int = 16
    system_len: int = 2048
    question_len: int = 128
    output_len: int = 256
    conversations: int = 200
    turns: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload: {self.workload!r} must be one of {', '.join(WORKLOADS)}")
        for name in ("groups", "per_group", "system_len", "question_len", "output_len", "conversations", "turns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} must be ≥ 1")


def _params(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def shared_phases(o: PrefixOptions, vocab: int) -> list[list[Request]]:
    rng = random.Random(o.seed)
    out = []
    for g in range(o.groups):
        system = random_prompt(rng, o.system_len, vocab)
        for i in range(o.per_group):
            ids = system + random_prompt(rng, o.question_len, vocab)
            out.append(Request(f"g{g}q{i}", ids, _params(o.output_len)))
    return [out]


def multi_turn_phases(o: PrefixOptions, vocab: int) -> list[list[Request]]:
    rng = random.Random(o.seed)
    history: list[list[int]] = [random_prompt(rng, o.system_len, vocab) for _ in range(o.conversations)]
    phases = []
    for t in range(o.turns):
        phase = []
        for c in range(o.conversations):
            history[c] = history[c] + random_prompt(rng, o.question_len, vocab)
            phase.append(Request(f"c{c}t{t}", list(history[c]), _params(o.output_len)))
            history[c] = history[c] + random_prompt(rng, o.output_len, vocab)  # the reply the next turn resends
        phases.append(phase)
    return phases


def seen_phases(o: PrefixOptions, vocab: int) -> list[list[Request]]:
    rng = random.Random(o.seed)
    system = random_prompt(rng, o.system_len, vocab)
    first = Request("first", system + random_prompt(rng, o.question_len, vocab), _params(o.output_len))
    seen = Request("seen", system + random_prompt(rng, o.question_len, vocab), _params(o.output_len))
    return [[first], [seen]]


def _phases(o: PrefixOptions, vocab: int) -> list[list[Request]]:
    return {"shared": shared_phases, "multi-turn": multi_turn_phases, "seen": seen_phases}[o.workload](o, vocab)


def prefix_bench(setup: BenchSetup, o: PrefixOptions) -> dict:
    """Run the workload with the prefix cache on, then off, on the same layout; the ratios of the two."""
    vocab = setup.model.config().vocab_size
    phases = _phases(o, vocab)
    warm = [Request("warm", random_prompt(random.Random(o.seed + 99), 16, vocab), _params(4))]
    out: dict = {
        "mode": "prefix",
        "command": setup.command,
        **device_info(setup.engine),
        "layout": setup.layout.describe(),
        "workload": dataclasses.asdict(o),
    }
    for name, on in (("cache_on", True), ("cache_off", False)):
        engine = dataclasses.replace(setup.engine, prefix_cache=on)
        run = run_engine(setup.layout, setup.model, engine, [at_once([warm])[0]] + at_once(phases), setup.devices)
        res = summarize([run.timings[r.request_id] for p in phases for r in p])
        if o.workload == "multi-turn":  # turns after the first: the ones that resend a history
            later = [run.timings[r.request_id] for p in phases[1:] for r in p]
            if later:
                res["later_turns"] = summarize(later)
        if o.workload == "seen":
            res["ttft_first_ms"] = round(1e3 * run.timings["first"].ttft, 3)
            res["ttft_seen_ms"] = round(1e3 * run.timings["seen"].ttft, 3)
        res["wall_s"] = round(run.wall_s, 2)
        out[name] = res
    on, off = out["cache_on"], out["cache_off"]
    out["output_tokens_per_s_on_vs_off"] = round(on["output_tokens_per_s"] / off["output_tokens_per_s"], 3)
    if on["ttft_p50_ms"]:
        out["ttft_p50_off_vs_on"] = round(off["ttft_p50_ms"] / on["ttft_p50_ms"], 3)
    if o.workload == "multi-turn" and "later_turns" in on:
        out["later_turns_ttft_p50_off_vs_on"] = round(
            out["cache_off"]["later_turns"]["ttft_p50_ms"] / on["later_turns"]["ttft_p50_ms"], 3
        )
    if o.workload == "seen":
        out["seen_ttft_first_vs_seen"] = round(on["ttft_first_ms"] / on["ttft_seen_ms"], 3)
    return out


def format_prefix(res: dict) -> str:
    w = res["workload"]
    card = res.get("card", res["device"])
    rows = [f"hexgen bench prefix ({w['workload']}) | {card} | {res['layout']} | {res['date']}"]
    cols = ("output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms")
    rows.append(f"{'':<10}" + "".join(f"{c:>22}" for c in cols))
    for name in ("cache_on", "cache_off"):
        rows.append(f"{name:<10}" + "".join(f"{str(res[name].get(c, '-')):>22}" for c in cols))
    for k in ("output_tokens_per_s_on_vs_off", "ttft_p50_off_vs_on", "later_turns_ttft_p50_off_vs_on"):
        if k in res:
            rows.append(f"{k}: {res[k]}x")
    if "seen_ttft_first_vs_seen" in res:
        on = res["cache_on"]
        rows.append(
            f"TTFT first time {on['ttft_first_ms']} ms, system prompt seen {on['ttft_seen_ms']} ms: "
            f"{res['seen_ttft_first_vs_seen']}x"
        )
    return "\n".join(rows)
