"""Fuzz every request field through the real head (hypothesis), with a real pipeline behind it.

Each example is one raw ``XADD hexgen:requests`` as redis-cli can send it: any field names (the real ones,
unknown ones, non-UTF-8 bytes), a field given twice, and values drawn per field from both plausible and
hostile values: random bytes, non-UTF-8, huge and negative numbers, NaN and infinities, nested, deep and
malformed JSON, and values of up to 10 MB. Every request must get exactly one terminal event on the stream
the protocol names (its ``id`` when that is a valid id, else the entry id): ``done`` when it was valid, else
one ``error`` with a known code. The head must neither crash nor stall (each answer within a deadline), and at
the end no request or work entry may be left pending.
"""
from __future__ import annotations

import itertools
import re
import time

import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hexgen.wire import keys as C
from hexgen.wire.protocol import DoneEvent, ErrorEvent, parse_event
from tests.serving_harness import PipelineSpec, start_deployment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
MAX_NEW_TOKENS = 8  # the deployment's cap: valid requests finish fast
ANSWER_S = 30.0  # a request without its terminal event after this long means the head stalled
ERROR_CODES = {"invalid_request", "overloaded", "not_found", "internal"}
FIELDS = ["prompt", "messages", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "model",
          "id", "ignore_eos"]
_ids = itertools.count()


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    d = start_deployment(str(tmp_path_factory.mktemp("fuzz")), [PipelineSpec("p0", (1,), (4,))],
                         max_new_tokens=MAX_NEW_TOKENS, default_max_new_tokens=4, result_ttl_s=600)
    yield d
    d.stop()


# ---- values ---------------------------------------------------------------------------------------------

DEPTHS = st.sampled_from([2, 900, 1200, 2000, 50_000, 200_000])
NUMBERS = st.one_of(
    st.integers(-(10**40), 10**40).map(str), st.integers(-5, 5000).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e309", "-0", "0x10", "1_000", " 7 ",
                     "", "+", "1.", ".5", "5e-324", "9" * 300, "0" * 255 + "1", "٣", "1e5", "true"]))
JSON = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=12).map(lambda v: __import__("json").dumps(v))
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                           "content": st.text(max_size=40)}), max_size=3).map(
    lambda v: __import__("json").dumps(v))
HOSTILE = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=1, max_size=8).map(lambda b: b"\xff\xfe" + b),  # never valid UTF-8
    st.text(max_size=64),
    DEPTHS.map(lambda n: "[" * n + "]" * n),  # deeper than a recursive JSON parser goes
    DEPTHS.map(lambda n: '[{"role":"user","content":' * n + '"x"' + "}]" * n),
    st.sampled_from(["[", "{", '{"role": "user"}', "[1, 2", '[{"role":"user","content":1}]', "null", "[]",
                     "[NaN]", '["\\ud800"]', "\x00", '{"__proto__": 1}']),
    st.integers(1, 4).map(lambda mb: b"x" * (mb * 2**20 + 1)),
    st.just(b"y" * (10 * 2**20)),  # 10 MB
    JSON, NUMBERS)
PLAUSIBLE = {
    "prompt": st.text(min_size=0, max_size=40) | st.sampled_from(["hello world", "Paris is"]),
    "messages": MESSAGES,
    "max_new_tokens": st.integers(-3, MAX_NEW_TOKENS + 3).map(str),
    "temperature": st.floats(-1, 3).map(repr),
    "top_k": st.integers(-2, 400).map(str),
    "top_p": st.floats(-0.5, 1.5).map(repr),
    "seed": st.integers(-2, 2**64).map(str),
    "stop": st.text(max_size=6) | st.lists(st.text(max_size=4), max_size=3).map(lambda v: __import__("json").dumps(v)),
    "model": st.sampled_from(["tiny", "other", "bad name", ""]),
    "ignore_eos": st.sampled_from(["1", "0", "true", "false", "yes", "maybe"]),
}


@st.composite
def requests(draw) -> list[tuple[bytes | str, bytes | str]]:
    """The field pairs of one XADD (a name may repeat, as redis-cli allows)."""
    pairs: list[tuple[bytes | str, bytes | str]] = []
    if draw(st.integers(0, 9)) < 8:  # mostly a prompt or messages, so that the rest gets checked
        name = draw(st.sampled_from(["prompt", "messages"]))
        pairs.append((name, draw(PLAUSIBLE[name] if draw(st.integers(0, 3)) else HOSTILE)))
    for name in draw(st.lists(st.sampled_from(FIELDS[2:9] + FIELDS[10:]), max_size=5)):
        pairs.append((name, draw(PLAUSIBLE[name] | HOSTILE) if draw(st.booleans()) else draw(PLAUSIBLE[name])))
    for _ in range(draw(st.integers(0, 1))):  # a hostile value for a real field
        pairs.append((draw(st.sampled_from(FIELDS[:9] + FIELDS[10:])), draw(HOSTILE)))
    if draw(st.integers(0, 9)) == 0:  # an unknown or unreadable field name
        pairs.append((draw(st.sampled_from(["max_tokens", "", "PROMPT", "x" * 100])
                           | st.binary(max_size=8).filter(lambda b: _s(b) not in FIELDS)),
                      draw(st.text(max_size=5))))
    if pairs and draw(st.integers(0, 7)) == 0:  # one field given twice
        pairs.append((pairs[0][0], draw(PLAUSIBLE.get(_s(pairs[0][0]), HOSTILE) | HOSTILE)))
    kind = draw(st.sampled_from(["unique", "unique", "none", "junk", "twice"]))
    for _ in range(2 if kind == "twice" else 1 if kind == "unique" else 0):
        pairs.append(("id", _unique_id()))  # valid ids never repeat: a repeated id is answered once, by design
    if kind == "junk":
        pairs.append(("id", draw(st.sampled_from(["has space", "", "x" * 129, "é"])
                                 | st.binary(max_size=6).filter(lambda b: not _valid_id(b)))))
    return draw(st.permutations(pairs))


def _unique_id() -> str:
    return f"fz{next(_ids)}-{time.monotonic_ns()}"


def _valid_id(raw: bytes) -> bool:
    try:
        return re.fullmatch(C.ID_PATTERN, raw.decode("utf-8")) is not None
    except UnicodeDecodeError:
        return False


def _s(v: bytes | str) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def result_stream_of(pairs: list[tuple[bytes | str, bytes | str]], entry_id: str) -> str:
    """Where the protocol says the events go: the (last) ``id`` value when it is a valid id, else the entry id."""
    ids = [v for k, v in pairs if k in ("id", b"id")]
    raw = ids[-1] if ids else None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raw = None
    if isinstance(raw, str) and re.fullmatch(C.ID_PATTERN, raw):
        return C.result_stream(raw)
    return C.result_stream(entry_id)


def wait_terminal(r: redis.Redis, stream: str, timeout_s: float) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        events = [parse_event(f) for _, f in r.xrange(stream)]
        if any(isinstance(e, (DoneEvent, ErrorEvent)) for e in events) or time.monotonic() > deadline:
            return events
        time.sleep(0.01)


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(pairs=requests())
@example(pairs=[("messages", "[" * 2000 + "]" * 2000)])
@example(pairs=[("prompt", "hi"), ("stop", "[" * 1500 + "]" * 1500)])
@example(pairs=[("prompt", b"z" * (10 * 2**20))])
@example(pairs=[("prompt", b"\xc3\x28 not UTF-8")])
@example(pairs=[("prompt", "hi"), ("prompt", "again"), ("max_new_tokens", "2"), ("max_new_tokens", "-1")])
@example(pairs=[("prompt", "hi"), ("temperature", "nan"), ("seed", "9" * 200)])
@example(pairs=[("messages", '[{"role": "user", "content": {"nested": [1, 2]}}]')])
def test_every_request_gets_exactly_one_terminal_event(dep, pairs):
    r = dep.client()
    try:
        flat = [x for pair in pairs for x in pair]
        entry_id = _s(r.execute_command("XADD", C.REQUESTS_STREAM, "*", *flat)) if flat else None
        if entry_id is None:
            return  # XADD needs at least one field pair; redis-cli refuses too
        stream = result_stream_of(pairs, entry_id)
        events = wait_terminal(r, stream, ANSWER_S)
        terminal = [e for e in events if isinstance(e, (DoneEvent, ErrorEvent))]
        assert dep.procs["head"].poll() is None, f"the head died:\n{dep.log('head')}"
        assert len(terminal) == 1, f"{len(terminal)} terminal events on {stream} for {pairs!r:.400}: {events!r:.400}"
        assert terminal[0] is events[-1]
        if isinstance(terminal[0], ErrorEvent):
            assert terminal[0].code in ERROR_CODES and terminal[0].message
    finally:
        r.close()


def test_nothing_left_pending(dep):
    """Runs after the fuzz (file order): every request and work entry was acked."""
    r = dep.client()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pending = (r.xpending(C.REQUESTS_STREAM, C.HEADS_GROUP)["pending"],
                       r.xpending(C.work_stream("tiny"), C.PIPELINES_GROUP)["pending"])
            if pending == (0, 0):
                break
            time.sleep(0.2)
        assert pending == (0, 0)
        assert dep.procs["head"].poll() is None
    finally:
        r.close()
