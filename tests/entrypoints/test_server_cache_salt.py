"""`cache_salt` (as vLLM accepts it): only requests with the same salt share prefix-cache blocks."""

from __future__ import annotations

from pathlib import Path

from tests.entrypoints.in_process import serve_in_process, wait_until_idle

PROMPT = list(range(100, 164))  # 64 token ids: four full blocks


def test_prefix_blocks_are_shared_only_within_a_salt(tiny_model: Path) -> None:
    with serve_in_process(tiny_model) as (client, app):
        engine = app.state.serving.engine

        def send(salt: str | None) -> int:
            """The prefix-cache hits this request added."""
            before = engine.stats().prefix_cache_hits
            body = {"model": tiny_model.name, "prompt": PROMPT, "max_tokens": 1}
            if salt is not None:
                body["cache_salt"] = salt
            assert client.post("/v1/completions", json=body).status_code == 200
            wait_until_idle(app)
            return engine.stats().prefix_cache_hits - before

        assert send("tenant-a") == 0
        assert send("tenant-b") == 0  # another salt: nothing to find
        assert send(None) == 0  # no salt: not the salted blocks either
        assert send("tenant-a") == 48  # the same salt: every full block but the one holding the last token
        response = client.post("/v1/completions", json={"model": tiny_model.name, "prompt": "x", "cache_salt": ""})
        assert response.status_code == 400 and response.json()["error"]["param"] == "cache_salt"
