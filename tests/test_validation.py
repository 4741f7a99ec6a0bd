"""Request validation: every error names the wire field and what is allowed."""
from __future__ import annotations

import json

import pytest

from hexgen.head.jsoncheck import MAX_JSON_DEPTH
from hexgen.head.validation import FIELDS, check_context, parse_request, peek_request_id
from hexgen.wire import keys as C
from hexgen.wire.protocol import InvalidRequest
from hexgen.wire.settings_tables import RequestLimits

EID = "1700000000000-0"


def parse(**fields):
    return parse_request({k.encode(): v.encode() if isinstance(v, str) else v for k, v in fields.items()}, EID)


def rejects(match, limits=None, **fields):
    with pytest.raises(InvalidRequest, match=match) as info:
        parse_request(fields, EID, limits)
    assert info.value.code == "invalid_request"
    return info.value.message


def test_minimal_prompt_uses_defaults_and_entry_id():
    r = parse(prompt="Hello")
    assert r.request_id == EID and r.prompt == "Hello" and r.messages is None and r.model is None
    assert r.params.max_new_tokens == C.DEFAULT_MAX_NEW_TOKENS and r.params.temperature == 0
    assert r.params.top_k == 0 and r.params.top_p == 1.0 and r.params.seed is None and r.params.stop == ()


def test_all_fields_parse():
    r = parse(prompt="Hi", max_new_tokens="32", temperature="0.7", top_k="40", top_p="0.95", seed="123",
              stop='["\\n", "END"]', model="tiny", id="my-req_1.a:b", ignore_eos="true")
    p = r.params
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.seed) == (32, 0.7, 40, 0.95, 123)
    assert p.stop == ("\n", "END") and p.ignore_eos is True
    assert r.model == "tiny" and r.request_id == "my-req_1.a:b"


def test_str_fields_work_too():
    assert parse_request({"prompt": "x", "max_new_tokens": "3"}, EID).params.max_new_tokens == 3


def test_messages():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "tool", "content": "{}", "tool_call_id": "c1"}]
    r = parse(messages=json.dumps(msgs))
    assert r.prompt is None and list(r.messages) == msgs


@pytest.mark.parametrize("fields,match", [
    ({}, r"prompt, messages: give exactly one of them \(neither"),
    ({"prompt": "a", "messages": "[]"}, r"exactly one of them \(both"),
    ({"prompt": ""}, "prompt: must be a non-empty string"),
    ({"messages": "not json"}, "messages: not valid JSON"),
    ({"messages": "[]"}, "messages: must be a non-empty JSON list"),
    ({"messages": '{"role": "user"}'}, "messages: must be a non-empty JSON list"),
    ({"messages": '["hi"]'}, r"messages\[0\]: must be an object"),
    ({"messages": '[{"role": "robot", "content": "x"}]'},
     r"messages\[0\].role: 'robot' must be one of system, user, assistant, tool"),
    ({"messages": '[{"role": "user", "content": 5}]'}, r"messages\[0\].content: must be a string"),
    ({"messages": '[{"role": "user", "content": "x", "weight": "a"}]'}, r"messages\[0\].weight: unknown key"),
    ({"messages": '[{"role": "tool", "content": "4"}]'}, r"messages\[0\].tool_call_id: a tool message must name"),
    ({"messages": '[{"role": "user", "content": "x", "tool_call_id": "c"}]'},
     r"messages\[0\].tool_call_id: only tool messages"),
    ({"messages": '[{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}]'},
     r"messages\[0\].tool_calls: only assistant messages"),
    ({"messages": '[{"role": "assistant", "content": null, "tool_calls": [{"id": "c"}]}]'},
     r"messages\[0\].tool_calls\[0\]: must be a tool call"),
    ({"messages": '[{"role": "user", "content": NaN}]'}, "messages: not valid JSON"),
])
def test_prompt_and_messages_errors(fields, match):
    rejects(match, **fields)


@pytest.mark.parametrize("field,value,match", [
    ("max_new_tokens", "0", r"max_new_tokens: 0 is out of range; allowed: \[1, 4096\]"),
    ("max_new_tokens", "-5", r"max_new_tokens: -5 is out of range"),
    ("max_new_tokens", "4097", r"max_new_tokens: 4097 is out of range; allowed: \[1, 4096\]"),
    ("max_new_tokens", "3.5", r"max_new_tokens: '3.5' must be an integer in \[1, 4096\]"),
    ("max_new_tokens", "1_0", "max_new_tokens: '1_0' must be an integer"),
    ("max_new_tokens", "", "max_new_tokens: '' must be an integer"),
    ("temperature", "nan", "temperature: 'nan' must be a finite number"),
    ("temperature", "inf", "temperature: 'inf' must be a finite number"),
    ("temperature", "1e999", "temperature: '1e999' is not finite"),
    ("temperature", "-0.1", r"temperature: -0.1 is out of range; allowed: \[0, 100\]"),
    ("temperature", "101", "temperature: 101 is out of range"),
    ("temperature", "hot", "temperature: 'hot' must be a finite number"),
    ("top_k", "-1", r"top_k: -1 is out of range; allowed: \[0, "),
    ("top_k", "1.5", "top_k: '1.5' must be an integer"),
    ("top_p", "0", "top_p: 0 is out of range; allowed: 0 < top_p ≤ 1"),
    ("top_p", "1.01", "top_p: 1.01 is out of range"),
    ("top_p", "NaN", "top_p: 'NaN' must be a finite number"),
    ("seed", "-1", r"seed: -1 is out of range; allowed: \[0, 9223372036854775807\]"),
    ("seed", str(2**63), "seed: .* is out of range"),
    ("stop", "", "stop: must be a non-empty string"),
    ("stop", "[1, 2]", "stop: a value starting with '\\[' must be a JSON list of non-empty strings"),
    ("stop", '["a", ""]', "stop: a value starting with"),
    ("stop", "[unclosed", "stop: not valid JSON"),
    ("stop", json.dumps(["s"] * 17), "stop: 17 strings exceeds the limit of 16"),
    ("ignore_eos", "maybe", "ignore_eos: 'maybe' must be one of 0, 1, true, false"),
    ("id", "has space", "id: 'has space' is not allowed; use A-Z a-z 0-9 _ - . :"),
    ("id", "x" * 129, "id: .* is not allowed"),
    ("id", "", "id: '' is not allowed"),
    ("model", "a/b", "model: 'a/b' is not a valid model name"),
])
def test_field_errors_name_field_and_range(field, value, match):
    rejects(match, prompt="hi", **{field: value})


def test_stop_plain_string_and_json_list():
    assert parse(prompt="x", stop="\n\n").params.stop == ("\n\n",)
    assert parse(prompt="x", stop="END").params.stop == ("END",)
    assert parse(prompt="x", stop='["[", "]"]').params.stop == ("[", "]")


def test_unknown_field_rejected_with_allowed_list():
    msg = rejects("max_tokens: unknown field; allowed fields: ", prompt="hi", max_tokens="5")
    for name in FIELDS:
        assert name in msg


def test_caps_checked_before_parsing():
    limits = RequestLimits(max_field_bytes=100, max_request_bytes=1000)
    rejects("prompt: 101 bytes exceeds the limit of 100 bytes", limits, prompt="x" * 101)
    # an oversized messages field is refused by size, never JSON-parsed
    rejects("messages: 101 bytes exceeds the limit", limits, messages="[" * 101)
    rejects("request: .* bytes exceeds the limit of 1000 bytes for all fields", limits,
            prompt="x" * 90, **{f"f{i}": "y" * 60 for i in range(20)})
    rejects(f"temperature: 300 bytes exceeds the limit of {C.MAX_SMALL_FIELD_BYTES}", None,
            prompt="x", temperature="1" * 300)
    rejects("stop: .* bytes exceeds the limit", None, prompt="x", stop="s" * (C.MAX_STOP_BYTES + 1))
    # the byte count is of UTF-8, not characters
    rejects("prompt: 102 bytes exceeds", limits, prompt="é" * 51)


def test_bad_utf8_is_invalid_request():
    rejects("prompt: value is not valid UTF-8", None, prompt=b"\xff\xfe")
    with pytest.raises(InvalidRequest, match="field name"):
        parse_request({b"\xff": b"x", b"prompt": b"y"}, EID)


def test_limits_cap_max_new_tokens():
    rejects(r"max_new_tokens: 11 is out of range; allowed: \[1, 10\]",
            RequestLimits(max_new_tokens=10, default_max_new_tokens=5), prompt="x", max_new_tokens="11")
    r = parse_request({"prompt": "x"}, EID, RequestLimits(max_new_tokens=10, default_max_new_tokens=5))
    assert r.params.max_new_tokens == 5


def test_too_many_messages():
    msgs = json.dumps([{"role": "user", "content": "x"}] * 3)
    rejects("messages: 3 messages exceeds the limit of 2", RequestLimits(max_messages=2), messages=msgs)


def test_peek_request_id_never_raises():
    assert peek_request_id({b"id": b"abc"}, EID) == "abc"
    assert peek_request_id({"id": "abc"}, EID) == "abc"
    assert peek_request_id({b"id": b"bad id"}, EID) == EID
    assert peek_request_id({b"id": b"\xff"}, EID) == EID
    assert peek_request_id({b"prompt": b"x"}, EID) == EID


def test_check_context_names_both_fields():
    check_context(10, 20, 30)
    with pytest.raises(InvalidRequest, match="prompt, max_new_tokens: prompt of 11 tokens \\+ max_new_tokens "
                                             "20 = 31 exceeds the model's context of 30 tokens"):
        check_context(11, 20, 30)
    with pytest.raises(InvalidRequest, match="prompt: tokenizes to 0 tokens"):
        check_context(0, 1, 30)


@pytest.mark.parametrize("fields", [{"messages": "[" * 5000 + "]" * 5000},
                                    {"prompt": "hi", "stop": "[" * 1500 + "]" * 1500}])
def test_json_nested_too_deeply_is_invalid_request(fields):
    name = "messages" if "messages" in fields else "stop"
    with pytest.raises(InvalidRequest) as e:
        parse_request(fields, "1-0")
    assert e.value.message == f"{name}: JSON nested deeper than {MAX_JSON_DEPTH} levels"


@pytest.mark.parametrize("fields, name", [
    ({"messages": '[{"role": "user", "content": "a\\ud800b"}]'}, "messages[0].content"),
    ({"prompt": "hi", "stop": '["ok", "\\udfff"]'}, "stop[1]"),
    ({"messages": "[" * 40 + "]" * 40}, "messages" + "[0]" * 32),
])
def test_lone_surrogates_and_deep_json_name_the_field(fields, name):
    with pytest.raises(InvalidRequest) as e:
        parse_request(fields, "1-0")
    assert e.value.message.startswith(f"{name}: ")
