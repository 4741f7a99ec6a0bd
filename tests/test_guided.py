"""Guided decoding units: the device bitmask application against a plain reference, the last stage's grammar
matchers (masks, advancing, a resumed request's rebuilt state), the wire fields of structured outputs and
tools, grammar compilation (a construct the engine cannot enforce is named), tool prompts and tool-call
parsing. The end-to-end proofs with real clients are in tests/test_http_structured.py."""
from __future__ import annotations

import json

import pytest
import torch

from hexgen.engine.guided import GuidedDecoding, apply_bitmask, bitmask_words
from hexgen.head.http.tools import ToolStream, parse_tool_calls
from hexgen.head.structured import GrammarCompiler, parse_structured
from hexgen.head.tool_prompt import render, tool_format
from hexgen.wire.protocol import InvalidRequest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def reference_mask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    out = logits.clone()
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            word = int(bitmask[i, j // 32]) if j // 32 < bitmask.shape[1] else 0
            if not (word >> (j % 32)) & 1:
                out[i, j] = float("-inf")
    return out


@pytest.mark.parametrize("vocab,words", [(70, 3), (64, 2), (100, 3)])
def test_apply_bitmask_matches_the_reference(vocab, words):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=g)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, words), generator=g, dtype=torch.int64).to(torch.int32)
    bitmask[0] = -1  # every token allowed
    bitmask[1] = 0  # none
    before = logits.clone()
    got = apply_bitmask(logits, bitmask)
    assert torch.equal(logits, before), "the input is left as it was"
    assert torch.equal(got, reference_mask(logits, bitmask))  # -inf where the bit is 0 (past the words too)
    assert bitmask_words(vocab) == (vocab + 31) // 32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_apply_bitmask_on_cuda_matches_the_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 1000, generator=g)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (64, 32), generator=g, dtype=torch.int64).to(torch.int32)
    got = apply_bitmask(logits.cuda(), bitmask.cuda()).cpu()
    assert torch.equal(got, apply_bitmask(logits, bitmask))
    assert torch.equal(got[:2], reference_mask(logits[:2], bitmask[:2]))


@pytest.fixture(scope="module")
def smol_tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def allowed(mask_row: torch.Tensor, vocab: int) -> list[int]:
    return [j for j in range(vocab) if (int(mask_row[j // 32]) >> (j % 32)) & 1]


_COMPILERS: dict[int, GrammarCompiler] = {}


def grammar_for(tok, **fields) -> str:
    """The grammar the head compiles for these wire fields (one compiler per tokenizer, as in the head)."""
    wire = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
    comp = _COMPILERS.setdefault(id(tok), GrammarCompiler(tok))
    return comp.compile(parse_structured(wire, chat=True), tool_format(tok.chat_template))


def test_matchers_mask_advance_and_rebuild_after_resume(smol_tok):
    vocab = len(smol_tok)
    grammar = grammar_for(smol_tok, guided_choice=["yes please", "no thanks"])
    guided = GuidedDecoding(smol_tok, vocab, (2,))
    guided.add(7, "r", grammar, [])
    first = allowed(guided.fill([7])[0], vocab)
    assert first and all(("yes please".startswith(smol_tok.decode([t])) or "no thanks".startswith(smol_tok.decode([t])))
                         for t in first)
    ids = smol_tok.encode("yes please")
    for i, t in enumerate(ids):
        guided.advance(7, i, t)
        guided.advance(7, i, t)  # a second report of the same token index is ignored
    assert guided.consumed(7) == len(ids)
    assert allowed(guided.fill([7])[0], vocab) == [2], "a finished grammar allows only the end of sequence"
    # A request resumed elsewhere with its tokens so far: the new matcher continues from the same state.
    guided.add(8, "r", grammar, ids[:1])
    guided.add(9, "r", grammar, [])
    guided.advance(9, 0, ids[0])
    a, b, free = guided.fill([8, 9, None])
    assert torch.equal(a, b) and allowed(a, vocab) != first and free.eq(-1).all()
    assert guided.fill([None])[0].eq(-1).all(), "an unconstrained row allows everything"
    guided.remove(8)
    assert 8 not in guided and 9 in guided


@pytest.mark.parametrize("fields,match", [
    ({"response_format": '{"type": "xml"}'}, "response_format.type: must be one of"),
    ({"response_format": '{"type": "json_schema"}'}, "response_format.json_schema: must be an object"),
    ({"guided_json": "[1]"}, "guided_json: must be a JSON schema"),
    ({"guided_choice": "[]"}, "guided_choice: must be a non-empty JSON list"),
    ({"guided_regex": "a+", "guided_choice": '["a"]'}, "guided_regex, guided_choice: give at most one"),
    ({"tool_choice": "required"}, "tool_choice: 'required' needs tools"),
    ({"tools": json.dumps([WEATHER]), "tool_choice": '{"type": "function", "function": {"name": "nope"}}'},
     "tool_choice: function 'nope' is not among the tools"),
    ({"tools": '[{"type": "function", "function": {}}]'}, r"tools\[0\].function.name: must be a non-empty string"),
    ({"tools": json.dumps([WEATHER]), "tool_choice": "required", "guided_regex": "a"},
     "tool_choice, guided_regex: a required tool call"),
    ({"tool_choice": "sometimes"}, "tool_choice: must be"),
])
def test_structured_field_errors_name_the_field(fields, match):
    with pytest.raises(InvalidRequest, match=match):
        parse_structured(fields, chat=True)


def test_tools_only_with_messages():
    with pytest.raises(InvalidRequest, match="tools: only for chat requests"):
        parse_structured({"tools": json.dumps([WEATHER])}, chat=False)


@pytest.mark.parametrize("fields,construct", [
    ({"guided_json": '{"type": "object", "not": {"type": "string"}}'}, "not"),
    ({"guided_regex": "(?=a)b"}, "look-around"),
    ({"response_format": json.dumps({"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"$ref": "http://example.com/s.json"}}})}, "http://example.com/s.json"),
    ({"guided_grammar": "start: foo"}, "foo"),
])
def test_what_the_engine_cannot_enforce_is_named(smol_tok, fields, construct):
    with pytest.raises(InvalidRequest) as info:
        grammar_for(smol_tok, **fields)
    field = next(iter(fields))
    assert info.value.message.startswith(f"{field}: the grammar engine cannot enforce it") or \
        info.value.message.startswith(f"{field}: not a valid")
    assert construct in info.value.message


def accepts(tok, grammar: str, text: str) -> bool:
    import llguidance

    m = llguidance.LLMatcher(_COMPILERS[id(tok)]._ll_tokenizer(), grammar)
    return all(m.consume_token(t) for t in tok.encode(text)) and m.is_accepting()


def test_grammars_accept_what_they_should(smol_tok):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    g = grammar_for(smol_tok, guided_json=schema)
    assert accepts(smol_tok, g, '{"n": 3}') and not accepts(smol_tok, g, '{"n": "3"}')
    g = grammar_for(smol_tok, response_format={"type": "json_object"})
    assert accepts(smol_tok, g, '{"a": [1, 2]}') and not accepts(smol_tok, g, "[1]")
    g = grammar_for(smol_tok, guided_regex=r"\d{3}-[a-z]+")
    assert accepts(smol_tok, g, "123-abc") and not accepts(smol_tok, g, "12-abc")
    g = grammar_for(smol_tok, guided_grammar='root ::= "up" | "down"')  # GBNF is converted to Lark
    assert accepts(smol_tok, g, "down") and not accepts(smol_tok, g, "left")
    # A named function (SmolLM2's format): one call whose arguments validate.
    g = grammar_for(smol_tok, tools=[WEATHER, TIME],
                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert accepts(smol_tok, g, '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}]'
                                '</tool_call>')
    assert not accepts(smol_tok, g, '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>')
    assert not accepts(smol_tok, g, '<tool_call>[{"name": "get_time", "arguments": {}}]</tool_call>')
    g = grammar_for(smol_tok, tools=[WEATHER, TIME], tool_choice="required")
    assert accepts(smol_tok, g, '<tool_call>[{"name": "get_time", "arguments": {}}]</tool_call>')


def test_compiles_once_per_grammar(smol_tok, monkeypatch):
    comp = GrammarCompiler(smol_tok)
    s = parse_structured({"guided_regex": "ab+"}, chat=False)
    calls = []
    real = comp._check
    monkeypatch.setattr(comp, "_check", lambda g: calls.append(g) or real(g))
    assert comp.compile(s, None) == comp.compile(s, None)
    assert len(calls) == 1


def test_smollm2_template_gets_the_tools_and_the_history(smol_tok):
    assert tool_format(smol_tok.chat_template) == "smollm2"
    msgs = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                               "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
            {"role": "tool", "content": "-3 C", "tool_call_id": "c1"}]
    out, extra = render(msgs, [WEATHER], "smollm2")
    text = smol_tok.apply_chat_template(out, add_generation_prompt=True, tokenize=False, **extra)
    assert "<tools>" in text and '"get_weather"' in text and "Current weather in a city" in text
    assert '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}]</tool_call>' in text
    assert "<|im_start|>tool\n-3 C<|im_end|>" in text


def test_template_without_tool_support_is_refused():
    with pytest.raises(InvalidRequest, match="tools: this model's chat template does not render tools"):
        tool_format("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")


@pytest.mark.parametrize("text,content,calls", [
    ('<tool_call>[{"name": "get_time", "arguments": {}}]</tool_call>', None, [("get_time", {})]),
    ('Sure.<tool_call>{"name": "get_weather", "arguments": {"city": "A", "unit": "c"}}</tool_call>', "Sure.",
     [("get_weather", {"city": "A", "unit": "c"})]),
    ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n<tool_call>{"name": "get_time", '
     '"arguments": {}}</tool_call>', None, [("get_time", {}), ("get_time", {})]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "B", "unit": "f"}}', None,
     [("get_weather", {"city": "B", "unit": "f"})]),
    ('{"name": "unknown", "parameters": {}}', '{"name": "unknown", "parameters": {}}', []),
    ("Just text", "Just text", []),
    ('<tool_call>[{"name": "get_time", "argum', '<tool_call>[{"name": "get_time", "argum', []),  # cut by length
])
def test_tool_calls_are_parsed(text, content, calls):
    got_content, got = parse_tool_calls(text, [WEATHER, TIME])
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got)


def test_tool_stream_holds_back_only_what_may_be_a_call():
    s = ToolStream([TIME])
    assert s.feed("Hel") == "Hel" and s.feed("lo") == "lo" and s.finish() == (None, [])
    s = ToolStream([TIME])
    assert s.feed("<tool") is None and s.feed('_call>[{"name": "get_time", "arguments": {}}]</tool_call>') is None
    content, calls = s.finish()
    assert content is None and calls[0]["function"]["name"] == "get_time"


# A small template in Llama 3.1's style (written for this test): it renders ``tools`` itself in the
# ipython environment, takes a history call's arguments as an object, and shows tool results as ipython.
LLAMA31_STYLE = (
    "{{- bos_token }}{%- if tools %}<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
    "{%- for t in tools %}\n{{ t | tojson }}{%- endfor %}<|eot_id|>{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{%- for c in m.tool_calls %}<|python_tag|>{{ {'name': c.function.name, 'parameters': c.function.arguments}"
    " | tojson }}{%- endfor %}<|eom_id|>"
    "{%- elif m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
    "{%- else %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}"
)


def test_a_llama31_template_renders_tools_itself(smol_tok):
    assert tool_format(LLAMA31_STYLE) == "llama3"
    msgs = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                               "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
            {"role": "tool", "content": "-3 C", "tool_call_id": "c1"}]
    out, extra = render(msgs, [WEATHER], "llama3")
    assert extra == {"tools": [WEATHER]}
    text = smol_tok.apply_chat_template(out, chat_template=LLAMA31_STYLE, add_generation_prompt=True,
                                        tokenize=False, **extra)
    assert "Environment: ipython" in text and '"get_weather"' in text
    assert '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}}' in text
    assert "ipython<|end_header_id|>\n\n-3 C" in text
    # A required call in this format is the bare JSON object, with "parameters".
    g = grammar_for(smol_tok, tools=[WEATHER], tool_choice="required")  # SmolLM2's own format
    assert "<tool_call>" in g
    from hexgen.head.tool_prompt import call_grammar
    g3 = call_grammar([WEATHER], ["get_weather"], "llama3", single=True)
    assert accepts(smol_tok, g3, '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "f"}}')
    assert not accepts(smol_tok, g3, '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "f"}}')
