"""Fuzzing: any JSON in any field is a 200 or a 4xx in OpenAI's error shape, never a 5xx, and leaves nothing behind.

Two fuzzers over the in-process app and its tiny engine (see in_process.py):
hypothesis puts arbitrary JSON (huge integers, NaN and Infinity written as raw
JSON, lone surrogates, control characters, nested lists and objects) into
every field of an otherwise valid request; schemathesis generates requests
from /openapi.json and checks the responses against it. After every request
the engine must be idle with no KV block held, and still serve.
KVOS_FUZZ_EXAMPLES (default 40) sets the examples per test (per operation for schemathesis).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from in_process import serve_in_process, tiny_engine, wait_until_idle, write_tiny_model
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.testclient import TestClient

from kvos.engine.async_engine import AsyncLLMEngine
from kvos.entrypoints.server import build_app
from kvos.entrypoints.server_config import ServerConfig

EXAMPLES = int(os.environ.get("KVOS_FUZZ_EXAMPLES", "40"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis folder in the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class RawJSON:
    """JSON text written as is: numbers Python's json module would refuse to write (over 4300 digits)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"RawJSON({self.text[:20]!r}{'...' if len(self.text) > 20 else ''})"


def to_json(value: Any) -> str:
    """Like json.dumps(ensure_ascii=True, allow_nan=True): surrogates become \\udXXX escapes, NaN stays NaN."""
    if isinstance(value, RawJSON):
        return value.text
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{to_json(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, allow_nan=True)


SPECIAL_STRINGS = [
    "",
    "\ud800",
    "a\udfffb",
    "\x00",
    "\x1b[31m",
    "\u2028",
    "\U0001f600",
    "none",
    "text",
    "auto",
    "user",
    "system",
    "assistant",
    "50256",
    "-1",
    "1e3",
    "{{ raise_exception('x') }}",
]
strings = st.one_of(
    st.sampled_from(SPECIAL_STRINGS),
    st.text(st.characters(exclude_categories=()), max_size=12),  # surrogates (category Cs) included
)
raw_numbers = st.sampled_from(["1" * 5000, "-" + "9" * 4500, "1e999", "-1e999", "1e-999", "-0", "0.0", "NaN"])
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-4, max_value=130),  # around the edges of n, logprobs, top_k, max_tokens
    st.integers(),
    st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**40]),
    st.floats(min_value=-3, max_value=3),
    st.sampled_from([1e-40, 5e-324, 1e-5, 0.0, -0.0, 1e308]),
    st.floats(allow_nan=True, allow_infinity=True),
    raw_numbers.map(RawJSON),
    strings,
)
json_values = st.recursive(
    leaves,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(strings, children, max_size=4)),
    max_leaves=12,
)
# Mostly scalars: a field's edge cases are numbers and strings; containers test the types.
field_values = st.one_of(leaves, leaves, leaves, json_values)

COMMON_FIELDS = [
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "n",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "ignore_eos",
    "user",
    "stream",
    "stream_options",
    "stream_options.include_usage",
    "logit_bias",
    "logit_bias.7",
    "response_format",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "an_unknown_field",
]
COMPLETION_FIELDS = [*COMMON_FIELDS, "prompt", "prompt.0", "logprobs", "echo"]
CHAT_FIELDS = [
    *COMMON_FIELDS,
    "messages",
    "messages.0",
    "messages.0.role",
    "messages.0.content",
    "messages.0.content.0",
    "messages.0.content.0.text",
    "messages.0.content.0.type",
    "messages.0.name",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
]


def set_path(body: dict[str, Any], path: str, value: Any) -> None:
    """Put `value` at a dotted path ("messages.0.content"), making the containers on the way what the path needs."""
    keys = path.split(".")
    node: Any = body
    for key, next_key in zip(keys, keys[1:], strict=False):
        container = list if next_key.isdigit() else dict
        child = _get(node, key)
        if not isinstance(child, container):
            child = container()
            _put(node, key, child)
        node = child
    _put(node, keys[-1], value)


def _get(node: list[Any] | dict[str, Any], key: str) -> Any:
    if isinstance(node, list):
        return node[int(key)] if int(key) < len(node) else None
    return node.get(key)


def _put(node: list[Any] | dict[str, Any], key: str, value: Any) -> None:
    """Set a dict key, or a list item (appending when the index is past the end)."""
    if isinstance(node, dict):
        node[key] = value
    elif int(key) < len(node):
        node[int(key)] = value
    else:
        node.append(value)


def check_response(response: Any) -> None:
    """200 with a complete body, or a 4xx with OpenAI's error body; never a 5xx."""
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert 400 <= response.status_code < 500
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and isinstance(error["type"], str)
        assert error["param"] is None or isinstance(error["param"], str)
        assert error["code"] is None or isinstance(error["code"], str)
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n"), response.text[-500:]
    else:
        assert response.json()["choices"]


@pytest.fixture(scope="module")
def fuzzed(tiny_model: Path) -> Iterator[tuple[TestClient, FastAPI]]:
    with serve_in_process(tiny_model) as served:
        yield served


def send_and_check(served: tuple[TestClient, FastAPI], path: str, body: dict[str, Any]) -> None:
    client, app = served
    text = to_json(body).encode()
    response = client.post(path, content=text, headers={"content-type": "application/json"})
    check_response(response)
    stats = wait_until_idle(app)
    assert (stats.num_running, stats.num_waiting, stats.num_used_blocks) == (0, 0, 0)
    model = body_model(app)
    normal = client.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1})
    assert normal.status_code == 200, normal.text


def body_model(app: FastAPI) -> str:
    return app.state.serving.model_name


@FUZZ_SETTINGS
@given(changes=st.lists(st.tuples(st.sampled_from(COMPLETION_FIELDS), field_values), min_size=1, max_size=3))
def test_any_json_in_any_completions_field(fuzzed: tuple[TestClient, FastAPI], changes: list) -> None:
    body: dict[str, Any] = {"model": body_model(fuzzed[1]), "prompt": "Hello there", "max_tokens": 2}
    for path, value in changes:
        set_path(body, path, value)
    send_and_check(fuzzed, "/v1/completions", body)


@FUZZ_SETTINGS
@given(changes=st.lists(st.tuples(st.sampled_from(CHAT_FIELDS), field_values), min_size=1, max_size=3))
def test_any_json_in_any_chat_field(fuzzed: tuple[TestClient, FastAPI], changes: list) -> None:
    messages = [{"role": "user", "content": "Hello there"}]
    body: dict[str, Any] = {"model": body_model(fuzzed[1]), "messages": messages, "max_tokens": 2}
    for path, value in changes:
        set_path(body, path, value)
    send_and_check(fuzzed, "/v1/chat/completions", body)


@FUZZ_SETTINGS
@given(body=json_values)
def test_any_json_as_the_whole_body(fuzzed: tuple[TestClient, FastAPI], body: Any) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        client, _ = fuzzed
        response = client.post(path, content=to_json(body).encode(), headers={"content-type": "application/json"})
        check_response(response)


# -- schemathesis: requests generated from the published schema ------------------------------------


@pytest.fixture(scope="module")
def openapi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    """An app of its own: schemathesis runs its lifespan (starting the engine) on its own event loop."""
    config = ServerConfig()
    engine = AsyncLLMEngine(tiny_engine(write_tiny_model(tmp_path_factory.mktemp("schema"))), config.max_waiting)
    yield schemathesis.openapi.from_asgi("/openapi.json", build_app(engine, config))
    # schemathesis keeps lifespans open until the process exits; stop the engine thread now.
    engine.shutdown()


schema = schemathesis.pytest.from_fixture("openapi")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_openapi_schema_holds(case: schemathesis.Case) -> None:
    case.call_and_validate(
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            response_headers_conformance,
        ]
    )
