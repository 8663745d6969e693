"""Structured output and tool calls as an OpenAI client uses them, against `kvos serve` (SmolLM2, greedy)."""

from __future__ import annotations

import json
from enum import Enum

import httpx
import openai
import pytest
from pydantic import BaseModel, Field
from server_process import MODEL_NAME, ServerProcess

MAX_TOKENS = 200


class Colour(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class City(BaseModel):
    name: str
    country: str
    population: int


class Address(BaseModel):
    street: str
    city: str


class Person(BaseModel):
    name: str
    age: int
    address: Address
    hobbies: list[str] = Field(max_length=3)
    """Bounded: unbounded, SmolLM2 at temperature 0 repeats one hobby until max_tokens."""
    favourite_colour: Colour
    nickname: str | None


class Inventory(BaseModel):
    items: list[Address]
    total: int


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize(
    ("model", "question"),
    [
        (City, "Describe the largest city of France."),
        (Person, "Invent a person who lives in Rome and has two hobbies."),
        (Inventory, "List two warehouse addresses."),
    ],
)
def test_parse_returns_the_object(client: openai.OpenAI, model: type[BaseModel], question: str) -> None:
    completion = client.chat.completions.parse(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": question}],
        response_format=model,
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, model)


def test_json_object_is_an_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Give me a JSON object with the name and age of a cat."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)


def test_unsupported_schema_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=WEATHER_QUESTION,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}},
            },
            max_tokens=8,
        )
    assert info.value.body["param"] == "response_format"  # type: ignore[index]


def test_tool_round_trip(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL_NAME,
        messages=WEATHER_QUESTION,
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="required",
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and calls[0].type == "function" and calls[0].id
    call = calls[0].function  # type: ignore[union-attr]
    assert call.name in ("get_weather", "get_time")
    arguments = json.loads(call.arguments)
    assert isinstance(arguments["city"], str)
    messages = [
        *WEATHER_QUESTION,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature": 18, "sky": "clear"}'},
    ]
    final = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL], temperature=0, max_tokens=40
    )
    assert final.choices[0].message.content
    assert final.choices[0].finish_reason in ("stop", "length")


def test_named_function_is_called(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL_NAME,
        messages=WEATHER_QUESTION,
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    calls = completion.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].function.name == "get_time"  # type: ignore[union-attr]
    assert set(json.loads(calls[0].function.arguments)) >= {"city"}  # type: ignore[union-attr]


def test_streamed_tool_calls_reassemble(client: openai.OpenAI) -> None:
    request = dict(
        model=MODEL_NAME,
        messages=WEATHER_QUESTION,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    whole = client.chat.completions.create(**request)  # type: ignore[call-overload]
    expected = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**request, stream=True):  # type: ignore[call-overload]
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += (delta.function and delta.function.name) or ""
            call["arguments"] += (delta.function and delta.function.arguments) or ""
        finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == expected
    assert all(c["id"] for c in calls.values())


def test_tool_choice_none_answers_in_text(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL_NAME, messages=WEATHER_QUESTION, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=8
    )
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].message.content


def test_langchain_structured_output_and_tools(server: ServerProcess) -> None:
    """As a LangChain user would: `with_structured_output(method="json_schema")` and `bind_tools`."""
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        model=MODEL_NAME, base_url=server.base_url, api_key="unused", temperature=0, max_tokens=MAX_TOKENS
    )
    city = llm.with_structured_output(City, method="json_schema").invoke("Describe the largest city of France.")
    assert isinstance(city, City)
    reply = llm.bind_tools([WEATHER_TOOL], tool_choice="required").invoke("What is the weather in Paris?")
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "get_weather"
    assert isinstance(reply.tool_calls[0]["args"]["city"], str)


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: str = Field(max_length=20)


def test_langchain_tool_round_trip_streaming_and_a_session(server: ServerProcess) -> None:
    """A LangChain agent's loop: a pydantic tool, the call streamed, the result sent back, all in one session
    whose second call finds the first one's KV (LangChain reports it as `cache_read`)."""
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = langchain_openai.ChatOpenAI(
        model=MODEL_NAME,
        base_url=server.base_url,
        api_key="unused",
        temperature=0,
        max_tokens=40,
        extra_body={"session_id": "langchain-agent"},
    )
    with_tools = llm.bind_tools([GetWeather], tool_choice="GetWeather")
    question = [HumanMessage("What is the weather in Paris?")]
    chunks = list(with_tools.stream(question))
    streamed = chunks[0]
    for chunk in chunks[1:]:
        streamed = streamed + chunk
    reply = with_tools.invoke(question)
    assert [c["name"] for c in reply.tool_calls] == ["GetWeather"]
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(c["name"], c["args"]) for c in reply.tool_calls]
    call = reply.tool_calls[0]
    answer = llm.bind(max_tokens=8).invoke(
        [*question, reply, ToolMessage("Sunny, 24 degrees.", tool_call_id=call["id"])]
    )
    assert isinstance(answer.content, str) and answer.content
    assert answer.usage_metadata["input_token_details"]["cache_read"] > 0
    assert httpx.delete(f"{server.base_url}/sessions/langchain-agent").status_code == 200
