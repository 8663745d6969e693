"""vLLM's `structured_outputs` extension (regex, choice, Lark grammar, JSON) on both endpoints, over a tiny
random model: whatever it would say, the output matches. Invalid constraints are 400s naming the field;
grammars compile off the engine's thread, once per schema, within a time limit."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from in_process import serve_in_process, wait_until_idle
from starlette.testclient import TestClient

from kvos.entrypoints.server import plumbing
from kvos.structured import grammar as grammar_module

GRAMMAR = 'start: greeting " " name\ngreeting: "hi" | "hello"\nname: /[a-z]{2,4}/'
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def app_client(tiny_model: Path) -> Iterator[TestClient]:
    with serve_in_process(tiny_model) as (client, _):
        yield client


def post(client: TestClient, endpoint: str, constraint: Any, **extra: Any) -> Any:
    model = client.get("/v1/models").json()["data"][0]["id"]
    body: dict[str, Any] = {"model": model, "max_tokens": 24, "temperature": 0, "structured_outputs": constraint}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": "Answer."}]
        return client.post("/v1/chat/completions", json={**body, **extra})
    return client.post("/v1/completions", json={**body, "prompt": "Answer:", **extra})


def text_of(response: Any, endpoint: str) -> str:
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    return choice["message"]["content"] if endpoint == "chat" else choice["text"]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_each_constraint_is_honoured(app_client: TestClient, endpoint: str) -> None:
    regex = text_of(post(app_client, endpoint, {"regex": r"[0-9]{3}-[a-z]{2}"}), endpoint)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", regex)
    choice = text_of(post(app_client, endpoint, {"choice": ["yes", "no", "maybe not"]}), endpoint)
    assert choice in ("yes", "no", "maybe not")
    lark = text_of(post(app_client, endpoint, {"grammar": GRAMMAR}), endpoint)
    assert re.fullmatch(r"(hi|hello) [a-z]{2,4}", lark)
    for schema in (SCHEMA, json.dumps(SCHEMA)):
        value = json.loads(text_of(post(app_client, endpoint, {"json": schema}), endpoint))
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 99
    any_object = post(app_client, endpoint, {"json_object": True}, max_tokens=4).json()["choices"][0]
    assert (any_object.get("text") or any_object["message"]["content"]).startswith("{")  # unbounded: cut, a prefix


@pytest.mark.parametrize(
    ("constraint", "param", "words"),
    [
        ({"regex": "("}, "structured_outputs.regex", "unclosed group"),
        ({"grammar": "start: missing"}, "structured_outputs.grammar", "unknown name"),
        ({"json": {"type": "object", "not": {}}}, "structured_outputs.json", "not"),
        ({"json": "{not json"}, "structured_outputs.json", "not valid JSON"),
        ({"json": "[1]"}, "structured_outputs.json", "schema object"),
        ({"regex": "a", "choice": ["a"]}, "structured_outputs", "exactly one"),
        ({}, "structured_outputs", "exactly one"),
        ({"choice": []}, "structured_outputs.choice", ""),
        ({"choice": ["a", 1]}, "structured_outputs.choice.1", ""),
        ({"structural_tag": "x"}, "structured_outputs.structural_tag", ""),
    ],
)
def test_invalid_constraints_are_400_naming_the_field(
    app_client: TestClient, constraint: dict[str, Any], param: str, words: str
) -> None:
    response = post(app_client, "completions", constraint)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]


def test_one_constraint_per_request(app_client: TestClient) -> None:
    response = post(app_client, "chat", {"regex": "a"}, response_format={"type": "json_object"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "structured_outputs"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    response = post(app_client, "chat", {"regex": "a"}, tools=tools, tool_choice="required")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "structured_outputs"


def test_grammars_compile_once_off_the_engine_thread(app_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real = grammar_module._grammar

    def recording(spec: Any) -> str:
        threads.append(threading.current_thread().name)
        return real(spec)

    monkeypatch.setattr(grammar_module, "_grammar", recording)
    regex = {"regex": r"[a-c]{4}"}
    for _ in range(3):
        assert post(app_client, "completions", regex).status_code == 200
    assert len(threads) == 1  # compiled for the first request; a cache hit after, server and engine alike
    assert "kvos-engine" not in threads


def test_a_grammar_that_compiles_too_slowly_is_400_and_stalls_nothing(
    app_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = grammar_module._grammar

    def slow(spec: Any) -> str:
        time.sleep(1.0)
        return real(spec)

    monkeypatch.setattr(grammar_module, "_grammar", slow)
    monkeypatch.setattr(plumbing, "GRAMMAR_COMPILE_TIMEOUT_S", 0.1)
    started = time.monotonic()
    response = post(app_client, "completions", {"regex": "[x-z]{5}"})
    assert response.status_code == 400
    assert "did not compile within 0.1 s" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "structured_outputs.regex"
    assert time.monotonic() - started < 0.9
    # The engine kept serving meanwhile, and holds nothing for the refused request.
    monkeypatch.undo()
    assert post(app_client, "completions", {"choice": ["a", "b"]}).status_code == 200
    assert wait_until_idle(app_client.app).num_used_blocks == 0  # type: ignore[arg-type]
