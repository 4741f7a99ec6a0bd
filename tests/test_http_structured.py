"""Structured outputs and tool calls end to end with real clients: the official ``openai`` SDK and LangChain's
``ChatOpenAI`` against ``bin/head --http-port`` serving the embedded SmolLM2-135M-Instruct (redis-server,
head, one one-stage worker, all real processes), plus the same fields on the Redis path.

Every constrained answer is checked by parsing and validating it (pydantic models for the schemas and the
tool's parameters), not against hard-coded text.
"""
from __future__ import annotations

import asyncio
import json
import re
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from hexgen.client import HexGenClient
from tests.http_harness import start_http_deployment
from tests.serving_harness import PipelineSpec

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

SMOL_LAYERS = 30


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)


class Weather(BaseModel):
    city: str = Field(max_length=24)
    unit: Literal["celsius", "fahrenheit"]


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": Weather.model_json_schema()}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 24}},
                   "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def dep(tmp_path_factory, default_model_dir):
    d = start_http_deployment(str(tmp_path_factory.mktemp("http-structured")),
                              [PipelineSpec("p0", (1,), (SMOL_LAYERS,))], model_dir=default_model_dir)
    try:
        yield d
    finally:
        d.stop()


def client(dep):
    return openai.OpenAI(base_url=dep.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_sdk_parse_returns_a_parsed_object(dep):
    messages = [{"role": "user", "content": "Invent a person: give a name and an age."}]
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 7}):  # greedy, and sampled
        got = client(dep).chat.completions.parse(model="tiny", messages=messages, response_format=Person,
                                                 max_tokens=64, **kw)
        [choice] = got.choices
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Person)
        assert Person.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_object_output_parses(dep):
    got = client(dep).chat.completions.create(
        model="tiny", max_tokens=48, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": 'What color is the sky? Reply with JSON like {"color": "..."}.'}])
    content = got.choices[0].message.content
    assert got.choices[0].finish_reason == "stop", content
    assert isinstance(json.loads(content), dict)


def test_regex_and_choice_are_obeyed(dep):
    c = client(dep)
    got = c.chat.completions.create(model="tiny", max_tokens=16, temperature=0.8, seed=3, messages=[
        {"role": "user", "content": "Give me a phone number."}], extra_body={"guided_regex": r"[0-9]{3}-[0-9]{4}"})
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", got.choices[0].message.content)
    colors = ["red", "green", "blue"]
    got = c.chat.completions.create(model="tiny", max_tokens=8, temperature=1.0, seed=11, messages=[
        {"role": "user", "content": "Pick a color."}], extra_body={"guided_choice": colors})
    assert got.choices[0].message.content in colors
    got = c.completions.create(model="tiny", prompt="The best color is", max_tokens=8, temperature=0,
                               extra_body={"guided_choice": colors})
    assert got.choices[0].text in colors


def test_named_tool_call_returns_arguments_that_validate(dep):
    got = client(dep).chat.completions.create(
        model="tiny", messages=ASK, max_tokens=96, temperature=0, tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [choice] = got.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    Weather.model_validate_json(call.function.arguments)


def test_streamed_tool_call_deltas(dep):
    chunks = list(client(dep).chat.completions.create(
        model="tiny", messages=ASK, max_tokens=96, temperature=0, tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="required", stream=True))
    calls: dict[int, dict] = {}
    for ch in chunks:
        for d in ch.choices[0].delta.tool_calls or []:
            call = calls.setdefault(d.index, {"name": "", "arguments": "", "id": None})
            call["id"] = call["id"] or d.id
            call["name"] += (d.function.name or "") if d.function else ""
            call["arguments"] += (d.function.arguments or "") if d.function else ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert calls and all(c["id"] for c in calls.values())
    models = {"get_weather": Weather, "get_time": None}
    for c in calls.values():
        assert c["name"] in models
        args = json.loads(c["arguments"])
        if models[c["name"]] is not None:
            Weather.model_validate(args)
        else:
            assert set(args) == {"zone"} and isinstance(args["zone"], str)


def test_tool_messages_in_the_history(dep):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "sunny"}'}]
    got = client(dep).chat.completions.create(model="tiny", messages=history, max_tokens=24, temperature=0,
                                              tools=[WEATHER_TOOL])
    assert got.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert got.usage.prompt_tokens > 100  # the tool prompt, the call and its result were all rendered
    with pytest.raises(openai.BadRequestError) as info:  # a tool message must say which call it answers
        client(dep).chat.completions.create(model="tiny", max_tokens=4, messages=[
            *ASK, {"role": "tool", "content": "21"}])
    assert "tool_call_id" in info.value.message


def test_schemas_the_engine_cannot_enforce_are_400s_naming_the_construct(dep):
    with pytest.raises(openai.BadRequestError) as info:
        client(dep).chat.completions.create(model="tiny", messages=ASK, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}}})
    assert "response_format" in info.value.message and '"not"' in info.value.message


def test_the_redis_path_takes_the_same_fields(dep):
    async def go():
        async with HexGenClient(dep.url, block_ms=500, timeout_s=300) as c:
            return await c.generate(messages=ASK, max_new_tokens=96, temperature=0, tools=[WEATHER_TOOL],
                                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
    done = asyncio.run(go())
    m = re.fullmatch(r"<tool_call>(.*)</tool_call>", done.text, re.DOTALL)  # SmolLM2's format, raw
    assert m, done.text
    [call] = json.loads(m.group(1))
    assert call["name"] == "get_weather"
    Weather.model_validate(call["arguments"])


def chat_openai(dep, **kw):
    lc = pytest.importorskip("langchain_openai")
    return lc.ChatOpenAI(model="tiny", base_url=dep.base_url + "/v1", api_key="unused", temperature=0,
                         max_retries=0, timeout=280, **kw)


def test_langchain_invoke_and_stream(dep):
    from langchain_core.messages import AIMessage

    llm = chat_openai(dep, max_tokens=16)
    answer = llm.invoke("Say hello.")
    assert isinstance(answer, AIMessage) and answer.content
    assert "".join(chunk.content for chunk in llm.stream("Say hello.")) == answer.content


def test_langchain_with_structured_output(dep):
    person = chat_openai(dep, max_tokens=64).with_structured_output(Person)
    assert isinstance(person.invoke("Invent a person with a name and an age."), Person)


def test_langchain_bind_tools_and_a_tool_call(dep):
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """Get the current weather in a city."""
        return f"21 degrees {unit} in {city}"

    bound = chat_openai(dep, max_tokens=96).bind_tools([get_weather], tool_choice="get_weather")
    msg = bound.invoke("What is the weather like in Paris?")
    [call] = msg.tool_calls
    assert call["name"] == "get_weather"
    Weather.model_validate(call["args"])
    assert get_weather.invoke(call["args"]).startswith("21 degrees")
