"""Offline `LLM.chat` takes OpenAI's tools and response formats, as the server does, and parses tool calls."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from kvos import LLM
from kvos.errors import InvalidRequestError
from kvos.sampling_params import SamplingParams

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=40)


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    with LLM(max_num_seqs=4, dtype="float32") as llm:
        yield llm


def test_a_required_call_is_parsed_and_answered(llm: LLM) -> None:
    (out,) = llm.chat(QUESTION, GREEDY, use_tqdm=False, tools=[WEATHER_TOOL], tool_choice="required")
    choice = out.outputs[0]
    assert choice.finish_reason == "stop"
    (call,) = choice.tool_calls
    assert call.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.arguments)["city"], str)
    # The text is the call in kvos's format, so a caller can also read it.
    assert json.loads(choice.text)[0]["name"] == "get_weather"
    # The round trip: the call and its result go back in; with tool_choice "none" the answer is text.
    messages = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees."},
    ]
    short = SamplingParams(temperature=0.0, max_tokens=8)
    (answer,) = llm.chat(messages, short, use_tqdm=False, tools=[WEATHER_TOOL], tool_choice="none")
    assert answer.outputs[0].tool_calls == [] and answer.outputs[0].text


def test_response_format_json_schema(llm: LLM) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}}
    conversations = [QUESTION, [{"role": "user", "content": "Is it sunny in Rome?"}]]
    for out in llm.chat(conversations, GREEDY, use_tqdm=False, response_format=fmt):
        value = json.loads(out.outputs[0].text)
        assert set(value) == {"city", "sunny"} and isinstance(value["sunny"], bool)
        assert out.outputs[0].tool_calls == []


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function"}]}, "tools.0.function"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, None),
    ],
)
def test_invalid_options_are_value_errors_naming_the_field(
    llm: LLM, options: dict[str, object], param: str | None
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        llm.chat(QUESTION, GREEDY, use_tqdm=False, **options)  # type: ignore[arg-type]
    if param is not None:
        assert info.value.param == param
    assert not llm.engine.has_unfinished_requests()
