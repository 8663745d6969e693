"""Online serving: replay ShareGPT requests against any OpenAI-compatible server.

Requests arrive as a Poisson process at --request-rate (inf: all at once) and
stream from POST /v1/completions; for each one we time the first token (TTFT),
the gaps between streamed chunks (ITL), the mean time per output token after
the first (TPOT) and the whole request. Goodput counts the requests per second
that met both --ttft-slo and --tpot-slo (DistServe's definition).

With --ignore-eos (the default) every request generates exactly its reference
answer's length, asked for in both dialects (`ignore_eos` for kvos and vLLM,
`min_tokens` for llama-cpp-python), so servers do the same work; the report
shows the tokens actually received, so a server that ignored both shows it.

Usage: python -m benchmarks.serve http://127.0.0.1:8000 [--num-requests 100] [--request-rate 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import math
import os
import platform
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm.auto import tqdm

from benchmarks.peers import load_tokenizer, resolve_gguf
from benchmarks.sharegpt import BenchRequest, sample_requests
from kvos.heap import frozen_heap

logger = logging.getLogger(__name__)

WARMUP_PROMPT = "Warm-up request: please say hello."
PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """What one streamed request looked like from the client."""

    prompt_tokens: int
    expected_tokens: int
    ok: bool = False
    error: str = ""
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    sent_s: float = 0.0
    """`time.perf_counter()` when the request was sent. On Linux that is the system-wide
    CLOCK_MONOTONIC, so a server on this machine can match its own timestamps with it."""
    response_id: str = ""
    """The `id` the server gave the completion (its chunks'), so its own records can be matched with this one."""

    @property
    def tpot_s(self) -> float:
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def poisson_delays(num: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from start) of a Poisson process; all zero for rate=inf."""
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(num):
        times.append(now)
        now += rng.expovariate(rate)
    return times


async def stream_one(
    client: httpx.AsyncClient,
    model: str,
    request: BenchRequest,
    ignore_eos: bool,
    count_tokens: Any,
    extra: dict[str, Any] | None = None,
    prompt_ids: bool = False,
) -> RequestResult:
    """Stream one completion; `extra` fields (e.g. `user`, `priority`) join the request body.

    With `prompt_ids` the prompt goes as token ids, so servers with different
    tokenizer front ends still run exactly the same tokens.
    """
    result = RequestResult(prompt_tokens=len(request.prompt_token_ids), expected_tokens=request.max_tokens)
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(request.prompt_token_ids) if prompt_ids else request.prompt,
        "max_tokens": request.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body |= {"ignore_eos": True, "min_tokens": request.max_tokens}
    body |= extra or {}
    text = ""
    usage_tokens: int | None = None
    start = result.sent_s = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for chunk in sse_chunks(response):
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                result.response_id = result.response_id or str(chunk.get("id") or "")
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"]["completion_tokens"]
                delta = "".join(c.get("text") or "" for c in chunk.get("choices", []))
                if not delta:
                    continue
                now = time.perf_counter()
                if not text:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
                text += delta
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency_s = time.perf_counter() - start
    # Servers that do not report usage in streams get their text re-tokenized.
    result.output_tokens = usage_tokens if usage_tokens is not None else len(count_tokens(text))
    result.ok = bool(text)
    if not result.ok:
        result.error = "empty completion"
    return result


async def sse_chunks(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of an OpenAI server-sent-event stream, up to its `[DONE]`."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def percentiles_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), **{f"p{p}": float("nan") for p in PERCENTILES}}
    ordered = sorted(values)

    def pick(p: float) -> float:
        # Nearest-rank percentile: an observed value, no interpolation.
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {"mean": 1000 * sum(ordered) / len(ordered), **{f"p{p}": 1000 * pick(p) for p in PERCENTILES}}


def summarize(results: list[RequestResult], duration_s: float, ttft_slo_s: float, tpot_slo_s: float) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    good = [r for r in done if r.ttft_s <= ttft_slo_s and r.tpot_s <= tpot_slo_s]
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration_s,
        "total_input_tokens": sum(r.prompt_tokens for r in done),
        "total_output_tokens": output_tokens,
        "expected_output_tokens": sum(r.expected_tokens for r in done),
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "ttft_ms": percentiles_ms([r.ttft_s for r in done]),
        "tpot_ms": percentiles_ms([r.tpot_s for r in done if r.output_tokens > 1]),
        "itl_ms": percentiles_ms([gap for r in done for gap in r.itl_s]),
        "e2e_latency_ms": percentiles_ms([r.latency_s for r in done]),
        "goodput": len(good) / duration_s,
        "slo_attainment": len(good) / len(results) if results else 0.0,
    }


async def run_benchmark(
    args: argparse.Namespace, requests: list[BenchRequest], count_tokens: Any
) -> tuple[dict[str, Any], list[RequestResult]]:
    """The run's summary (the model's name and `summarize`'s figures) and each request's result."""
    model, results, duration = await run_requests(args, requests, count_tokens)
    return {"model": model, **summarize(results, duration, args.ttft_slo, args.tpot_slo)}, results


async def run_requests(
    args: argparse.Namespace, requests: list[BenchRequest], count_tokens: Any
) -> tuple[str, list[RequestResult], float]:
    """Warm up, then send `requests` at the rate: the model's name, each request's result (in order), the seconds."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as client:
        model = args.model_name or (await client.get("/v1/models")).json()["data"][0]["id"]
        warmup = BenchRequest(WARMUP_PROMPT, count_tokens(WARMUP_PROMPT), 8)
        warm = await stream_one(client, model, warmup, args.ignore_eos, count_tokens, prompt_ids=args.prompt_ids)
        if not warm.ok:
            raise RuntimeError(f"warm-up request failed: {warm.error}")

        send_times = poisson_delays(len(requests), args.request_rate, args.seed)
        bar = tqdm(total=len(requests), desc="requests", unit="req", disable=args.no_progress)
        start = time.perf_counter()

        async def send(request: BenchRequest, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
            result = await stream_one(client, model, request, args.ignore_eos, count_tokens, prompt_ids=args.prompt_ids)
            bar.update(1)
            return result

        with frozen_heap():
            results = await asyncio.gather(*(send(r, t) for r, t in zip(requests, send_times)))
        duration = time.perf_counter() - start
        bar.close()
    return model, list(results), duration


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="server root, e.g. http://127.0.0.1:8000")
    parser.add_argument("--num-requests", type=int, default=100)
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (Poisson); inf = all at once")
    parser.add_argument("--seed", type=int, default=0, help="fixes the sampled requests and the arrival times")
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--max-output-tokens", type=int, default=256)
    parser.add_argument(
        "--tokenizer-gguf", default=None, help="GGUF whose tokenizer sizes the requests (default: kvos's default model)"
    )
    parser.add_argument("--model-name", default=None, help="model id to send (default: the first of GET /v1/models)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", help="let requests stop at EOS")
    parser.add_argument("--prompt-ids", action="store_true", help="send prompts as token ids instead of text")
    parser.add_argument("--ttft-slo", type=float, default=2.0, help="seconds")
    parser.add_argument("--tpot-slo", type=float, default=0.2, help="seconds")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per-request timeout, seconds")
    parser.add_argument("--label", default="", help="free text stored in the report (e.g. the server's name)")
    parser.add_argument("--json", default=None, help="also write the report to this file")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if args.num_requests < 1:
        raise SystemExit("--num-requests must be >= 1")
    if args.request_rate <= 0:
        raise SystemExit("--request-rate must be > 0 (inf sends everything at once)")
    tokenizer = load_tokenizer(resolve_gguf(args.tokenizer_gguf))

    def count_tokens(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    requests = sample_requests(
        tokenizer, args.num_requests, args.max_prompt_tokens, args.max_output_tokens, seed=args.seed
    )
    config = {k: v for k, v in vars(args).items() if k not in ("api_key", "no_progress")}
    config["request_rate"] = str(args.request_rate)  # JSON has no infinity
    print(f"benchmarks.serve config: {json.dumps(config)}", file=sys.stderr)
    report = {
        "benchmark": "serve",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.system()} {platform.machine()}, {_cpu_count()} CPUs",
        "config": config,
        **asyncio.run(run_benchmark(args, requests, count_tokens))[0],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
