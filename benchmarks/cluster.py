"""Engine instances on Ray: migration downtime, routers on a multi-turn workload, disaggregated goodput.

Three measurements, each on a fresh local Ray runtime with in-process
clients (no HTTP: the router is the `EngineClient` the server would use):

1. downtime: one request of each context length (256 .. 8192 tokens) runs on
   instance 0 and is live-migrated to instance 1 mid-decode. Reported: the
   time it was stopped (suspend to commit), the stages and blocks copied,
   beside the time to recompute that context (its prefill time, measured as
   its time to first token on an idle instance). Llumnix reports a
   near-constant downtime where recompute grows linearly.
2. routers: ShareGPT conversations of several turns, each turn's prompt the
   whole history so far (so later turns share a long prefix with earlier
   ones), `--conversations` at a time, under round-robin, least-load and
   prefix-aware routing. Reported: TTFT and TPOT p50/p90/p99 and the prefix
   cache hit rate. Each router runs with its own cache salt, so no run finds
   another's prefixes.
3. goodput: Poisson arrivals of ShareGPT requests at `--rate` for
   `--duration` seconds, colocated (two instances, least-load) against
   disaggregated (one prefill, one decode). Goodput: requests per second that
   met both the TTFT and the TPOT SLO.

Not a test: run it on an otherwise idle machine, from the repository root:

    python -m benchmarks.cluster [--only downtime,routers,goodput] [--out results/cluster.json]

Smoke run (seconds, tiny random model):

    python -m benchmarks.cluster --model CONFIG.json --load-format dummy --lengths 64,128 \\
        --conversations 2 --turns 2 --rate 2 --duration 3 --max-output 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.sharegpt import load_sharegpt
from kvos.cluster.client import ClusterEngine
from kvos.cluster.config import ClusterConfig
from kvos.config import EngineConfig
from kvos.sampling_params import SamplingParams


@dataclass
class Timing:
    ttft: float
    tpot: float | None
    num_tokens: int


async def timed(
    engine: ClusterEngine, req_id: str, prompt: list[int], max_tokens: int, salt: str | None = None
) -> Timing:
    """Stream one request; its time to first token and mean time per output token after it."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    stream = await engine.add_request(req_id, prompt, params, cache_salt=salt)
    first = None
    count = 0
    async for out in stream:
        count = len(out.outputs[0].token_ids)
        if first is None and count:
            first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None
    return Timing(first - start, (end - first) / (count - 1) if count > 1 else None, count)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": statistics.fmean(ordered)}


def start_cluster(config: EngineConfig, cluster: ClusterConfig) -> ClusterEngine:
    engine = ClusterEngine(config, cluster)
    engine.start()
    return engine


# -- 1. migration downtime against context length ---------------------------------------


async def run_and_migrate(engine: ClusterEngine, req_id: str, prompt: list[int], max_tokens: int) -> Any:
    """Stream a request; a few tokens in, migrate it to the other instance; the migration's result."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    stream = await engine.add_request(req_id, prompt, params, cache_salt=req_id)
    result = None
    async for out in stream:
        if result is None and len(out.outputs[0].token_ids) >= 4:
            result = await asyncio.to_thread(engine.cluster.migrate, req_id)
    return result


def bench_downtime(config: EngineConfig, lengths: list[int], vocab: int) -> list[dict[str, Any]]:
    engine = start_cluster(config, ClusterConfig(instances=2, router="round-robin"))
    rng = random.Random(0)
    rows = []
    try:
        for length in lengths:
            decode_tokens = 32
            prompt = [rng.randrange(100, vocab) for _ in range(length - decode_tokens)]
            recompute = asyncio.run(timed(engine, f"recompute-{length}", prompt, 1, salt=f"r{length}")).ttft
            result = asyncio.run(run_and_migrate(engine, f"migrate-{length}", prompt, decode_tokens))
            row = {
                "context_tokens": length,
                "recompute_s": recompute,
                "outcome": None if result is None else result.outcome,
                "downtime_s": None if result is None else result.downtime_s,
                "stages": None if result is None else result.stages,
                "blocks_copied": None if result is None else result.blocks_copied,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        engine.shutdown()
    return rows


# -- 2. routers on a multi-turn workload ---------------------------------------------


def multi_turn_prompts(
    engine: ClusterEngine, conversations: int, turns: int, max_prompt: int, max_output: int
) -> list[list[tuple[list[int], int]]]:
    """Per conversation, its turns as (prompt token ids, answer length): each prompt the history so far."""
    tokenizer = engine.tokenizer
    result: list[list[tuple[list[int], int]]] = []
    for conversation in load_sharegpt(limit=20000):
        pairs = [
            (a.text, b.text)
            for a, b in zip(conversation.turns, conversation.turns[1:])
            if a.role == "human" and b.role == "gpt"
        ]
        if len(pairs) < turns:
            continue
        messages: list[dict[str, str]] = []
        turns_here = []
        for question, answer in pairs[:turns]:
            messages.append({"role": "user", "content": question})
            prompt = tokenizer.encode(tokenizer.apply_chat_template(messages))
            answer_len = min(max_output, max(4, len(tokenizer.encode(answer))))
            turns_here.append((prompt, answer_len))
            messages.append({"role": "assistant", "content": answer})
        if len(turns_here[-1][0]) + max_output > max_prompt:
            continue
        result.append(turns_here)
        if len(result) == conversations:
            return result
    raise ValueError(f"fewer than {conversations} ShareGPT conversations of {turns} turns within {max_prompt} tokens")


async def run_conversations(
    engine: ClusterEngine, workload: list[list[tuple[list[int], int]]], router: str
) -> list[list[Timing]]:
    """Every conversation at once; within one, each turn waits for the answer to the last."""

    async def conversation(i: int, turns: list[tuple[list[int], int]]) -> list[Timing]:
        return [
            await timed(engine, f"{router}-{i}-{t}", prompt, answer, salt=router)
            for t, (prompt, answer) in enumerate(turns)
        ]

    return list(await asyncio.gather(*(conversation(i, c) for i, c in enumerate(workload))))


def bench_routers(
    config: EngineConfig, conversations: int, turns: int, max_prompt: int, max_output: int
) -> dict[str, Any]:
    from kvos.cluster.routers import make_router

    engine = start_cluster(config, ClusterConfig(instances=2))
    results = {}
    try:
        workload = multi_turn_prompts(engine, conversations, turns, max_prompt, max_output)
        for router in ("round-robin", "least-load", "prefix-aware"):
            engine.cluster.router = make_router(ClusterConfig(router=router))  # type: ignore[arg-type]
            engine.cluster.refresh()
            before = engine.stats()

            start = time.perf_counter()
            timings = [t for conv in asyncio.run(run_conversations(engine, workload, router)) for t in conv]
            elapsed = time.perf_counter() - start
            engine.cluster.refresh()
            after = engine.stats()
            queries = after.prefix_cache_queries - before.prefix_cache_queries
            hits = after.prefix_cache_hits - before.prefix_cache_hits
            results[router] = {
                "requests": len(timings),
                "elapsed_s": elapsed,
                "ttft_s": percentiles([t.ttft for t in timings]),
                "tpot_s": percentiles([t.tpot for t in timings if t.tpot is not None]),
                "prefix_hit_rate": hits / queries if queries else 0.0,
            }
            print(json.dumps({router: results[router]}), flush=True)
    finally:
        engine.shutdown()
    return results


# -- 3. colocated vs disaggregated goodput ------------------------------------------------


async def run_poisson(
    engine: ClusterEngine, name: str, requests: list[tuple[list[int], int]], rate: float, rng: random.Random
) -> list[Timing]:
    tasks = []
    for i, (prompt, answer) in enumerate(requests):
        tasks.append(asyncio.create_task(timed(engine, f"{name}-{i}", prompt, answer)))
        await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks))


def bench_goodput(
    config: EngineConfig,
    rate: float,
    duration: float,
    ttft_slo: float,
    tpot_slo: float,
    max_prompt: int,
    max_output: int,
) -> dict[str, Any]:
    results = {}
    deployments = {
        "colocated": ClusterConfig(instances=2, router="least-load"),
        "disaggregated": ClusterConfig(prefill_instances=1, decode_instances=1, router="least-load"),
    }
    for name, cluster in deployments.items():
        engine = start_cluster(config, cluster)
        try:
            tokenizer = engine.tokenizer
            rng = random.Random(1)
            requests = []
            for conversation in load_sharegpt(limit=5000):
                exchange = conversation.first_exchange()
                if exchange is None:
                    continue
                prompt = tokenizer.encode(exchange[0])
                if 4 <= len(prompt) <= max_prompt:
                    requests.append((prompt, min(max_output, max(4, len(tokenizer.encode(exchange[1]))))))
                if len(requests) >= int(rate * duration) + 1:
                    break

            start = time.perf_counter()
            timings = asyncio.run(run_poisson(engine, name, requests, rate, rng))
            elapsed = time.perf_counter() - start
            good = [t for t in timings if t.ttft <= ttft_slo and (t.tpot is None or t.tpot <= tpot_slo)]
            results[name] = {
                "requests": len(timings),
                "elapsed_s": elapsed,
                "goodput_rps": len(good) / elapsed,
                "slo_attainment": len(good) / len(timings),
                "ttft_s": percentiles([t.ttft for t in timings]),
                "tpot_s": percentiles([t.tpot for t in timings if t.tpot is not None]),
            }
            print(json.dumps({name: results[name]}), flush=True)
        finally:
            engine.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--kv-cache-memory", type=int, default=640 * 2**20, help="bytes per instance")
    parser.add_argument("--only", default="downtime,routers,goodput")
    parser.add_argument("--lengths", default="256,512,1024,2048,4096,8192")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-prompt", type=int, default=1024)
    parser.add_argument("--max-output", type=int, default=32)
    parser.add_argument("--rate", type=float, default=1.0, help="requests/s (goodput)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals (goodput)")
    parser.add_argument("--ttft-slo", type=float, default=2.0)
    parser.add_argument("--tpot-slo", type=float, default=0.2)
    parser.add_argument("--out", default="results/cluster.json")
    args = parser.parse_args()

    config = EngineConfig.from_kwargs(
        model=args.model, load_format=args.load_format, kv_cache_memory_bytes=args.kv_cache_memory
    )
    only = set(args.only.split(","))
    report: dict[str, Any] = {"args": vars(args)}
    if "downtime" in only:
        from kvos.model.loader import load_model

        vocab = load_model(config.model).arch.vocab_size
        report["downtime"] = bench_downtime(config, [int(x) for x in args.lengths.split(",")], vocab)
    if "routers" in only:
        report["routers"] = bench_routers(config, args.conversations, args.turns, args.max_prompt, args.max_output)
    if "goodput" in only:
        report["goodput"] = bench_goodput(
            config, args.rate, args.duration, args.ttft_slo, args.tpot_slo, args.max_prompt, args.max_output
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
