"""The tool-call format: the forced schema and the parser of free replies."""

from __future__ import annotations

import json

from kvos.structured.tools import FunctionTool, ToolPlan, call_schema, calls_text, parse_calls

WEATHER = FunctionTool(
    "get_weather", "weather", json.dumps({"type": "object", "properties": {"city": {"type": "string"}}})
)
TIME = FunctionTool("get_time")


def test_a_reply_that_is_a_call_is_parsed() -> None:
    plan = ToolPlan((WEATHER, TIME), "auto")
    calls = parse_calls('[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time"}]', plan)
    assert calls is not None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert len({c.id for c in calls}) == 2


def test_plain_text_and_unknown_functions_are_content() -> None:
    plan = ToolPlan((WEATHER,), "auto")
    assert parse_calls("It is sunny.", plan) is None
    assert parse_calls('{"name": "rm_rf", "arguments": {}}', plan) is None
    assert parse_calls("[]", plan) is None


def test_without_parallel_calls_one_call_is_kept_and_forced() -> None:
    plan = ToolPlan((WEATHER, TIME), "required", parallel=False)
    calls = parse_calls('[{"name": "get_time", "arguments": {}}, {"name": "get_time", "arguments": {}}]', plan)
    assert calls is not None and len(calls) == 1
    assert call_schema(plan).schema_dict()["maxItems"] == 1


def test_a_named_function_is_the_only_one_allowed() -> None:
    schema = call_schema(ToolPlan((WEATHER, TIME), "named", "get_time")).schema_dict()
    assert schema["items"]["properties"]["name"] == {"const": "get_time"}


def test_earlier_calls_are_written_back_in_the_same_format() -> None:
    text = calls_text([("get_weather", '{"city": "Paris"}')])
    assert json.loads(text) == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
