"""Multi-turn chat sessions against `kvos serve`, with and without KV tiers (issue 10's benchmark).

Three scenarios, each starting and stopping its own `kvos serve` processes:

  tiers       ShareGPT conversations with several turns replayed as chat sessions: each turn sends the
              whole history (kvos's own earlier replies as the assistant turns, as a chat client does),
              max_tokens = the dataset answer's length with ignore_eos, an exponential think time
              between turns, all sessions at once, and a primary pool sized to hold at most a quarter
              of the sessions' KV. Configurations: tiers off (prefix cache in the pool only), host,
              host + disk. Reported: TTFT of first and of later turns (p50/p90/p99), output tokens/s,
              prompt tokens found per tier.
  preemption  the same sessions, no think time, a primary pool of a tenth of their KV and longer
              outputs, so requests are preempted: --preemption-mode swap against recompute, both with
              the host tier, and recompute with no tier (output tokens/s, p99 time between tokens,
              preemptions by mode).
  restart     long prompts (about --restart-prompt-tokens each, ShareGPT text) sent once, the server
              restarted, the same prompts sent again: TTFT before and after, with and without the disk
              tier (the host tier alone does not survive the restart).

Usage:
  python -m benchmarks.multi_turn --scenario tiers --sessions 12 --turns 3 --json out.json
  python -m benchmarks.multi_turn --scenario all --sessions 2 --turns 2 --max-output-tokens 4   (smoke)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import profile_serving
from benchmarks.peers import load_tokenizer, resolve_gguf
from benchmarks.serve import percentiles_ms, sse_chunks
from benchmarks.sharegpt import Conversation, load_sharegpt
from kvos.config import ModelConfig
from kvos.heap import frozen_heap

REPO_ROOT = Path(__file__).resolve().parents[1]
TIERS = ("primary", "host", "disk")
CHAT_OVERHEAD_TOKENS = 8
"""Template tokens per message (role markers, newlines), for sizing the pool."""


@dataclass(frozen=True)
class SessionPlan:
    """One conversation to replay: the user's turns and how long each answer is."""

    user_turns: list[str]
    output_tokens: list[int]
    final_tokens: int
    """Prompt + answers of all turns: the KV the session holds at its end."""


@dataclass
class TurnResult:
    session: int
    turn: int
    prompt_chars: int
    ok: bool = False
    prompt_tokens: int = 0
    """As the server counted them (chat template included), from the stream's usage."""
    error: str = ""
    ttft_s: float = 0.0
    latency_s: float = 0.0
    output_tokens: int = 0
    gaps_s: list[float] = field(default_factory=list)


def plan_sessions(
    tokenizer: Any, conversations: list[Conversation], num: int, turns: int, max_user: int, max_output: int, seed: int
) -> list[SessionPlan]:
    """Conversations with at least `turns` human/gpt exchanges whose turns fit the limits, in a seeded order."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    plans: list[SessionPlan] = []
    for index in order:
        pairs = []
        t = conversations[index].turns
        for i in range(len(t) - 1):
            if t[i].role == "human" and t[i + 1].role == "gpt":
                pairs.append((t[i].text, t[i + 1].text))
        if len(pairs) < turns:
            continue
        users, outputs, total = [], [], 0
        for user, answer in pairs[:turns]:
            n_user, n_answer = len(tokenizer.encode(user)), len(tokenizer.encode(answer))
            if not 4 <= n_user <= max_user or n_answer < 4:
                break
            users.append(user)
            outputs.append(min(n_answer, max_output))
            total += n_user + outputs[-1] + 2 * CHAT_OVERHEAD_TOKENS
        if len(users) == turns:
            plans.append(SessionPlan(users, outputs, total))
            if len(plans) == num:
                return plans
    raise ValueError(f"only {len(plans)} conversations with {turns} turns fit the limits; relax them")


# -- the server -------------------------------------------------------------------------------


class Server:
    """`kvos serve` in a subprocess on a free port (this checkout's kvos)."""

    def __init__(self, flags: list[str], log_path: Path, trace: Path | None = None) -> None:
        """With `trace`, the engine loop is instrumented (`benchmarks.profile_serving --child`) and writes
        its records there when the server stops."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve = ["serve", "--port", str(port), *flags]
        if trace is None:
            command = [sys.executable, "-m", "kvos.entrypoints.cli", *serve]
        else:
            command = profile_serving.child_command(trace, serve)
        paths = (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"kvos serve exited:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("kvos serve did not become healthy in 300 s")
            time.sleep(0.25)
        self.model = httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"][0]["id"]
        # One throw-away request, so the first measured one does not pay for first-use work (kernels, pages).
        warm_up = {"model": self.model, "messages": [{"role": "user", "content": "Warm-up: say hi."}], "max_tokens": 2}
        httpx.post(f"{self.url}/v1/chat/completions", json=warm_up, timeout=300).raise_for_status()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def metric(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


# -- the client -------------------------------------------------------------------------------


async def chat_turn(
    client: httpx.AsyncClient,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    result: TurnResult,
    user: str | None = None,
) -> str:
    """Stream one chat completion; fill `result`; return the reply's text. `user`: OpenAI's end-user id."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if user is not None:
        body["user"] = user
    text = ""
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return text
            async for chunk in sse_chunks(response):
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return text
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                delta = "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices", []))
                if not delta:
                    continue
                now = time.perf_counter()
                if not text:
                    result.ttft_s = now - start
                else:
                    result.gaps_s.append(now - last)
                last = now
                text += delta
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return text
    result.latency_s = time.perf_counter() - start
    result.ok = bool(text)
    return text


def think_delays(plans: list[SessionPlan], think_s: float, seed: int) -> list[list[float]]:
    """Per session and turn, the pause before the turn is sent: exponential with mean `think_s` (0: none).

    The first turn's pause staggers the sessions' starts; a later turn's follows the reply before it.
    """
    rng = random.Random(seed)
    return [[rng.expovariate(1 / think_s) if think_s > 0 else 0.0 for _ in p.user_turns] for p in plans]


def session_user(index: int) -> str:
    """The OpenAI `user` that session `index` sends (kvos's tenant: scheduling keys and metrics, not the cache)."""
    return f"session-{index}"


async def run_sessions(server: Server, plans: list[SessionPlan], think_s: float, seed: int) -> list[TurnResult]:
    """Every session at once (staggered by up to one think time), turns in order within a session."""
    results: list[TurnResult] = []

    async def session(index: int, plan: SessionPlan, client: httpx.AsyncClient, delays: list[float]) -> None:
        messages: list[dict[str, str]] = []
        for turn, (user, max_tokens) in enumerate(zip(plan.user_turns, plan.output_tokens)):
            await asyncio.sleep(delays[turn])
            messages.append({"role": "user", "content": user})
            result = TurnResult(index, turn, sum(len(m["content"]) for m in messages))
            # A chat UI names its end user: the session router keeps a conversation on one instance by it.
            reply = await chat_turn(client, server.model, messages, max_tokens, result, user=session_user(index))
            results.append(result)
            if not result.ok:
                return
            messages.append({"role": "assistant", "content": reply})

    delays = think_delays(plans, think_s, seed)
    limits = httpx.Limits(max_connections=len(plans) + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(3600.0), limits=limits) as client:
        with frozen_heap():
            await asyncio.gather(*(session(i, p, client, delays[i]) for i, p in enumerate(plans)))
    return results


def summarize(results: list[TurnResult], duration_s: float, before: dict, after: dict) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    first = [r.ttft_s for r in ok if r.turn == 0]
    later = [r.ttft_s for r in ok if r.turn > 0]
    gaps = [g for r in ok for g in r.gaps_s]
    queried = metric(after, "kvos_prefix_cache_queries_total") - metric(before, "kvos_prefix_cache_queries_total")
    hits = {
        tier: metric(after, "kvos_kv_tier_hit_tokens_total", tier=tier)
        - metric(before, "kvos_kv_tier_hit_tokens_total", tier=tier)
        for tier in TIERS
    }
    return {
        "turns": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "duration_s": round(duration_s, 2),
        "output_tokens": sum(r.output_tokens for r in ok),
        "output_tok_s": round(sum(r.output_tokens for r in ok) / duration_s, 2) if duration_s else 0.0,
        "ttft_first_turn_ms": percentiles_ms(first),
        "ttft_later_turns_ms": percentiles_ms(later),
        "tbt_ms": percentiles_ms(gaps),
        "prompt_tokens_queried": queried,
        "hit_rate_by_tier": {t: round(h / queried, 4) if queried else 0.0 for t, h in hits.items()},
        "preemptions_by_mode": {
            mode: metric(after, "kvos_preemptions_by_mode_total", mode=mode)
            - metric(before, "kvos_preemptions_by_mode_total", mode=mode)
            for mode in ("swap", "recompute")
        },
        "moved_bytes": {
            kind: metric(after, "kvos_kv_tier_moved_bytes_total", kind=kind)
            - metric(before, "kvos_kv_tier_moved_bytes_total", kind=kind)
            for kind in ("swap_out", "swap_in", "demote", "promote", "disk_write", "disk_read")
        },
        "copy_seconds": {
            direction: metric(after, "kvos_kv_copy_seconds_sum", direction=direction)
            - metric(before, "kvos_kv_copy_seconds_sum", direction=direction)
            for direction in ("to_host", "from_host", "to_disk", "from_disk")
        },
    }


def serve_sessions(
    name: str, flags: list[str], plans: list[SessionPlan], args: argparse.Namespace, trace: Path | None = None
) -> tuple[dict[str, Any], list[TurnResult]]:
    """The sessions through a fresh `kvos serve FLAGS` (its engine loop instrumented into `trace` if given):
    the run's summary and every turn's result."""
    print(f"-- {name}: kvos serve {' '.join(flags)}", flush=True)
    server = Server(flags, Path(args.log_dir) / f"{name}.log", trace)
    try:
        before = server.metrics()
        start = time.perf_counter()
        results = asyncio.run(run_sessions(server, plans, args.think_time, args.seed))
        duration = time.perf_counter() - start
        summary = summarize(results, duration, before, server.metrics())
    finally:
        server.stop()
    print(json.dumps(summary), flush=True)
    return {"config": name, "flags": flags, **summary}, results


def run_config(name: str, flags: list[str], plans: list[SessionPlan], args: argparse.Namespace) -> dict[str, Any]:
    return serve_sessions(name, flags, plans, args)[0]


def tier_sizes(plans: list[SessionPlan], bytes_per_token: int) -> tuple[int, int]:
    """The tiers scenario's primary pool (a quarter of the sessions' final KV, at least the largest session's)
    and host tier (twice all of it), in bytes."""
    total_tokens = sum(p.final_tokens for p in plans)
    pool = max(total_tokens // 4, max(p.final_tokens for p in plans) + 64) * bytes_per_token
    return pool, total_tokens * bytes_per_token * 2


# -- scenarios --------------------------------------------------------------------------------


def scenario_tiers(plans: list[SessionPlan], args: argparse.Namespace, bytes_per_token: int) -> list[dict]:
    total_tokens = sum(p.final_tokens for p in plans)
    pool, host = tier_sizes(plans, bytes_per_token)
    base = ["--kv-cache-memory", str(pool), *args.serve_flags]
    disk_dir = tempfile.mkdtemp(prefix="kvos-mt-disk-", dir=args.log_dir)
    runs = [
        run_config("tiers-off", base, plans, args),
        run_config("host", [*base, "--kv-offload-size", str(host)], plans, args),
        run_config(
            "host+disk",
            [*base, "--kv-offload-size", str(host // 8), "--kv-disk-path", disk_dir, "--kv-disk-size", str(host)],
            plans,
            args,
        ),
    ]
    shutil.rmtree(disk_dir, ignore_errors=True)
    for run in runs:
        run["sessions_kv_tokens"] = total_tokens
        run["primary_pool_tokens"] = pool // bytes_per_token
    return runs


def scenario_preemption(plans: list[SessionPlan], args: argparse.Namespace, bytes_per_token: int) -> list[dict]:
    longer = [
        SessionPlan(p.user_turns, [args.preemption_output_tokens] * len(p.user_turns), p.final_tokens) for p in plans
    ]
    total = sum(p.final_tokens for p in longer) + args.preemption_output_tokens * len(longer)
    largest = max(p.final_tokens for p in longer) + args.preemption_output_tokens
    pool = max(total // 10, largest + 64) * bytes_per_token
    base = ["--kv-cache-memory", str(pool), "--kv-offload-size", str(4 * total * bytes_per_token), *args.serve_flags]
    quick = argparse.Namespace(**{**vars(args), "think_time": 0.0})
    runs = [
        run_config(f"preempt-{mode}", [*base, "--preemption-mode", mode], longer, quick)
        for mode in ("swap", "recompute")
    ]
    # Recompute with the host tier still finds a victim's prefix there (written back on eviction);
    # without any tier it recomputes every token, as kvos did before the tiers.
    runs.append(
        run_config("preempt-recompute-no-tier", ["--kv-cache-memory", str(pool), *args.serve_flags], longer, quick)
    )
    return runs


def long_prompts(tokenizer: Any, conversations: list[Conversation], num: int, target: int, seed: int) -> list[str]:
    """`num` distinct prompts of about `target` tokens, each ShareGPT human turns joined."""
    texts = [t.text for c in conversations for t in c.turns if t.role == "human" and len(t.text) > 200]
    random.Random(seed).shuffle(texts)
    prompts: list[str] = []
    parts: list[str] = []
    length = 0
    for text in texts:
        n = len(tokenizer.encode(text))
        if length + n > target:
            if length >= target // 2:
                prompts.append("\n\n".join(parts))
                if len(prompts) == num:
                    return prompts
            parts, length = [], 0
            continue
        parts.append(text)
        length += n
    raise ValueError("not enough ShareGPT text for the restart prompts")


async def ttfts(server: Server, prompts: list[str]) -> list[float]:
    """Each prompt alone (one at a time), 1 output token: the time to the first token is the prompt's cost."""
    times = []
    async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(3600.0)) as client:
        for prompt in prompts:
            result = TurnResult(0, 0, len(prompt))
            await chat_turn(client, server.model, [{"role": "user", "content": prompt}], 1, result)
            if not result.ok:
                raise RuntimeError(f"restart prompt failed: {result.error}")
            times.append(result.ttft_s)
    return times


def scenario_restart(prompts: list[str], args: argparse.Namespace) -> list[dict]:
    runs = []
    for with_disk in (False, True):
        disk_dir = tempfile.mkdtemp(prefix="kvos-restart-disk-", dir=args.log_dir)
        flags = ["--kv-offload-size", "1GiB", *args.serve_flags]
        if with_disk:
            flags += ["--kv-disk-path", disk_dir, "--kv-disk-size", "4GiB"]
        name = "restart-" + ("disk" if with_disk else "no-disk")
        print(f"-- {name}: kvos serve {' '.join(flags)}", flush=True)
        server = Server(flags, Path(args.log_dir) / f"{name}.log")
        try:
            cold = asyncio.run(ttfts(server, prompts))
        finally:
            server.stop()
        server = Server(flags, Path(args.log_dir) / f"{name}.log")
        try:
            before = server.metrics()
            warm = asyncio.run(ttfts(server, prompts))
            disk_hits = metric(server.metrics(), "kvos_kv_tier_hit_tokens_total", tier="disk") - metric(
                before, "kvos_kv_tier_hit_tokens_total", tier="disk"
            )
        finally:
            server.stop()
        shutil.rmtree(disk_dir, ignore_errors=True)
        run = {
            "config": name,
            "flags": flags,
            "prompts": len(prompts),
            "ttft_before_restart_ms": percentiles_ms(cold),
            "ttft_after_restart_ms": percentiles_ms(warm),
            "speedup_p50": round(sorted(cold)[len(cold) // 2] / max(sorted(warm)[len(warm) // 2], 1e-9), 2),
            "disk_hit_tokens": disk_hits,
        }
        print(json.dumps(run), flush=True)
        runs.append(run)
    return runs


def kv_bytes_per_token(serve_flags: list[str]) -> int:
    """SmolLM2-135M's KV per token (K and V, 30 layers, 3 KV heads of 64) in the dtype these flags serve in."""
    flags = serve_flags
    named: Any = flags[flags.index("--dtype") + 1] if "--dtype" in flags else "auto"  # ModelConfig checks it
    dtype = ModelConfig(dtype=named).resolved_dtype
    return 2 * 30 * 3 * 64 * (4 if dtype == "float32" else 2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=["tiers", "preemption", "restart", "all"], default="all")
    p.add_argument("--sessions", type=int, default=12)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-user-tokens", type=int, default=300, help="skip conversations with longer user turns")
    p.add_argument("--max-output-tokens", type=int, default=48, help="cap on each answer's dataset length")
    p.add_argument("--think-time", type=float, default=2.0, help="mean seconds between a reply and the next turn")
    p.add_argument("--preemption-output-tokens", type=int, default=96)
    p.add_argument("--restart-prompts", type=int, default=3)
    p.add_argument("--restart-prompt-tokens", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-flags", nargs=argparse.REMAINDER, default=[], help="passed to every kvos serve (last)")
    p.add_argument("--log-dir", default=None, help="server logs (default: a temporary directory)")
    p.add_argument("--json", default=None, help="write every run's summary here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="kvos-multi-turn-")
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(resolve_gguf(None))
    conversations = load_sharegpt()
    bytes_per_token = kv_bytes_per_token(args.serve_flags)
    runs: list[dict] = []
    if args.scenario in ("tiers", "preemption", "all"):
        plans = plan_sessions(
            tokenizer, conversations, args.sessions, args.turns, args.max_user_tokens, args.max_output_tokens, args.seed
        )
        if args.scenario in ("tiers", "all"):
            runs += scenario_tiers(plans, args, bytes_per_token)
        if args.scenario in ("preemption", "all"):
            runs += scenario_preemption(plans, args, bytes_per_token)
    if args.scenario in ("restart", "all"):
        prompts = long_prompts(tokenizer, conversations, args.restart_prompts, args.restart_prompt_tokens, args.seed)
        runs += scenario_restart(prompts, args)
    print(f"server logs in {args.log_dir}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0 if all(not r.get("failed") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
