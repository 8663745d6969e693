"""The app in-process over a tiny engine: refusals, headers, auth, the OpenAPI schema, the CLI's defaults.

Nothing here needs the real model: these are the server's own decisions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from in_process import post_raw, serve_in_process, wait_until_idle
from starlette.testclient import TestClient

from kvos.config import EngineConfig
from kvos.entrypoints.cli import build_parser, engine_options
from kvos.entrypoints.openai_protocol import ProtocolError
from kvos.entrypoints.server_config import ServerConfig

API_KEY = "sk-in-process"


@pytest.fixture(scope="module")
def served(tiny_model: Path) -> Iterator[tuple[TestClient, FastAPI]]:
    with serve_in_process(tiny_model) as served:
        yield served


@pytest.fixture(scope="module")
def client(served: tuple[TestClient, FastAPI]) -> TestClient:
    return served[0]


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> str:
    return tiny_model.name


def completion(served_model: str, **fields: Any) -> dict[str, Any]:
    return {"model": served_model, "prompt": "Hello", "max_tokens": 2, **fields}


def chat(served_model: str, **fields: Any) -> dict[str, Any]:
    return {"model": served_model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, **fields}


def assert_error(response: Any, status: int, param: str | None, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    for word in words:
        assert word in error["message"], error["message"]
    return error


# -- lone surrogates --------------------------------------------------------------------

SURROGATE = "\ud800"


@pytest.mark.parametrize(
    ("path", "field", "value", "param"),
    [
        ("/v1/completions", "prompt", f"Hello {SURROGATE}", "prompt"),
        ("/v1/completions", "prompt", ["fine", SURROGATE], "prompt.1"),
        ("/v1/completions", "stop", [SURROGATE], "stop.0"),
        ("/v1/completions", "model", SURROGATE, "model"),
        ("/v1/completions", "user", "\udfff", "user"),
        ("/v1/completions", "unknown_field", {"nested": SURROGATE}, "unknown_field.nested"),
        ("/v1/chat/completions", "messages", [{"role": "user", "content": SURROGATE}], "messages.0.content"),
        (
            "/v1/chat/completions",
            "messages",
            [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}],
            "messages.0.content.0.text",
        ),
        ("/v1/chat/completions", "messages", [{"role": "user", "content": "hi", "name": SURROGATE}], "messages.0.name"),
        ("/v1/chat/completions", "stop", SURROGATE, "stop"),
    ],
)
def test_lone_surrogate_is_400_naming_the_field(
    client: TestClient, model: str, path: str, field: str, value: Any, param: str
) -> None:
    body = (chat if "chat" in path else completion)(model, **{field: value})
    error = assert_error(post_raw(client, path, body), 400, param, "surrogate", "\\ud")
    assert error["code"] == "invalid_value"


def test_surrogate_as_raw_bytes_is_400(client: TestClient, model: str) -> None:
    """CESU-8 bytes for U+D800 (ED A0 80): Python's JSON decoder lets them through as a lone surrogate."""
    body = b'{"model": "' + model.encode() + b'", "prompt": "a\xed\xa0\x80b", "max_tokens": 2}'
    response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"


def test_surrogate_in_a_key_is_escaped_in_the_error(client: TestClient, model: str) -> None:
    body = completion(model, **{f"x{SURROGATE}": 1})
    error = assert_error(post_raw(client, "/v1/completions", body), 400, "x\\ud800", "surrogate")
    assert error["param"].encode("utf-8")


def test_error_bodies_echoing_a_surrogate_still_encode() -> None:
    """The 404 for an unknown model quotes the model; surrogates are escaped, not sent raw."""
    error = ProtocolError(404, f"The model '{SURROGATE}' does not exist.", param=f"model{SURROGATE}")
    message = error.body()["error"]["message"]
    assert message == "The model '\\ud800' does not exist."
    assert error.body()["error"]["param"].encode("utf-8") == b"model\\ud800"


def test_unknown_model_404_echoes_the_name(client: TestClient, model: str) -> None:
    error = assert_error(client.post("/v1/completions", json=completion("gpt-\u00e9\x00")), 404, "model", "gpt-")
    assert error["code"] == "model_not_found"


# -- unsupported and structured-output OpenAI features ----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        (path, field, value)
        for path in ("/v1/chat/completions", "/v1/completions")
        for field, value in (("functions", [{"name": "f"}]), ("function_call", "auto"))
    ]
    + [
        ("/v1/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
        ("/v1/completions", "tool_choice", "auto"),
    ],
)
def test_unsupported_feature_is_400_naming_it(
    client: TestClient, model: str, path: str, field: str, value: Any
) -> None:
    body = (chat if "chat" in path else completion)(model, **{field: value})
    error = assert_error(client.post(path, json=body), 400, field, "not support", field)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("response_format", "text"),
        ("response_format", {"type": "yaml"}),
        ("response_format", {"type": "json_schema"}),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
        ("tool_choice", "auto"),
        ("tool_choice", "sometimes"),
        ("tools", [{"type": "function", "function": {"name": "has space"}}]),
    ],
)
def test_malformed_structured_fields_are_400_naming_them(
    client: TestClient, model: str, field: str, value: Any
) -> None:
    response = client.post("/v1/chat/completions", json=chat(model, **{field: value}))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(field)


@pytest.mark.parametrize(
    "fields",
    [
        {"response_format": {"type": "text"}},
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
        {"tool_choice": "none"},
        {"tools": []},
        {"function_call": "none"},
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
    ],
)
def test_what_is_served_of_those_features_is_accepted(client: TestClient, model: str, fields: dict) -> None:
    assert client.post("/v1/chat/completions", json=chat(model, **fields)).status_code == 200


# -- logit_bias -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["abc", "-1", "1.5", " 7", "", "1" * 40])
def test_logit_bias_key_must_be_a_token_id(client: TestClient, model: str, key: str) -> None:
    response = client.post("/v1/completions", json=completion(model, logit_bias={key: 1}))
    assert_error(response, 400, "logit_bias", "logit_bias")


@pytest.mark.parametrize("bias", [100.5, -1000, "1", None])
def test_logit_bias_value_must_be_in_range(client: TestClient, model: str, bias: Any) -> None:
    assert_error(client.post("/v1/completions", json=completion(model, logit_bias={"7": bias})), 400, "logit_bias")


def test_logit_bias_outside_the_vocabulary_is_400(client: TestClient, model: str) -> None:
    """The engine checks ids against its vocabulary (49152 entries here)."""
    assert_error(client.post("/v1/completions", json=completion(model, logit_bias={"49152": 5})), 400, "logit_bias")


def test_logit_bias_steers_greedy_tokens(client: TestClient, model: str) -> None:
    body = completion(model, max_tokens=4, temperature=0, ignore_eos=True, logprobs=0, logit_bias={"42": 100})
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    tokens = response.json()["choices"][0]["logprobs"]["tokens"]
    forced = client.app.state.serving.token_text(42)  # type: ignore[attr-defined]
    assert tokens == [forced] * 4


# -- auth, headers, metrics --------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tiny_model: Path) -> Iterator[TestClient]:
    """An app that wants a key on /v1 and on /metrics."""
    config = ServerConfig(api_keys=(API_KEY,), metrics_require_key=True)
    with serve_in_process(tiny_model, config) as (client, _):
        yield client


def test_401_says_how_to_authenticate(keyed: TestClient, model: str) -> None:
    response = keyed.post("/v1/completions", json=completion(model))
    assert_error(response, 401, None, "API key")
    assert response.headers["www-authenticate"] == "Bearer"
    assert keyed.get("/v1/models").headers["www-authenticate"] == "Bearer"


def test_metrics_require_key_when_asked(keyed: TestClient) -> None:
    response = keyed.get("/metrics")
    assert_error(response, 401, None, "API key")
    assert response.headers["www-authenticate"] == "Bearer"
    authorized = keyed.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert authorized.status_code == 200
    assert "kvos_kv_cache_used_blocks" in authorized.text
    assert keyed.get("/health").status_code == 200


def test_metrics_open_by_default_even_with_a_key(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 200
    assert ServerConfig(api_keys=(API_KEY,)).metrics_require_key is False


def test_metrics_require_key_without_a_key_changes_nothing(tiny_model: Path) -> None:
    with serve_in_process(tiny_model, ServerConfig(metrics_require_key=True)) as (client, _):
        assert client.get("/metrics").status_code == 200


def test_metrics_and_start_up_log_show_every_kv_tier(
    tiny_model: Path, model: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.INFO),
        serve_in_process(tiny_model, kv_offload_bytes=2**20, kv_disk_path=str(tmp_path), kv_disk_bytes=2**20) as (
            client,
            _,
        ),
    ):
        prompt = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " * 3
        for _ in range(2):
            response = client.post("/v1/completions", json=completion(model, prompt=prompt, max_tokens=2))
            assert response.status_code == 200, response.text
        text = client.get("/metrics").text
    for tier in ("primary", "host", "disk"):
        assert f'kvos_kv_tier_capacity_bytes{{tier="{tier}"}}' in text
        assert f'kvos_kv_tier_hit_tokens_total{{tier="{tier}"}}' in text
        assert f'kvos_kv_tier_used_bytes{{tier="{tier}"}} 0.0' in text  # every request ended
    (hits,) = [line for line in text.splitlines() if line.startswith('kvos_kv_tier_hit_tokens_total{tier="primary"}')]
    assert float(hits.split()[-1]) >= 16  # the second request found the first one's blocks
    for direction in ("to_host", "from_host", "to_disk", "from_disk"):
        assert f'kvos_kv_copy_seconds_count{{direction="{direction}"}}' in text
    for name in ("kvos_kv_disk_corrupted_blocks_total", "kvos_kv_disk_write_failures_total", "kvos_kv_disk_accepting"):
        assert f"{name} " in text
    assert 'kvos_preemptions_by_mode_total{mode="swap"}' in text
    log = caplog.text
    assert "host KV tier holds" in log and "disk KV tier at" in log and "tokens" in log


# -- internal failures say nothing about themselves -----------------------------------------------


class _Exploding:
    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("secret internal detail")


def test_unexpected_failure_is_500_without_its_text(
    served: tuple[TestClient, FastAPI], model: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client, app = served
    monkeypatch.setattr(app.state.serving, "tokenizer", _Exploding())
    with caplog.at_level(logging.ERROR):
        response = client.post("/v1/completions", json=completion(model))
    assert_error(response, 500, None, "Internal server error")
    assert "secret" not in response.text and "RuntimeError" not in response.text
    assert "secret internal detail" in caplog.text


def test_engine_failure_is_503_without_its_text(
    served: tuple[TestClient, FastAPI], model: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client, app = served

    async def add_request(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(app.state.serving.engine, "add_request", add_request)
    with caplog.at_level(logging.ERROR):
        response = client.post("/v1/chat/completions", json=chat(model))
    error = assert_error(response, 503, None)
    assert error["code"] == "engine_error"
    assert "secret" not in response.text and "RuntimeError" not in response.text
    assert "secret internal detail" in caplog.text


def test_engine_idle_after_all_that(served: tuple[TestClient, FastAPI], model: str) -> None:
    client, app = served
    assert client.post("/v1/completions", json=completion(model)).status_code == 200
    assert wait_until_idle(app).num_used_blocks == 0


# -- OpenAPI ------------------------------------------------------------------------------------------


def test_openapi_schema_declares_bodies_responses_and_errors(client: TestClient, model: str) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    schemas = schema["components"]["schemas"]
    for path, request_model, response_model in [
        ("/v1/completions", "CompletionRequest", "CompletionResponse"),
        ("/v1/chat/completions", "ChatCompletionRequest", "ChatCompletionResponse"),
    ]:
        post = schema["paths"][path]["post"]
        body = post["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{request_model}"}
        assert schemas[request_model]["properties"]["model"]["enum"] == [model]
        assert "max_tokens" in schemas[request_model]["properties"]
        ok = post["responses"]["200"]["content"]
        assert ok["application/json"]["schema"] == {"$ref": f"#/components/schemas/{response_model}"}
        assert "text/event-stream" in ok
        for status in ("400", "401", "404", "413", "429", "503"):
            error_schema = post["responses"][status]["content"]["application/json"]["schema"]
            assert error_schema == {"$ref": "#/components/schemas/ErrorResponse"}
        assert "422" not in post["responses"]
    assert "security" not in schema["paths"]["/v1/completions"]["post"]


def test_openapi_marks_keyed_routes(keyed: TestClient) -> None:
    schema = keyed.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    for path in ("/v1/completions", "/v1/models", "/metrics"):
        assert next(iter(schema["paths"][path].values()))["security"] == [{"bearer": []}]
    assert "security" not in schema["paths"]["/health"]["get"]


def test_docs_page(client: TestClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    assert "/openapi.json" in response.text


# -- the CLI ----------------------------------------------------------------------------------------


def test_serve_flags_default_to_the_config_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVOS_API_KEY", raising=False)
    args = build_parser().parse_args(["serve"])
    assert EngineConfig.from_kwargs(**engine_options(args)) == EngineConfig()
    assert ServerConfig.from_args(args) == ServerConfig()


def test_serve_flags_reach_the_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVOS_API_KEY", raising=False)
    argv = ["serve", "--shutdown-timeout", "0.5", "--metrics-require-key", "--no-prefix-caching", "--max-num-seqs", "3"]
    args = build_parser().parse_args([*argv, "--kv-cache", "virtual", "--attention-backend", "contiguous"])
    server = ServerConfig.from_args(args)
    assert (server.shutdown_timeout, server.metrics_require_key) == (0.5, True)
    engine = EngineConfig.from_kwargs(**engine_options(args))
    assert (engine.cache.enable_prefix_caching, engine.scheduler.max_num_seqs) == (False, 3)
    assert (engine.cache.kv_cache, engine.model.attention_backend) == ("virtual", "contiguous")


def test_shutdown_timeout_must_be_finite_and_not_negative() -> None:
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="shutdown_timeout"):
            ServerConfig(shutdown_timeout=bad)
