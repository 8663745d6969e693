"""Agents on kvos serve: tool-calling loops with and without sessions, and what constrained decoding costs.

Part 1, sessions. Each task is an agent loop of `--steps` tool-calling steps
over the chat API: the model is asked (in the system prompt) to call a
`search` tool, its reply is constrained to the call's JSON schema
(`response_format`), and the tool's result (a ShareGPT answer cut to
`--tool-tokens` tokens, a few hundred) goes back as a `tool` message, so
every step's prompt is the previous one plus a call and a long result.
`--tasks` tasks run `--concurrency` at a time. Steps are streamed, so the
time to first token is measured per step. Three runs:

    sessions        `session_id` per task: its KV is held between steps
    prefix-cache    no session: the prefix cache alone, whose blocks other tasks may evict
    recompute       a server with --no-prefix-caching: every step computes its whole prompt

Reported: TTFT per step index (mean, p50, p90) and tasks per minute.
Target: from step 2 on, TTFT with sessions at least 3x lower than recompute.
With a KV cache large enough for every task's history, the prefix cache alone
does as well as sessions; sessions pay off when other traffic would evict a
waiting task's history (shrink the cache with --kvos-args "--kv-cache-memory 64MiB").

Part 2, constrained decoding. The same completions (ShareGPT prompts,
`--tpot-tokens` tokens each with ignore_eos, greedy) with and without a JSON
schema (`response_format`: an object with one free string, so the output does
not end early), at batch 1 (`--tpot-requests` requests one after another) and batch 32
(32 at once). Reported: TPOT mean and p50 per case, and the overhead of the
schema. Target: at most 10% at both batch sizes.

Not a test: run it on an otherwise idle machine. The defaults take about
6-8 minutes on 2 cores:

    python -m benchmarks.agents [--tasks 16] [--concurrency 8] [--steps 4] [--out results/agents]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import serve
from benchmarks.peers import load_tokenizer, resolve_gguf
from benchmarks.serve_sweep import kvos_serve_command, wait_ready
from benchmarks.sharegpt import BenchRequest, load_sharegpt, sample_requests
from kvos.heap import frozen_heap

SYSTEM = (
    "You are a research agent. You answer only by calling the search tool, one call per reply, "
    'written as JSON: [{"name": "search", "arguments": {"query": "<what to look up next>"}}].'
)
CALL_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "name": {"const": "search"},
            "arguments": {
                "type": "object",
                "properties": {"query": {"type": "string", "maxLength": 60}},
                "required": ["query"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    },
    "minItems": 1,
    "maxItems": 1,
}
"""kvos's own call format (`kvos.structured.tools`): the server writes the call back into the next prompt
exactly as the model wrote it, so a session's next step finds the call's tokens too."""
STORY_SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string"}},
    "required": ["story"],
    "additionalProperties": False,
}


def response_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


# -- part 1: agent loops ---------------------------------------------------------------


def agent_material(tokenizer: Any, tasks: int, steps: int, tool_tokens: int, seed: int) -> list[dict[str, Any]]:
    """Per task: the user's question and one tool result per step (ShareGPT text, cut to tool_tokens)."""
    conversations = load_sharegpt()
    exchanges = [e for c in conversations if (e := c.first_exchange()) is not None]
    long_answers = [a for _, a in exchanges if len(a) > 6 * tool_tokens]
    material = []
    for t in range(tasks):
        question = exchanges[(seed + 7919 * t) % len(exchanges)][0][:400]
        results = []
        for s in range(steps):
            answer = long_answers[(seed + 104729 * t + 31 * s) % len(long_answers)]
            results.append(tokenizer.decode(tokenizer.encode(answer)[:tool_tokens]))
        material.append({"question": question, "results": results})
    return material


async def run_task(
    client: httpx.AsyncClient, model: str, task: dict[str, Any], index: int, args: argparse.Namespace, mode: str
) -> dict[str, Any]:
    """One agent loop; the TTFT of each step, and whether every step ended well."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": task["question"]},
    ]
    session = {"session_id": f"agent-{mode}-{index}"} if mode == "sessions" else {}
    # Each run has its own salt: a run must not find the blocks of the run before it.
    salt = {"cache_salt": f"{mode}-{args.seed}"}
    ttfts: list[float] = []
    cached: list[int] = []
    for step, result in enumerate(task["results"]):
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": args.call_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "response_format": response_format("search_call", CALL_SCHEMA),
            **session,
            **salt,
        }
        start = time.perf_counter()
        ttft = None
        text = ""
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"step {step}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
            async for chunk in serve.sse_chunks(response):
                if "error" in chunk:
                    raise RuntimeError(f"step {step}: {chunk['error']}")
                if chunk.get("usage"):
                    cached.append((chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0))
                for choice in chunk.get("choices", []):
                    delta = choice["delta"].get("content") or ""
                    if delta and ttft is None:
                        ttft = time.perf_counter() - start
                    text += delta
        ttfts.append(ttft if ttft is not None else time.perf_counter() - start)
        try:
            arguments = json.loads(text)[0]["arguments"]
        except (ValueError, KeyError, TypeError):  # cut by max_tokens: the call is a prefix
            arguments = {"query": "more"}
        call_id = f"call_{index}_{step}"
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": "search", "arguments": json.dumps(arguments)},
                    }
                ],
            }
        )
        messages.append({"role": "tool", "tool_call_id": call_id, "content": result})
    if session:
        await client.delete(f"/v1/sessions/{session['session_id']}")
    return {"ttft_s": ttfts, "cached_tokens": cached}


async def run_agents(url: str, mode: str, material: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    limit = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None)) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        warm_up = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        await client.post(
            "/v1/chat/completions", json={**warm_up, "response_format": response_format("c", CALL_SCHEMA)}
        )

        async def one(i: int, task: dict[str, Any]) -> dict[str, Any]:
            async with limit:
                return await run_task(client, model, task, i, args, mode)

        start = time.perf_counter()
        with frozen_heap():
            results = await asyncio.gather(*(one(i, task) for i, task in enumerate(material)))
        duration = time.perf_counter() - start
    per_step = [
        serve.percentiles_ms([r["ttft_s"][s] for r in results]) | {"cached_tokens_mean": _mean(results, s)}
        for s in range(len(material[0]["results"]))
    ]
    return {"mode": mode, "duration_s": duration, "tasks_per_min": 60 * len(material) / duration, "steps": per_step}


def _mean(results: list[dict[str, Any]], step: int) -> float:
    values = [r["cached_tokens"][step] for r in results if len(r["cached_tokens"]) > step]
    return sum(values) / len(values) if values else float("nan")


# -- part 2: TPOT with and without a schema ------------------------------------------------


async def run_tpot(url: str, requests: list[BenchRequest], batch: int, schema: bool) -> dict[str, Any]:
    """TPOT of `requests` sent `batch` at a time (a group starts when the one before has ended)."""
    extra = {"response_format": response_format("story", STORY_SCHEMA)} if schema else {}
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None)) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        await serve.stream_one(client, model, requests[0], True, len, extra)  # compiles the grammar once
        results = []
        for start in range(0, len(requests), batch):
            group = requests[start : start + batch]
            results += await asyncio.gather(*(serve.stream_one(client, model, r, True, len, extra) for r in group))
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"TPOT run failed: {failed[0]}")
    return serve.percentiles_ms([r.tpot_s for r in results])


# -- the server -----------------------------------------------------------------------------


class Server:
    """`kvos serve` in a subprocess, stopped with SIGTERM."""

    def __init__(self, gguf: Path, port: int, flags: list[str], log: Path) -> None:
        command = kvos_serve_command(gguf, port, flags)
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log, "w", encoding="utf-8")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Server:
        wait_ready(self.url, self.process, 300)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tool-tokens", type=int, default=300, help="tokens of each tool result")
    parser.add_argument("--call-tokens", type=int, default=48, help="max_tokens of each call")
    parser.add_argument("--tpot-tokens", type=int, default=48, help="tokens per request in the TPOT runs")
    parser.add_argument("--batches", default="1,32", help="batch sizes of the TPOT runs")
    parser.add_argument("--tpot-requests", type=int, default=6, help="requests per TPOT run, at least the batch")
    parser.add_argument("--kvos-args", default="--max-num-seqs 32", help="extra `kvos serve` flags")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: agents, tpot")
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/agents")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gguf = resolve_gguf(None)
    tokenizer = load_tokenizer(gguf)
    flags = ["--max-waiting", "100000", *shlex.split(args.kvos_args)]
    print(f"agents: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; kvos serve {' '.join(flags)}")
    report: dict[str, Any] = {"args": vars(args)}
    with Server(gguf, args.port, flags, out / "server.log") as server:
        if "agents" not in skip:
            material = agent_material(tokenizer, args.tasks, args.steps, args.tool_tokens, args.seed)
            report["agents"] = [
                asyncio.run(run_agents(server.url, m, material, args)) for m in ("sessions", "prefix-cache")
            ]
        if "tpot" not in skip:
            report["tpot"] = []
            for batch in (int(b) for b in args.batches.split(",")):
                requests = [
                    BenchRequest(r.prompt, r.prompt_token_ids, args.tpot_tokens)
                    for r in sample_requests(tokenizer, max(batch, args.tpot_requests), 256, 64, seed=args.seed + batch)
                ]
                cases = {
                    name: asyncio.run(run_tpot(server.url, requests, batch, name == "schema"))
                    for name in ("free", "schema")
                }
                report["tpot"].append({"batch": batch, **cases})
    if "agents" not in skip:
        with Server(gguf, args.port, [*flags, "--no-prefix-caching"], out / "server-recompute.log") as server:
            report["agents"].append(asyncio.run(run_agents(server.url, "recompute", material, args)))
    (out / "agents.json").write_text(json.dumps(report, indent=2))
    print_report(report)
    return 0


def print_report(report: dict[str, Any]) -> None:
    if "agents" in report:
        print(f"{'run':<13} {'tasks/min':>9}  TTFT per step, mean ms (cached prompt tokens)")
        for run in report["agents"]:
            steps = "  ".join(f"{s['mean']:7.0f} ({s['cached_tokens_mean']:5.0f})" for s in run["steps"])
            print(f"{run['mode']:<13} {run['tasks_per_min']:9.1f}  {steps}")
        by_mode = {r["mode"]: r for r in report["agents"]}
        later = range(1, len(by_mode["sessions"]["steps"]))
        for base in ("recompute", "prefix-cache"):
            ratios = [by_mode[base]["steps"][s]["mean"] / by_mode["sessions"]["steps"][s]["mean"] for s in later]
            if ratios:
                print(
                    f"steps 2+: {base} TTFT / sessions TTFT = {min(ratios):.1f}x to {max(ratios):.1f}x (target >= 3x)"
                )
    for row in report.get("tpot", []):
        free, schema = row["free"], row["schema"]
        overhead = 100 * (schema["mean"] / free["mean"] - 1)
        print(
            f"batch {row['batch']:>3}: TPOT free {free['mean']:.1f} ms (p50 {free['p50']:.1f}), "
            f"JSON schema {schema['mean']:.1f} ms (p50 {schema['p50']:.1f}): {overhead:+.1f}% (target <= +10%)"
        )


if __name__ == "__main__":
    sys.exit(main())
