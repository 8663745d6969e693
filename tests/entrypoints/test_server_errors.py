"""Everything a client can get wrong is a 4xx with OpenAI's error body, and the server carries on.

The server here requires an API key (on /metrics too), queues at most one
request behind a single running sequence, so the 429 path can be driven
deterministically, and gives running requests one second after SIGTERM.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_process import MODEL_NAME, ServerProcess, start_server

API_KEY = "sk-test-kvos"
MAX_BODY_BYTES = 8 * 2**20  # the default
SHUTDOWN_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(
        tmp_path_factory.mktemp("server") / "serve.log",
        "--api-key",
        API_KEY,
        "--max-waiting",
        "1",
        "--max-num-seqs",
        "1",
        "--metrics-require-key",
        "--shutdown-timeout",
        str(SHUTDOWN_TIMEOUT_S),
    )
    proc.api_key = API_KEY
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def api(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=120) as client:
        yield client


def assert_error(response: httpx.Response, status: int, param: str | None, *words: str) -> dict[str, Any]:
    """The status, OpenAI's error shape, the offending parameter, and a message that names the problem."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    for word in words:
        assert word in error["message"], error["message"]
    assert "Traceback" not in response.text
    return error


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, **fields}


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


def test_malformed_json(api: httpx.Client) -> None:
    truncated = b'{"model": "x", "prompt": '
    response = api.post("/completions", content=truncated, headers={"content-type": "application/json"})
    error = assert_error(response, 400, None, "not valid JSON")
    assert error["code"] == "invalid_json"


def test_body_must_be_an_object(api: httpx.Client) -> None:
    assert_error(api.post("/chat/completions", json=[1, 2]), 400, None, "JSON object")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/completions", without(completion(), "model"), "model"),
        ("/completions", without(completion(), "prompt"), "prompt"),
        ("/chat/completions", without(chat(), "messages"), "messages"),
        ("/chat/completions", chat(messages=[{"content": "hi"}]), "messages.0.role"),
    ],
)
def test_missing_field(api: httpx.Client, path: str, body: dict, param: str) -> None:
    error = assert_error(api.post(path, json=body), 400, param, "Missing required parameter", f"'{param}'")
    assert error["code"] == "missing_required_parameter"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/completions", completion(max_tokens="5"), "max_tokens"),
        ("/completions", completion(temperature="hot"), "temperature"),
        ("/completions", completion(prompt=5), "prompt"),
        ("/completions", completion(prompt=[1, "two"]), "prompt"),
        ("/completions", completion(n=True), "n"),
        ("/completions", completion(stop=[1]), "stop"),
        ("/completions", completion(stream="yes"), "stream"),
        ("/completions", completion(echo=1), "echo"),
        ("/chat/completions", chat(messages="hello"), "messages"),
        ("/chat/completions", chat(messages=[{"role": "user", "content": 5}]), "messages.0.content"),
        ("/chat/completions", chat(logprobs="yes"), "logprobs"),
        ("/chat/completions", chat(model=7), "model"),
    ],
)
def test_wrong_type(api: httpx.Client, path: str, body: dict, param: str) -> None:
    assert_error(api.post(path, json=body), 400, param, f"'{param}'")


@pytest.mark.parametrize(
    ("path", "body", "param", "word"),
    [
        ("/completions", completion(n=0), "n", "n must be >= 1"),
        ("/completions", completion(n=129), "n", "128"),
        ("/completions", completion(max_tokens=0), "max_tokens", "max_tokens must be >= 1"),
        ("/completions", completion(max_tokens=-5), "max_tokens", "max_tokens"),
        ("/completions", completion(temperature=-0.5), "temperature", "temperature"),
        ("/completions", completion(temperature=2.5), "temperature", "2"),
        ("/completions", completion(top_p=1.5), "top_p", "top_p"),
        ("/completions", completion(top_k=-1), "top_k", "top_k"),
        ("/completions", completion(logprobs=21), "logprobs", "logprobs"),
        ("/completions", completion(seed=-1), "seed", "seed"),
        ("/completions", completion(presence_penalty=3.0), "presence_penalty", "presence_penalty"),
        ("/completions", completion(stop=[""]), "stop", "stop"),
        ("/completions", completion(prompt=""), "prompt", "empty"),
        ("/completions", completion(prompt=[]), "prompt", "empty"),
        ("/completions", completion(prompt=[10**6]), "prompt", "vocabulary"),
        ("/completions", completion(prompt=[-1], echo=True), "prompt", "vocabulary"),
        ("/chat/completions", chat(max_completion_tokens=0), "max_completion_tokens", "max_tokens must be >= 1"),
        ("/chat/completions", chat(top_logprobs=2), "top_logprobs", "logprobs"),
        ("/chat/completions", chat(logprobs=True, top_logprobs=21), "top_logprobs", "logprobs"),
        ("/chat/completions", chat(messages=[]), "messages", "at least 1"),
        ("/chat/completions", chat(messages=[{"role": "robot", "content": "hi"}]), "messages.0.role", "'user'"),
        ("/chat/completions", chat(stream_options={"include_usage": True}), "stream_options", "stream"),
    ],
)
def test_out_of_range(api: httpx.Client, path: str, body: dict, param: str, word: str) -> None:
    assert_error(api.post(path, json=body), 400, param, word)


def test_prompt_longer_than_context(api: httpx.Client) -> None:
    long_text = "hello " * 9000
    error = assert_error(api.post("/completions", json=completion(prompt=long_text)), 400, "prompt", "8192")
    assert error["code"] == "context_length_exceeded"
    messages = [{"role": "user", "content": long_text}]
    error = assert_error(api.post("/chat/completions", json=chat(messages=messages)), 400, "messages", "8192")
    assert error["code"] == "context_length_exceeded"


def test_max_tokens_beyond_context(api: httpx.Client) -> None:
    error = assert_error(api.post("/completions", json=completion(max_tokens=8192)), 400, "max_tokens", "8192")
    assert error["code"] == "context_length_exceeded"


def test_unknown_model_is_404(api: httpx.Client) -> None:
    for path, body in [("/completions", completion(model="gpt-9")), ("/chat/completions", chat(model="gpt-9"))]:
        error = assert_error(api.post(path, json=body), 404, "model", "gpt-9")
        assert error["code"] == "model_not_found"


def test_unknown_route_and_method(api: httpx.Client) -> None:
    assert_error(api.get("/nothing-here"), 404, None)
    assert_error(api.get("/completions"), 405, None)


@pytest.mark.parametrize("path", ["/models", "/completions", "/chat/completions"])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", f"Basic {API_KEY}", API_KEY])
def test_api_key_required_on_v1(server: ServerProcess, path: str, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    if path == "/models":
        response = httpx.get(f"{server.base_url}{path}", headers=headers)
    else:
        body = chat() if "chat" in path else completion()
        response = httpx.post(f"{server.base_url}{path}", headers=headers, json=body)
    error = assert_error(response, 401, None, "API key")
    assert error["type"] == "authentication_error"
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_health_needs_no_key_metrics_does(server: ServerProcess) -> None:
    """--metrics-require-key: /metrics is behind the key too; /health stays open for load balancers."""
    assert httpx.get(f"{server.url}/health").status_code == 200
    response = httpx.get(f"{server.url}/metrics")
    assert_error(response, 401, None, "API key")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}/metrics", headers=server.headers).status_code == 200


def test_openapi_and_docs_are_published(server: ServerProcess) -> None:
    schema = httpx.get(f"{server.url}/openapi.json")
    assert schema.status_code == 200
    assert "/v1/chat/completions" in schema.json()["paths"]
    assert httpx.get(f"{server.url}/docs").status_code == 200


def test_valid_key_is_accepted(api: httpx.Client) -> None:
    assert api.get("/models").json()["data"][0]["id"] == MODEL_NAME


def raw_post(server: ServerProcess, headers: list[str], chunks: list[bytes]) -> tuple[int, dict]:
    """POST over a bare socket: httpx would insist on sending a body the server has already refused."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        head = ["POST /v1/completions HTTP/1.1", f"Host: {host}", f"Authorization: Bearer {API_KEY}", *headers]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        for chunk in chunks:
            sock.sendall(chunk)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def test_declared_body_too_large_is_413(server: ServerProcess) -> None:
    status, body = raw_post(server, [f"Content-Length: {MAX_BODY_BYTES + 1}"], [b'{"model": '])
    assert status == 413
    assert str(MAX_BODY_BYTES) in body["error"]["message"]


def test_streamed_body_too_large_is_413(server: ServerProcess) -> None:
    """No Content-Length (chunked): the server counts the bytes as they arrive."""
    piece = b" " * 2**20
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    status, body = raw_post(server, ["Transfer-Encoding: chunked"], [chunk] * 9)
    assert status == 413
    assert body["error"]["code"] == "request_too_large"


def test_full_queue_is_429(server: ServerProcess, api: httpx.Client) -> None:
    """One sequence runs (max-num-seqs 1), one waits (max-waiting 1): the next request is refused at once."""
    server.wait_drained()  # requests of earlier tests must not hold the one running slot
    long_stream = completion(max_tokens=4000, stream=True, ignore_eos=True)
    with api.stream("POST", "/completions", json=long_stream) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # kept: dropping the iterator would close the connection
        next(lines)  # a token arrived: this request is in the running batch
        with api.stream("POST", "/completions", json=long_stream) as waiting:
            assert waiting.status_code == 200
            deadline = time.monotonic() + 60
            while server.metrics()["kvos_num_requests_waiting"] < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert server.metrics()["kvos_num_requests_waiting"] == 1
            refused = api.post("/completions", json=completion())
            error = assert_error(refused, 429, None, "max_waiting=1")
            assert error["code"] == "queue_full"
            assert error["type"] == "rate_limit_error"
            assert refused.headers["Retry-After"].isdigit() and int(refused.headers["Retry-After"]) >= 1
    # Both clients hung up: their requests are aborted and their KV freed.
    m = server.wait_drained()
    assert (m["kvos_num_requests_running"], m["kvos_num_requests_waiting"], m["kvos_kv_cache_used_blocks"]) == (0, 0, 0)


def test_still_serving_after_all_that(server: ServerProcess, api: httpx.Client) -> None:
    response = api.post("/completions", json=completion(max_tokens=3, ignore_eos=True))
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 3
    assert "Traceback" not in server.log()


def test_sigterm_cuts_streams_after_the_grace_and_exits_cleanly(server: ServerProcess, api: httpx.Client) -> None:
    """Runs last: it stops the module's server.

    A stream running at SIGTERM goes on for --shutdown-timeout seconds, then
    ends as a normal stream does: a last chunk (finish_reason "abort", as vLLM
    names it), then `data: [DONE]`; the process exits with status 0.
    """
    body = completion(max_tokens=4000, stream=True, ignore_eos=True)
    with api.stream("POST", "/completions", json=body) as stream:
        lines = stream.iter_lines()
        first = next(lines)
        assert first.startswith("data: {")
        started = time.monotonic()
        server.process.terminate()
        rest = [line.removeprefix("data: ") for line in lines if line]
        cut_after = time.monotonic() - started
    assert rest[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in rest[:-1]]
    assert all("error" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "abort"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert SHUTDOWN_TIMEOUT_S * 0.9 <= cut_after < SHUTDOWN_TIMEOUT_S + 10, cut_after
    assert server.process.wait(60) == 0
    assert "Traceback" not in server.log()


def test_api_key_flag_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvos.entrypoints.cli import build_parser
    from kvos.entrypoints.server_config import ServerConfig

    parser = build_parser()
    monkeypatch.delenv("KVOS_API_KEY", raising=False)
    assert ServerConfig.from_args(parser.parse_args(["serve"])).api_keys == ()
    monkeypatch.setenv("KVOS_API_KEY", "from-env")
    assert ServerConfig.from_args(parser.parse_args(["serve"])).api_keys == ("from-env",)
    assert ServerConfig.from_args(parser.parse_args(["serve", "--api-key", "from-flag"])).api_keys == ("from-flag",)
    two = parser.parse_args(["serve", "--api-key", "a", "--api-key", "b"])
    assert ServerConfig.from_args(two).api_keys == ("a", "b")
    defaults = ServerConfig.from_args(parser.parse_args(["serve"]))
    assert (defaults.host, defaults.port, defaults.max_body_bytes) == ("127.0.0.1", 8000, 8 * 2**20)
    assert (defaults.shutdown_timeout, defaults.metrics_require_key) == (5.0, False)
