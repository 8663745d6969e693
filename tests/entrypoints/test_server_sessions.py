"""Sessions over HTTP: `session_id` reuses a conversation's KV (usage reports the cached tokens),
GET /v1/sessions lists the caller's own, DELETE frees them now, another API key sees 404, bad ids 400."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from in_process import serve_in_process, wait_until_idle
from starlette.testclient import TestClient

from kvos.entrypoints.server.plumbing import key_owner
from kvos.entrypoints.server_config import ServerConfig

KEY_A = "key-of-alice"
KEY_B = "key-of-bob"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
PROMPT = "The session keeps this prompt's KV between calls, so the next call computes only new tokens. " * 2


@pytest.fixture(scope="module")
def keyed(tiny_model: Path) -> Iterator[TestClient]:
    with serve_in_process(tiny_model, ServerConfig(api_keys=(KEY_A, KEY_B)), policy="fair") as (client, _):
        yield client


def model_of(client: TestClient) -> str:
    return client.get("/v1/models", headers=A).json()["data"][0]["id"]


def complete(client: TestClient, headers: dict[str, str], prompt: str, **extra: Any) -> Any:
    body = {"model": model_of(client), "prompt": prompt, "max_tokens": 4, "temperature": 0, **extra}
    return client.post("/v1/completions", json=body, headers=headers)


def test_a_session_call_reuses_the_previous_turn(keyed: TestClient) -> None:
    first = complete(keyed, A, PROMPT, session_id="turns")
    assert first.status_code == 200, first.text
    usage = first.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    history = PROMPT + first.json()["choices"][0]["text"]
    second = complete(keyed, A, history + " And then?", session_id="turns")
    assert second.status_code == 200, second.text
    cached = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    # Every full block of the first prompt is found (block size 16).
    assert cached >= usage["prompt_tokens"] // 16 * 16 > 0
    (listed,) = keyed.get("/v1/sessions", headers=A).json()["data"]
    assert (listed["id"], listed["object"], listed["num_calls"]) == ("turns", "session", 2)
    assert listed["expires_at"] > listed["last_used_at"] >= listed["created"]
    assert keyed.delete("/v1/sessions/turns", headers=A).json() == {
        "id": "turns",
        "object": "session.deleted",
        "deleted": True,
    }
    assert wait_until_idle(keyed.app).num_used_blocks == 0  # type: ignore[arg-type]
    assert keyed.get("/v1/sessions", headers=A).json()["data"] == []


def test_another_key_can_neither_extend_list_nor_delete(keyed: TestClient) -> None:
    assert complete(keyed, A, PROMPT, session_id="alices").status_code == 200
    extend = complete(keyed, B, PROMPT + " more", session_id="alices")
    assert extend.status_code == 404
    error = extend.json()["error"]
    assert (error["param"], error["code"]) == ("session_id", "session_not_found")
    assert keyed.get("/v1/sessions", headers=B).json()["data"] == []
    assert keyed.delete("/v1/sessions/alices", headers=B).status_code == 404
    assert keyed.delete("/v1/sessions/never-made", headers=A).status_code == 404
    assert [s["id"] for s in keyed.get("/v1/sessions", headers=A).json()["data"]] == ["alices"]
    assert keyed.delete("/v1/sessions/alices", headers=A).status_code == 200
    assert keyed.get("/v1/sessions").status_code == 401


def test_a_sessions_calls_count_against_its_owner_under_fair(keyed: TestClient) -> None:
    assert complete(keyed, B, PROMPT, session_id="bobs", user="someone-else").status_code == 200
    tenants = dict(keyed.app.state.serving.engine.stats().tenant_service)  # type: ignore[attr-defined]
    assert key_owner(KEY_B) in tenants and "someone-else" not in tenants
    assert keyed.delete("/v1/sessions/bobs", headers=B).status_code == 200


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"session_id": "a b"}, "session_id"),
        ({"session_id": "x" * 129}, "session_id"),
        ({"session_id": ""}, "session_id"),
        ({"session_id": 7}, "session_id"),
        ({"session_id": "ok", "n": 2}, "n"),
        ({"session_id": "ok", "prompt": ["one", "two"]}, "session_id"),
    ],
)
def test_bad_session_requests_are_400(keyed: TestClient, extra: dict[str, Any], param: str) -> None:
    body = {"prompt": PROMPT, **extra}
    response = complete(keyed, A, **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert keyed.get("/v1/sessions", headers=A).json()["data"] == []


def test_deleting_a_bad_id_is_400(keyed: TestClient) -> None:
    response = keyed.delete("/v1/sessions/" + "x" * 200, headers=A)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "session_id"


def test_chat_sessions_without_api_keys(tiny_model: Path) -> None:
    with serve_in_process(tiny_model) as (client, app):
        model = client.get("/v1/models").json()["data"][0]["id"]
        messages = [{"role": "user", "content": PROMPT}]
        body = {"model": model, "messages": messages, "max_tokens": 3, "temperature": 0, "session_id": "solo"}
        first = client.post("/v1/chat/completions", json=body)
        assert first.status_code == 200, first.text
        reply = first.json()["choices"][0]["message"]["content"]
        messages = [*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": "Go on."}]
        second = client.post("/v1/chat/completions", json={**body, "messages": messages})
        assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
        assert [s["id"] for s in client.get("/v1/sessions").json()["data"]] == ["solo"]
        assert client.delete("/v1/sessions/solo").status_code == 200
        assert wait_until_idle(app).num_used_blocks == 0
