"""Many clients at once share one engine; clients that hang up leave nothing behind."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from server_process import MODEL_NAME, ServerProcess

NUM_CLIENTS = 50
NUM_DISCONNECTING = 10
MAX_TOKENS = 16


def request_body(i: int, max_tokens: int) -> tuple[str, dict[str, Any]]:
    """Alternate completions and chat, with distinct prompts."""
    common = {
        "model": MODEL_NAME,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0.8,
        "seed": i,
        "stream_options": {"include_usage": True},
    }
    if i % 2:
        messages = [{"role": "user", "content": f"Tell me about the number {i}."}]
        return "/chat/completions", {**common, "messages": messages}
    return "/completions", {**common, "prompt": f"Client {i} says: the weather today is"}


def check_stream(path: str, payloads: list[str]) -> None:
    """A complete, well-formed OpenAI stream of one choice that ran to max_tokens."""
    *events, done = payloads
    assert done == "[DONE]"
    chunks = [json.loads(p) for p in events]
    assert len({c["id"] for c in chunks}) == 1
    *content, usage = chunks
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == MAX_TOKENS
    assert all(c["usage"] is None and [ch["index"] for ch in c["choices"]] == [0] for c in content)
    reasons = [c["choices"][0]["finish_reason"] for c in content]
    assert reasons[-1] == "length" and reasons.count("length") == 1 and set(reasons[:-1]) <= {None}
    if path == "/chat/completions":
        assert content[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
    else:
        assert all(c["object"] == "text_completion" for c in chunks)
        text = "".join(c["choices"][0]["text"] for c in content)
    assert text


async def run_client(client: httpx.AsyncClient, i: int) -> tuple[str, list[str]] | None:
    """Stream to the end, or (disconnecting clients) hang up after a few chunks; returns the payloads."""
    disconnect = i < NUM_DISCONNECTING
    path, body = request_body(i, 2000 if disconnect else MAX_TOKENS)
    payloads: list[str] = []
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        raw = ""
        async for text in response.aiter_text():
            raw += text
            while "\n\n" in raw:
                event, raw = raw.split("\n\n", 1)
                assert event.startswith("data: ") and "\n" not in event, event
                payloads.append(event.removeprefix("data: "))
            if disconnect and len(payloads) >= 4:
                return None
        assert raw == ""
    return path, payloads


def test_many_streaming_clients_some_disconnecting(server: ServerProcess) -> None:
    async def main() -> list[tuple[str, list[str]] | None]:
        limits = httpx.Limits(max_connections=NUM_CLIENTS + 5)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(run_client(client, i) for i in range(NUM_CLIENTS)))

    results = asyncio.run(main())
    completed = [r for r in results if r is not None]
    assert len(completed) == NUM_CLIENTS - NUM_DISCONNECTING
    for path, payloads in completed:
        check_stream(path, payloads)

    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    m = server.wait_drained()
    assert m["kvos_num_requests_running"] == 0
    assert m["kvos_num_requests_waiting"] == 0
    assert m["kvos_kv_cache_used_blocks"] == 0
    # Latency is recorded for requests that completed, not for the abandoned ones.
    assert m["kvos_e2e_request_latency_seconds_count"] == NUM_CLIENTS - NUM_DISCONNECTING
    assert m["kvos_generation_tokens_total"] >= (NUM_CLIENTS - NUM_DISCONNECTING) * MAX_TOKENS


def test_unstreamed_client_that_gives_up_is_aborted(server: ServerProcess) -> None:
    body = {"model": MODEL_NAME, "prompt": "Count to a thousand:", "max_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/completions", json=body, timeout=httpx.Timeout(120, read=3))
    # 4000 tokens would take minutes; drained within wait_drained's bound means it was aborted.
    m = server.wait_drained()
    assert (m["kvos_num_requests_running"], m["kvos_kv_cache_used_blocks"]) == (0, 0)


def test_engine_still_serves(server: ServerProcess) -> None:
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2, "ignore_eos": True}
    response = httpx.post(f"{server.base_url}/completions", json=body, timeout=120)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 2
    assert "Traceback" not in server.log()
