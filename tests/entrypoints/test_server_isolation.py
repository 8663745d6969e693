"""One request never hurts another: poison beside running streams, bursts, and a soak with hang-ups.

The server runs the real model with four running slots and at most four
requests queued beyond them. Neighbours stream greedily while each kind of bad
request arrives; their text must equal what the same requests produce alone.
The last test stops the server: what runs at SIGTERM finishes within the
grace or is cut, and every client still gets a well-formed answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_process import MODEL_NAME, ServerProcess, start_server

MAX_NUM_SEQS = 4
MAX_WAITING = 4
SHUTDOWN_TIMEOUT_S = 3.0
NEIGHBOUR_TOKENS = 24
NEIGHBOUR_PROMPTS = ["The capital of France is", "Three colours of the rainbow are"]
POISON_PROMPT = "My favourite season is"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(
        tmp_path_factory.mktemp("server") / "serve.log",
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
        "--max-waiting",
        str(MAX_WAITING),
        "--shutdown-timeout",
        str(SHUTDOWN_TIMEOUT_S),
    )
    proc.wait_ready()
    yield proc
    proc.stop()


def idle(metrics: dict[str, float]) -> bool:
    """Nothing runs or waits, and no KV block is held."""
    keys = ("kvos_num_requests_running", "kvos_num_requests_waiting", "kvos_kv_cache_used_blocks")
    return all(metrics[k] == 0 for k in keys)


def greedy(prompt: str, max_tokens: int = NEIGHBOUR_TOKENS, **fields: Any) -> dict[str, Any]:
    return {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    } | fields


@pytest.fixture(scope="module")
def alone(server: ServerProcess) -> dict[str, str]:
    """Each neighbour's (and the poison prompt's) greedy text, run on its own."""
    texts = {}
    for prompt in [*NEIGHBOUR_PROMPTS, POISON_PROMPT]:
        response = httpx.post(f"{server.base_url}/completions", json=greedy(prompt), timeout=120)
        assert response.status_code == 200, response.text
        texts[prompt] = response.json()["choices"][0]["text"]
    return texts


async def stream_chunks(
    client: httpx.AsyncClient, body: dict[str, Any], started: asyncio.Event | None = None
) -> list[dict[str, Any]]:
    """A streamed completion's chunks; checks that the stream ends with [DONE]."""
    payloads = []
    async with client.stream("POST", "/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line:
                payloads.append(line.removeprefix("data: "))
                if started is not None:
                    started.set()
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


async def stream_text(client: httpx.AsyncClient, body: dict[str, Any], started: asyncio.Event | None = None) -> str:
    """A streamed completion's whole text; checks that it ran to max_tokens."""
    chunks = await stream_chunks(client, body, started)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    return "".join(c["choices"][0]["text"] for c in chunks)


async def hang_up(client: httpx.AsyncClient, body: dict[str, Any], after_chunks: int) -> None:
    """Stream, and close the connection after a few chunks."""
    async with client.stream("POST", "/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        seen = 0
        async for line in response.aiter_lines():
            seen += bool(line)
            if seen >= after_chunks:
                return


async def send_raw(client: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
    """JSON written with \\u escapes, so lone surrogates reach the server as JSON allows them."""
    content = json.dumps(body, ensure_ascii=True).encode()
    return await client.post("/completions", content=content, headers={"content-type": "application/json"})


async def beside_neighbours(server: ServerProcess, poison: str) -> tuple[list[str], Any]:
    """Start the neighbours' streams, send the poison once they produce tokens; return their texts and its result."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
        started = [asyncio.Event() for _ in NEIGHBOUR_PROMPTS]
        neighbours = [
            asyncio.create_task(stream_text(client, greedy(p), e))
            for p, e in zip(NEIGHBOUR_PROMPTS, started, strict=True)
        ]
        await asyncio.gather(*(e.wait() for e in started))
        if poison == "tiny temperature":
            result: Any = await client.post("/completions", json=greedy(POISON_PROMPT, temperature=1e-40))
        elif poison == "surrogate prompt":
            result = await send_raw(client, greedy(f"{POISON_PROMPT} \ud800"))
        elif poison == "response_format":
            schema = {"not": {"type": "string"}}  # a keyword the grammar engine does not implement
            body = greedy(
                POISON_PROMPT, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
            )
            result = await client.post("/completions", json=body)
        else:
            result = await hang_up(client, greedy(POISON_PROMPT, max_tokens=2000), after_chunks=3)
        return list(await asyncio.gather(*neighbours)), result


@pytest.mark.parametrize("poison", ["tiny temperature", "surrogate prompt", "response_format", "hang-up"])
def test_neighbours_are_unaffected(server: ServerProcess, alone: dict[str, str], poison: str) -> None:
    texts, result = asyncio.run(beside_neighbours(server, poison))
    assert texts == [alone[p] for p in NEIGHBOUR_PROMPTS]
    if poison == "tiny temperature":
        assert result.status_code == 200, result.text
        assert result.json()["choices"][0]["text"] == alone[POISON_PROMPT]  # below 1e-5 is greedy
    elif poison in ("surrogate prompt", "response_format"):
        assert result.status_code == 400
        assert result.json()["error"]["param"] == ("prompt" if poison == "surrogate prompt" else "response_format")
    assert idle(server.wait_drained())


def test_burst_within_free_slots_and_queue_is_never_refused(server: ServerProcess) -> None:
    """8 at once = 4 free running slots + 4 queued (max-waiting): all are served, none gets 429."""
    server.wait_drained()
    burst = MAX_NUM_SEQS + MAX_WAITING

    async def main() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=burst)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as client:
            bodies = [greedy(f"Request {i} of the burst says", max_tokens=4) for i in range(burst)]
            return list(await asyncio.gather(*(client.post("/completions", json=b) for b in bodies)))

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * burst, [r.text for r in responses if r.status_code != 200]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


SOAK_CLIENTS = MAX_NUM_SEQS + MAX_WAITING
RSS_GROWTH_LIMIT = 64 * 2**20


@pytest.mark.soak
def test_soak_with_random_hang_ups(server: ServerProcess) -> None:
    """Rounds of concurrent streams, about half hung up at random; memory and KV return to where they were.

    KVOS_SOAK_ROUNDS (default 3) sets the rounds; the first warms the server up and sets the RSS baseline.
    """
    rounds = int(os.environ.get("KVOS_SOAK_ROUNDS", "3"))
    rng = random.Random(1234)

    async def one_round(round_index: int) -> None:
        limits = httpx.Limits(max_connections=SOAK_CLIENTS)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as client:
            jobs = []
            for i in range(SOAK_CLIENTS):
                body = {**greedy(f"Soak round {round_index}, client {i}:", max_tokens=rng.randint(4, 24))}
                body["temperature"] = rng.choice([0, 0.7, 1.0])
                if rng.random() < 0.5:
                    jobs.append(hang_up(client, {**body, "max_tokens": 500}, after_chunks=rng.randint(1, 6)))
                else:
                    jobs.append(stream_text(client, body))
            await asyncio.gather(*jobs)

    baseline = None
    for round_index in range(rounds):
        asyncio.run(one_round(round_index))
        m = server.wait_drained()
        assert idle(m), f"round {round_index}: {m}"
        rss = rss_bytes(server.process.pid)
        if baseline is None:
            baseline = rss
        assert rss <= baseline + RSS_GROWTH_LIMIT, f"round {round_index}: RSS {rss >> 20} MiB, first {baseline >> 20}"
    assert "Traceback" not in server.log()


def test_sigterm_lets_short_requests_finish_and_cuts_long_ones(server: ServerProcess) -> None:
    """Runs last: it stops the module's server.

    At SIGTERM a short stream, a long stream and a long unstreamed request
    run. The short one ends normally within the grace; the long ones are cut
    when it expires: the stream with a last chunk (finish_reason "abort") and
    [DONE], the other with a normal body with that finish reason. Exit status 0.
    """
    server.wait_drained()

    async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]], httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            short_started, long_started = asyncio.Event(), asyncio.Event()
            short = asyncio.create_task(stream_chunks(client, greedy("Short:", max_tokens=6), short_started))
            long = asyncio.create_task(stream_chunks(client, greedy("Long:", max_tokens=4000), long_started))
            whole = asyncio.create_task(client.post("/completions", json=greedy("Whole:", max_tokens=4000)))
            await asyncio.gather(short_started.wait(), long_started.wait())
            while (await asyncio.to_thread(server.metrics))["kvos_num_requests_running"] < 3:
                await asyncio.sleep(0.05)
            server.process.terminate()
            return await short, await long, await whole

    short, long, whole = asyncio.run(main())
    assert short[-1]["choices"][0]["finish_reason"] == "length"
    assert long[-1]["choices"][0]["finish_reason"] == "abort"
    assert all(c["choices"][0]["finish_reason"] is None for c in long[:-1])
    assert whole.status_code == 200, whole.text
    choice = whole.json()["choices"][0]
    assert choice["finish_reason"] == "abort" and choice["text"]
    assert whole.json()["usage"]["completion_tokens"] > 0
    assert server.process.wait(60) == 0
    assert "Traceback" not in server.log()
