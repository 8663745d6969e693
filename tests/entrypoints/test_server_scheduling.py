"""The scheduling policies through the HTTP API: `priority` and `user`, and what /metrics shows of them."""

from __future__ import annotations

from pathlib import Path

from tests.entrypoints.in_process import serve_in_process, wait_until_idle


def test_priority_under_fcfs_is_400_naming_the_field_and_the_flag(tiny_model: Path) -> None:
    with serve_in_process(tiny_model) as (client, _):
        body = {"model": tiny_model.name, "prompt": "Hi", "max_tokens": 2, "priority": 3}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "priority" and "--scheduling-policy priority" in error["message"]
        # A non-integer priority is refused by its field too.
        response = client.post("/v1/completions", json={**body, "priority": "high"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "priority"


def test_priority_is_served_under_the_priority_policy(tiny_model: Path) -> None:
    with serve_in_process(tiny_model, policy="priority") as (client, app):
        body = {"model": tiny_model.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        response = client.post("/v1/chat/completions", json={**body, "priority": -5})
        assert response.status_code == 200
        assert wait_until_idle(app).num_used_blocks == 0


def test_fair_policy_accounts_service_and_ttft_per_user(tiny_model: Path) -> None:
    with serve_in_process(tiny_model, policy="fair") as (client, app):
        for user in ("alice", "bob", "alice"):
            body = {"model": tiny_model.name, "prompt": "Hello there", "max_tokens": 3, "ignore_eos": True}
            assert client.post("/v1/completions", json={**body, "user": user}).status_code == 200
        wait_until_idle(app)
        metrics = client.get("/metrics").text
        service = {
            line.split('"')[1]: float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("kvos_tenant_service{")
        }
        # Each request's service is its prompt tokens x 1 + output tokens x 2. They ran one after
        # another, so each arrival found nobody backlogged and started from the highest counter
        # (VTC's lift): bob at alice's first, alice's second at bob's.
        per_request = len(app.state.serving.tokenizer.encode("Hello there")) + 2 * 3
        assert (service["alice"], service["bob"]) == (3 * per_request, 2 * per_request)
        assert 'kvos_tenant_time_to_first_token_seconds_count{tenant="alice"} 2.0' in metrics
        assert 'kvos_preemptions_by_reason_total{reason="displaced"} 0.0' in metrics
