"""The HTTP front's request translation and error mapping, without a server: OpenAI parameters to HexGen
request fields, the 400s that name the parameter, and the finish-reason mapping."""
from __future__ import annotations

import json

import pytest

from hexgen.head.http.context import HttpContext
from hexgen.head.http.errors import APIError, field_of, from_request_error
from hexgen.head.http.openai_request import translate
from hexgen.head.http.openai_response import openai_finish_reason
from hexgen.wire.protocol import InvalidRequest, NotFound, Overloaded
from hexgen.wire.settings import LimitSettings, ModelSettings, Settings


@pytest.fixture
def ctx():
    settings = Settings(model=ModelSettings(preset="tiny"), limits=LimitSettings(max_new_tokens=512))
    return HttpContext(settings=settings, redis=None, models=("tiny",))


def chat(**kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **kw}


def err(ctx, body, endpoint="chat") -> APIError:
    with pytest.raises(APIError) as info:
        translate(body, endpoint, ctx)
    return info.value


def test_chat_fields_and_defaults(ctx):
    tr = translate(chat(max_tokens=7, top_p=0.5, seed=3, stop=["x", "y"], top_k=4, stream=True,
                        stream_options={"include_usage": True}, user="u", n=1, presence_penalty=0), "chat", ctx)
    f = tr.fields
    assert json.loads(f["messages"]) == [{"role": "user", "content": "hi"}]
    assert (f["model"], f["max_new_tokens"], f["top_p"], f["seed"], f["top_k"]) == ("tiny", "7", "0.5", "3", "4")
    assert json.loads(f["stop"]) == ["x", "y"] and f["id"] == tr.request_id
    assert f["temperature"] == "1.0"  # OpenAI's default when the request leaves it out
    assert tr.stream and tr.include_usage and tr.endpoint == "chat"
    assert "max_new_tokens" not in translate(chat(), "chat", ctx).fields  # the deployment's default applies


def test_max_completion_tokens_wins_and_is_named_in_errors(ctx):
    assert translate(chat(max_tokens=5, max_completion_tokens=9), "chat", ctx).fields["max_new_tokens"] == "9"
    e = err(ctx, chat(max_completion_tokens=100000))
    assert e.status == 400 and e.param == "max_completion_tokens"
    assert e.message == "max_completion_tokens: 100000 is out of range; allowed: [1, 512]"
    e = err(ctx, chat(max_tokens=0))
    assert e.param == "max_tokens" and "allowed: [1, 512]" in e.message


def test_completions_prompt_forms(ctx):
    assert translate({"model": "tiny", "prompt": "a"}, "completions", ctx).fields["prompt"] == "a"
    assert translate({"model": "tiny", "prompt": ["b"]}, "completions", ctx).fields["prompt"] == "b"
    tr = translate({"model": "tiny", "prompt": ["a", "b"], "n": 2}, "completions", ctx)
    assert [j.fields["prompt"] for j in tr.jobs] == ["a", "a", "b", "b"] and [j.index for j in tr.jobs] == [0, 1, 2, 3]
    tr = translate({"model": "tiny", "prompt": [1, 2, 3]}, "completions", ctx)
    assert json.loads(tr.fields["prompt_ids"]) == [1, 2, 3] and "prompt" not in tr.fields
    tr = translate({"model": "tiny", "prompt": [[1, 2], [3]]}, "completions", ctx)
    assert [json.loads(j.fields["prompt_ids"]) for j in tr.jobs] == [[1, 2], [3]]
    e = err(ctx, {"model": "tiny", "prompt": [1, "a"]}, "completions")
    assert e.param == "prompt" and "token ids" in e.message
    assert err(ctx, {"model": "tiny", "prompt": [-1]}, "completions").param == "prompt"
    assert err(ctx, {"model": "tiny", "prompt": ""}, "completions").param == "prompt"
    assert err(ctx, {"model": "tiny"}, "completions").param == "prompt"


def test_text_parts_and_developer_role(ctx):
    body = chat(messages=[{"role": "developer", "content": "be brief"},
                          {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert json.loads(translate(body, "chat", ctx).fields["messages"]) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    e = err(ctx, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]))
    assert e.param == "messages[0].content[0]"
    e = err(ctx, chat(messages=[{"role": "robot", "content": "x"}]))
    assert e.status == 400 and e.param == "messages[0].role"
    e = err(ctx, chat(messages=[{"role": "user", "content": "x", "audio": {"id": "a"}}]))
    assert e.param == "messages[0].audio"


@pytest.mark.parametrize("param,value", [("functions", [{"name": "f"}]), ("best_of", 2)])
def test_output_changing_parameters_are_refused_by_name(ctx, param, value):
    e = err(ctx, chat(**{param: value}))
    assert e.status == 400 and e.param == param and e.code == "unsupported_parameter"
    assert e.message.startswith(f"{param}: ")


def test_inert_values_are_accepted(ctx):
    translate(chat(n=1, presence_penalty=0, frequency_penalty=0.0, logprobs=False, logit_bias={}, tools=None,
                   response_format={"type": "text"}, parallel_tool_calls=True, store=False, metadata={"a": "b"}),
              "chat", ctx)
    translate({"model": "tiny", "prompt": "x", "echo": False, "best_of": 1, "suffix": None}, "completions", ctx)


@pytest.mark.parametrize("body,param", [
    (chat(temperature=101), "temperature"), (chat(temperature="hot"), "temperature"),
    (chat(top_p=0), "top_p"), (chat(top_p=1.5), "top_p"), (chat(seed=-1), "seed"), (chat(seed=1.5), "seed"),
    (chat(top_k=-1), "top_k"), (chat(stop=[""]), "stop"), (chat(stop=5), "stop"), (chat(stream="yes"), "stream"),
    (chat(stream_options={"include_usage": True}), "stream_options"),
    (chat(stream=True, stream_options={"foo": 1}), "stream_options.foo"),
    (chat(max_tokens=True), "max_tokens"), (chat(ignore_eos="no"), "ignore_eos"),
    (chat(messages=[]), "messages"), ({"model": "tiny"}, "messages"), (chat(bogus=1), "bogus"),
    (chat(echo=True), "echo"),  # a completions parameter: unknown on chat
    (chat(n=0), "n"), (chat(n=17), "n"), (chat(presence_penalty=2.5), "presence_penalty"),
    (chat(frequency_penalty="x"), "frequency_penalty"), (chat(repetition_penalty=0), "repetition_penalty"),
    (chat(min_p=1.5), "min_p"), (chat(min_tokens=-1), "min_tokens"), (chat(logit_bias={"x": 1}), "logit_bias"),
    (chat(logit_bias={"5": 101}), "logit_bias"), (chat(logit_bias=[1]), "logit_bias"),
    (chat(stop_token_ids=[-1]), "stop_token_ids"), (chat(logprobs=3), "logprobs"),
    (chat(top_logprobs=3), "top_logprobs"), (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat(max_tokens=0), "max_tokens"), (chat(stop=""), "stop"),
    (chat(messages=[{"role": "tool", "content": "42"}]), "messages[0].tool_call_id"),
])
def test_bad_values_name_the_parameter(ctx, body, param):
    e = err(ctx, body)
    assert e.status == 400 and e.param == param, e.message
    assert e.body()["error"]["type"] == "invalid_request_error"


def test_sampling_and_scoring_fields_reach_the_wire(ctx):
    tr = translate(chat(presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2, min_p=0.1, min_tokens=2,
                        logit_bias={"7": -100}, stop_token_ids=[3], logprobs=True, top_logprobs=4), "chat", ctx)
    f = tr.fields
    assert (f["presence_penalty"], f["frequency_penalty"], f["repetition_penalty"], f["min_p"], f["min_tokens"]) == (
        "0.5", "-1.0", "1.2", "0.1", "2")
    assert json.loads(f["logit_bias"]) == {"7": -100} and json.loads(f["stop_token_ids"]) == [3]
    assert f["logprobs"] == "4" and "prompt_logprobs" not in f and tr.logprobs == 4
    assert translate(chat(logprobs=True), "chat", ctx).fields["logprobs"] == "0"
    assert translate(chat(stop="x"), "chat", ctx).fields["stop"] == "x"
    assert "logprobs" not in translate(chat(logprobs=False, top_logprobs=None), "chat", ctx).fields
    tr = translate({"model": "tiny", "prompt": "x", "echo": True, "logprobs": 2, "max_tokens": 0}, "completions", ctx)
    assert tr.fields["prompt_logprobs"] == "2" and tr.fields["max_new_tokens"] == "1" and tr.drop_generated and tr.echo


def test_n_choices_get_derived_seeds(ctx):
    tr = translate(chat(n=3, seed=5), "chat", ctx)
    seeds = [j.params["seed"] for j in tr.jobs]
    assert seeds[0] == 5 and len(set(seeds)) == 3 and len({j.request_id for j in tr.jobs}) == 3
    assert [j.params["seed"] for j in translate(chat(n=3, seed=5), "chat", ctx).jobs] == seeds
    assert all("seed" not in j.params for j in translate(chat(n=2), "chat", ctx).jobs)


def test_tool_messages_with_their_call_id_are_accepted(ctx):
    body = chat(messages=[{"role": "user", "content": "x"}, {"role": "tool", "content": "42", "tool_call_id": "c1"}])
    want = {"role": "tool", "content": "42", "tool_call_id": "c1"}  # the template renders the call it answers
    assert json.loads(translate(body, "chat", ctx).fields["messages"])[1] == want


def test_temperature_range_is_the_redis_paths(ctx):
    e = err(ctx, chat(temperature=101))
    assert e.message == "temperature: 101 is out of range; allowed: [0, 100] (0 = greedy)"


def test_unknown_model_is_404_and_missing_model_is_the_served_one(ctx):
    e = err(ctx, chat(model="gpt-4"))
    assert e.status == 404 and e.param == "model" and e.code == "model_not_found" and "tiny" in e.message
    body = chat()
    del body["model"]
    assert translate(body, "chat", ctx).model == "tiny"


def test_body_must_be_an_object(ctx):
    assert err(ctx, [1, 2]).status == 400


def test_redis_path_errors_map_to_http():
    e = from_request_error(InvalidRequest("prompt, max_new_tokens: prompt of 9 tokens + max_new_tokens 5 = 14 "
                                          "exceeds the model's context of 10 tokens"), {"max_new_tokens": "max_tokens"})
    assert e.status == 400 and e.param == "max_tokens" and "max_tokens 5" in e.message
    o = from_request_error(Overloaded("queue full"))
    assert o.status == 429 and o.headers["Retry-After"] == "1" and o.code == "overloaded"
    assert from_request_error(NotFound("model: 'x'")).status == 404
    assert field_of("messages[0].role: 'robot' must be one of") == "messages[0].role"
    assert field_of("no field here") is None


def test_finish_reasons():
    assert [openai_finish_reason(r) for r in ("eos", "stop", "length", "cancelled")] == \
        ["stop", "stop", "length", "cancelled"]
