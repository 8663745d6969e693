"""Two tenants, one sending 10x the other's rate, under each scheduling policy.

For every policy (fcfs; priority with the light tenant urgent; fair) a fresh
`kvos serve --scheduling-policy P` gets the same two Poisson streams of
ShareGPT requests, tagged with OpenAI's `user` field (and `priority`). Per
tenant it reports output tokens/s and p50 / p99 time to first token; for the
whole run, total output tokens/s; under fair, the largest gap between the
tenants' service counters (sampled from /metrics while both tenants have
requests in flight: VTC bounds the gap between backlogged tenants only) against VTC's bound,
2 x max(w_in x longest prompt, w_out x max_num_batched_tokens). The service
each tenant received over time (measured at the client: prompt tokens when
the first token arrives, output tokens as they stream) is drawn per policy
as a PNG, and everything is written as JSON.

Not a test: run it on an otherwise idle machine.

    python -m benchmarks.fairness [--heavy-rate 1.5] [--duration 40] [--out results/fairness]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import serve
from benchmarks.peers import load_tokenizer, resolve_gguf
from benchmarks.serve_sweep import kvos_serve_command, running_server
from benchmarks.sharegpt import BenchRequest, sample_requests
from kvos.heap import frozen_heap

POLICIES = ("fcfs", "priority", "fair")
TENANTS = ("heavy", "light")
W_IN, W_OUT = 1.0, 2.0
MAX_NUM_BATCHED_TOKENS = 512
DEFAULT_KVOS_ARGS = "--max-num-seqs 4"


def tenant_fields(policy: str, tenant: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"user": tenant}
    if policy == "priority":
        fields["priority"] = 0 if tenant == "light" else 1
    return fields


async def sample_service(
    client: httpx.AsyncClient, until: asyncio.Event, in_flight: dict[str, int], samples: list[dict[str, float]]
) -> None:
    """Poll the server's per-tenant service counters (fair policy) twice a second, while both tenants wait."""
    while not until.is_set():
        text = (await client.get("/metrics")).text
        counters = {
            line.split('"')[1]: float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("kvos_tenant_service{")
        }
        if all(in_flight[t] for t in TENANTS):
            samples.append(counters)
        try:
            await asyncio.wait_for(until.wait(), 0.5)
        except TimeoutError:
            pass


async def run_policy(
    url: str, policy: str, streams: dict[str, list[tuple[float, BenchRequest]]], count_tokens: Any
) -> tuple[dict[str, Any], list[tuple[str, float, serve.RequestResult]]]:
    """Replay the streams against the server at `url`: the report, and each request's (tenant, send time
    from the start, result) in the streams' order (tenant by tenant)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        warmup = BenchRequest(serve.WARMUP_PROMPT, count_tokens(serve.WARMUP_PROMPT), 8)
        await serve.stream_one(client, model, warmup, True, count_tokens)
        done = asyncio.Event()
        samples: list[dict[str, float]] = []
        in_flight = dict.fromkeys(TENANTS, 0)
        sampler = asyncio.create_task(sample_service(client, done, in_flight, samples))
        start = time.perf_counter()

        async def send(tenant: str, at: float, request: BenchRequest) -> tuple[str, float, serve.RequestResult]:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
            sent = time.perf_counter() - start
            in_flight[tenant] += 1
            try:
                result = await serve.stream_one(
                    client, model, request, True, count_tokens, extra=tenant_fields(policy, tenant)
                )
            finally:
                in_flight[tenant] -= 1
            return tenant, sent, result

        jobs = [send(tenant, at, r) for tenant, stream in streams.items() for at, r in stream]
        with frozen_heap():
            results = await asyncio.gather(*jobs)
        duration = time.perf_counter() - start
        done.set()
        await sampler
    return {"policy": policy, **summarize(results, duration, samples)}, results


def summarize(results: list[tuple[str, float, serve.RequestResult]], duration: float, samples: list) -> dict:
    report: dict[str, Any] = {"duration_s": duration, "tenants": {}, "service_timeline": {}}
    total_tokens = 0
    for tenant in TENANTS:
        mine = [(sent, r) for t, sent, r in results if t == tenant and r.ok]
        tokens = sum(r.output_tokens for _, r in mine)
        total_tokens += tokens
        report["tenants"][tenant] = {
            "completed": len(mine),
            "failed": sum(1 for t, _, r in results if t == tenant and not r.ok),
            "output_tokens_per_s": tokens / duration,
            "ttft_ms": serve.percentiles_ms([r.ttft_s for _, r in mine]),
        }
        events = []
        for sent, r in mine:
            first = sent + r.ttft_s
            events.append((first, W_IN * r.prompt_tokens + W_OUT))
            events.extend((t, W_OUT) for t in itertools.accumulate(r.itl_s, initial=first))
        events.sort()
        report["service_timeline"][tenant] = [
            (t, s) for t, s in zip((e[0] for e in events), itertools.accumulate(e[1] for e in events))
        ]
    report["output_tokens_per_s"] = total_tokens / duration
    gaps = [abs(s.get("heavy", 0.0) - s.get("light", 0.0)) for s in samples if len(s) >= 2]
    report["max_counter_gap"] = max(gaps, default=float("nan"))
    return report


def draw(reports: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(5 * len(reports), 4), sharey=True)
    for ax, report in zip(axes, reports):
        for tenant, timeline in report["service_timeline"].items():
            if timeline:
                times, service = zip(*timeline)
                ax.plot(times, service, label=tenant)
        light = report["tenants"]["light"]["ttft_ms"]["p99"]
        ax.set_title(f"{report['policy']}: light p99 TTFT {light / 1000:.1f} s")
        ax.set_xlabel("seconds")
        ax.legend()
    axes[0].set_ylabel(f"service received ({W_IN:g} x prompt + {W_OUT:g} x output tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def make_streams(
    tokenizer: Any, heavy_rate: float, duration: float, max_prompt: int, max_output: int, seed: int
) -> dict[str, list[tuple[float, BenchRequest]]]:
    """Each tenant's (send time, request) Poisson stream: the light tenant at a tenth of the heavy one's rate."""
    rates = {"heavy": heavy_rate, "light": heavy_rate / 10}
    counts = {t: max(1, math.ceil(rate * duration)) for t, rate in rates.items()}
    pool = sample_requests(tokenizer, sum(counts.values()), max_prompt, max_output, seed=seed)
    heavy_times = serve.poisson_delays(counts["heavy"], rates["heavy"], seed)
    light_times = serve.poisson_delays(counts["light"], rates["light"], seed + 1)
    return {
        "heavy": list(zip(heavy_times, pool[: counts["heavy"]])),
        "light": list(zip(light_times, pool[counts["heavy"] :])),
    }


def serve_policy(
    policy: str,
    gguf: Path,
    port: int,
    kvos_args: str,
    log_path: Path,
    streams: dict[str, list[tuple[float, BenchRequest]]],
    count_tokens: Any,
) -> dict[str, Any]:
    """Start a fresh `kvos serve --scheduling-policy policy`, replay the streams, stop it: the report."""
    command = kvos_serve_command(gguf, port, server_flags(policy, kvos_args))
    url = f"http://127.0.0.1:{port}"
    with running_server(command, url, log_path, start_timeout_s=300):
        report, _ = asyncio.run(run_policy(url, policy, streams, count_tokens))
        return report


def server_flags(policy: str, kvos_args: str) -> list[str]:
    """`kvos serve` flags for one policy's run: every request is queued (no 429s), plus `kvos_args`."""
    return ["--scheduling-policy", policy, "--max-waiting", "100000", *shlex.split(kvos_args)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heavy-rate", type=float, default=2.0, help="heavy tenant's requests/s (light: a tenth)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per policy")
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--max-output-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument(
        "--kvos-args",
        default=DEFAULT_KVOS_ARGS,
        help="extra `kvos serve` flags; the default keeps few slots so that the heavy tenant's queue builds up",
    )
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/fairness")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gguf = resolve_gguf(None)
    tokenizer = load_tokenizer(gguf)
    streams = make_streams(
        tokenizer, args.heavy_rate, args.duration, args.max_prompt_tokens, args.max_output_tokens, args.seed
    )
    pool = [r for stream in streams.values() for _, r in stream]
    bound = 2 * max(W_IN * max(len(r.prompt_token_ids) for r in pool), W_OUT * MAX_NUM_BATCHED_TOKENS)
    print(
        f"fairness: heavy {args.heavy_rate} req/s, light {args.heavy_rate / 10} req/s, {args.duration:.0f} s of "
        f"arrivals, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"
    )
    reports = [
        serve_policy(
            policy,
            gguf,
            args.port,
            args.kvos_args,
            out / f"server-{policy}.log",
            streams,
            lambda s: tokenizer.encode(s),
        )
        for policy in args.policies.split(",")
    ]
    by_policy = {r["policy"]: r for r in reports}
    print(
        f"{'policy':<9} {'tok/s':>7} {'heavy tok/s':>11} {'light tok/s':>11} {'light p50 TTFT':>14} "
        f"{'light p99 TTFT':>14} {'heavy p99 TTFT':>14}"
    )
    for r in reports:
        h, lt = r["tenants"]["heavy"], r["tenants"]["light"]
        print(
            f"{r['policy']:<9} {r['output_tokens_per_s']:7.1f} {h['output_tokens_per_s']:11.1f} "
            f"{lt['output_tokens_per_s']:11.1f} {lt['ttft_ms']['p50'] / 1000:13.2f}s "
            f"{lt['ttft_ms']['p99'] / 1000:13.2f}s {h['ttft_ms']['p99'] / 1000:13.2f}s"
        )
    if "fcfs" in by_policy and "fair" in by_policy:
        fcfs, fair = by_policy["fcfs"], by_policy["fair"]
        ratio = fcfs["tenants"]["light"]["ttft_ms"]["p99"] / fair["tenants"]["light"]["ttft_ms"]["p99"]
        throughput = fair["output_tokens_per_s"] / fcfs["output_tokens_per_s"]
        print(
            f"light tenant p99 TTFT, fcfs / fair: {ratio:.1f}x (target >= 10x); "
            f"throughput fair / fcfs: {throughput:.3f} (target >= 0.95); "
            f"largest service-counter gap under fair: {fair['max_counter_gap']:.0f} (VTC bound {bound:.0f})"
        )
    (out / "fairness.json").write_text(json.dumps({"bound": bound, "runs": reports}, indent=1))
    draw(reports, out / "fairness.png")
    print(f"wrote {out / 'fairness.json'} and {out / 'fairness.png'}; load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
