"""Serving sweep: kvos's server beside llama.cpp's servers, same requests, several request rates.

Peers: llama.cpp's own C++ `llama-server` (continuous batching over `-np`
parallel slots; `--llama-server PATH`) and llama-cpp-python's server (one
request at a time). For every rate each server is started fresh (so no run
inherits another's queue or prompt cache: both keep a prompt's KV), warmed
up, replayed the same ShareGPT requests by `benchmarks.serve` as token ids,
and stopped. The table puts them side by side per rate: output tokens/s,
goodput under the SLOs, p50/p99 TTFT and TPOT, idle and peak resident
memory, and the kvos / peer ratios. At the saturating rate (inf) it also
prints each server's % of the roofline limit for the same requests.

Usage: python -m benchmarks.serve_sweep [--rates 1,2,4,inf] [--num-requests 200]
           [--servers kvos,llama-server] [--llama-server PATH --llama-server-np 16]
           [--kvos-args "..."] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from benchmarks import serve
from benchmarks.memory import RSSSampler, mib
from benchmarks.peers import (
    arch_from_gguf,
    llama_cpp_version,
    load_tokenizer,
    resolve_gguf,
)
from benchmarks.roofline import (
    ArchShape,
    Roofline,
    kvos_gemm_dtype,
    kvos_weight_bytes_per_param,
    load_or_measure,
    percent_of_limit,
)
from benchmarks.sharegpt import sample_requests
from kvos.config import DTYPE_BYTES, ModelConfig, SchedulerConfig

SERVERS = ("kvos", "llama-server", "llama-cpp-python")


def llama_server_command(binary: str, gguf: Path, port: int, threads: int, slots: int, ctx_per_slot: int) -> list[str]:
    """llama-server with its defaults plus 2 threads, continuous batching and `slots` parallel slots."""
    return [
        binary,
        "-m",
        str(gguf),
        "--port",
        str(port),
        "-t",
        str(threads),
        "--cont-batching",
        "-np",
        str(slots),
        "-c",
        str(slots * ctx_per_slot),
    ]


def server_command(name: str, gguf: Path, port: int, args: argparse.Namespace) -> list[str]:
    if name == "llama-server":
        return llama_server_command(
            args.llama_server, gguf, port, args.llama_cpp_threads, args.llama_server_np, args.ctx_per_slot
        )
    if name == "kvos":
        return kvos_serve_command(gguf, port, shlex.split(args.kvos_args))
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--port",
        str(port),
        "--n_threads",
        str(args.llama_cpp_threads),
        "--n_ctx",
        "2048",
        "--interrupt_requests",
        "False",
    ]


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"server at {url} not ready after {timeout_s:.0f}s")


def kvos_serve_command(gguf: Path, port: int, flags: Sequence[str]) -> list[str]:
    """`kvos serve` on `gguf` at `port`, in a child of this Python, with `flags`."""
    return [sys.executable, "-m", "kvos.entrypoints.cli", "serve", str(gguf), "--port", str(port), *flags]


@contextlib.contextmanager
def running_server(
    command: list[str], url: str, log: Path, start_timeout_s: float, stop_timeout_s: float = 30.0
) -> Iterator[subprocess.Popen]:
    """A fresh server from `command` (output to `log`), ready at `url`; on the way out it gets SIGTERM,
    and is killed if it has not exited `stop_timeout_s` later."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_ready(url, process, start_timeout_s)
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()


def replay(
    url: str, rate: float, args: argparse.Namespace, requests: list, count_tokens: Any
) -> tuple[dict[str, Any], list[serve.RequestResult]]:
    """Replay the requests at `rate` against the server at `url` (token ids, the sweep's seed and SLOs):
    the summary `benchmarks.serve` prints, and each request's result."""
    client_args = serve.build_parser().parse_args(
        [
            url,
            "--request-rate",
            str(rate),
            "--seed",
            str(args.seed),
            "--no-progress",
            "--prompt-ids",
            "--ttft-slo",
            str(args.ttft_slo),
            "--tpot-slo",
            str(args.tpot_slo),
        ]
    )
    return asyncio.run(serve.run_benchmark(client_args, requests, count_tokens))


def run_server(
    command: list[str], port: int, rate: float, args: argparse.Namespace, requests: list, count_tokens: Any, log: Path
) -> dict:
    """Start a fresh server, replay the requests at `rate`, stop it; the report adds idle and peak RSS."""
    url = f"http://127.0.0.1:{port}"
    with running_server(command, url, log, args.start_timeout) as process:
        sampler = RSSSampler(process.pid)
        idle = sampler.sample()
        with sampler:
            result, _ = replay(url, rate, args, requests, count_tokens)
        return result | {"rss_idle_mib": mib(idle), "rss_peak_mib": mib(sampler.peak_bytes)}


def run_one(name: str, rate: float, gguf: Path, args: argparse.Namespace, requests: list, count_tokens: Any) -> dict:
    port = args.port + SERVERS.index(name)
    log = Path(args.log_dir) / f"{name}-{rate}.log"
    return run_server(server_command(name, gguf, port, args), port, rate, args, requests, count_tokens, log)


def format_rows(results: dict[str, dict[str, dict]], bounds: dict[str, float]) -> str:
    header = (
        f"{'rate':>5} {'server':<17} {'tok/s':>7} {'goodput':>8} {'TTFT p50/p99 s':>15} "
        f"{'TPOT p50/p99 ms':>16} {'% of limit':>10} {'RSS idle/peak MiB':>18}"
    )
    lines = [header, "-" * len(header)]
    for rate, by_server in results.items():
        for name, r in by_server.items():
            limit = f"{percent_of_limit(r['duration_s'], bounds[name]):.1f}%" if rate == "inf" else "-"
            rss = "/".join("-" if r.get(k) is None else f"{r[k]:.0f}" for k in ("rss_idle_mib", "rss_peak_mib"))
            lines.append(
                f"{rate:>5} {name:<17} {r['output_throughput']:>7.1f} {r['goodput']:>8.3f} "
                f"{r['ttft_ms']['p50'] / 1000:>7.2f}/{r['ttft_ms']['p99'] / 1000:<7.2f} "
                f"{r['tpot_ms']['p50']:>7.1f}/{r['tpot_ms']['p99']:<8.1f} {limit:>10} {rss:>18}"
            )
        k = by_server.get("kvos")
        for peer, p in by_server.items():
            if k is None or peer == "kvos":
                continue
            lines.append(
                f"{rate:>5} kvos/{peer}: throughput {k['output_throughput'] / p['output_throughput']:.2f}x, "
                f"goodput {k['goodput']:.3f} vs {p['goodput']:.3f} "
                f"({k['goodput'] / p['goodput'] if p['goodput'] else math.inf:.2f}x), "
                f"p99 TTFT {p['ttft_ms']['p99'] / k['ttft_ms']['p99']:.2f}x shorter"
            )
    return "\n".join(lines)


def kvos_bound(shape: ArchShape, machine: Any, work: list[tuple[int, int]], kvos_args: str) -> float:
    """kvos's roofline bound for these flags: weights in the GEMMs' format, KV in the compute dtype."""
    flags = shlex.split(kvos_args)

    def flag(name: str, default: str) -> str:
        return flags[flags.index(name) + 1] if name in flags else default

    dtype = ModelConfig(dtype=flag("--dtype", "auto")).resolved_dtype  # type: ignore[arg-type]
    quantization = flag("--quantization", "") or None
    max_batch = int(flag("--max-num-seqs", str(SchedulerConfig().max_num_seqs)))
    gemm_dtype = kvos_gemm_dtype(dtype, quantization)
    peak = machine if gemm_dtype == "float32" else load_or_measure("cpu", dtype=gemm_dtype)  # the GEMMs' own peak
    # Quantized weights count at their kernel's bytes at every batch size: above the kernel's rows kvos
    # reads a bfloat16 copy, so the bound is looser there, never higher than the truth.
    weight_bytes = kvos_weight_bytes_per_param(dtype, quantization, rows=1)
    return (
        Roofline.for_machine(shape, peak, kv_bytes_per_elem=DTYPE_BYTES[dtype])
        .lower_bound_seconds(work, max_batch=max_batch, weight_bytes_per_param=weight_bytes)
        .total_s
    )


def llama_cpp_bound(shape: ArchShape, machine: Any, work: list[tuple[int, int]], gguf: Path, slots: int) -> float:
    """llama.cpp reads the GGUF's quantized blocks (the file is almost all weights) and keeps KV in float16."""
    return (
        Roofline.for_machine(shape, machine, kv_bytes_per_elem=2)
        .lower_bound_seconds(work, max_batch=slots, weight_bytes_per_param=gguf.stat().st_size / shape.num_params)
        .total_s
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--rates", default="1,2,4,inf", help="comma-separated requests/s; inf = all at once")
    parser.add_argument("--servers", default="kvos,llama-server", help=f"subset of {','.join(SERVERS)}")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--max-output-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ttft-slo", type=float, default=2.0, help="seconds")
    parser.add_argument("--tpot-slo", type=float, default=0.2, help="seconds")
    parser.add_argument("--kvos-args", default="", help="extra `kvos serve` flags (default: none, kvos's defaults)")
    parser.add_argument("--llama-server", default=None, help="path of llama.cpp's llama-server binary")
    parser.add_argument("--llama-server-np", type=int, default=16, help="llama-server's parallel slots (-np)")
    parser.add_argument("--ctx-per-slot", type=int, default=1024, help="llama-server context per slot (-c = np x this)")
    parser.add_argument("--llama-cpp-threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=8140)
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for a server")
    parser.add_argument("--log-dir", default="/tmp", help="where each server's output goes")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    servers = [s for s in args.servers.split(",") if s]
    if any(s not in SERVERS for s in servers) or not servers:
        parser.error(f"--servers must be a subset of {','.join(SERVERS)}, got {args.servers!r}")
    if any(r <= 0 for r in rates):
        parser.error("--rates must be > 0 (inf sends everything at once)")
    if "llama-cpp-python" in servers and llama_cpp_version() is None:
        parser.error("llama-cpp-python is not installed (pip install llama-cpp-python; benchmarks only)")
    if "llama-server" in servers and (args.llama_server is None or not Path(args.llama_server).is_file()):
        parser.error("--llama-server must name llama.cpp's llama-server binary (see BENCHMARKS.md for the build)")

    gguf = resolve_gguf(args.model)
    tokenizer = load_tokenizer(gguf)

    def count_tokens(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    requests = sample_requests(
        tokenizer, args.num_requests, args.max_prompt_tokens, args.max_output_tokens, seed=args.seed
    )
    machine = load_or_measure("cpu")
    shape = ArchShape.from_any(arch_from_gguf(gguf))
    work = [(len(r.prompt_token_ids), r.max_tokens) for r in requests]
    bounds = {
        "kvos": kvos_bound(shape, machine, work, args.kvos_args),
        "llama-server": llama_cpp_bound(shape, machine, work, gguf, args.llama_server_np),
        "llama-cpp-python": llama_cpp_bound(shape, machine, work, gguf, 1),  # one request at a time
    }
    print(
        f"serve sweep: {gguf.name}, {len(requests)} ShareGPT requests, rates {args.rates}, "
        f"kvos flags {args.kvos_args!r}, llama-server -np {args.llama_server_np}, "
        f"llama-cpp-python {llama_cpp_version()}, llama.cpp threads {args.llama_cpp_threads}"
    )
    load_before = os.getloadavg()[0]
    results: dict[str, dict[str, dict]] = {}
    for rate in rates:
        key = "inf" if math.isinf(rate) else f"{rate:g}"
        for name in servers:
            print(f"rate {key}: {name} ...", flush=True)
            results.setdefault(key, {})[name] = run_one(name, rate, gguf, args, requests, count_tokens)
    print(format_rows(results, bounds))
    print(f"1-minute load average before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f}")
    if args.json is not None:
        report = {
            "date": datetime.date.today().isoformat(),
            "model": gguf.name,
            "config": vars(args) | {"json": None},
            "bounds_s": bounds,
            "results": results,
            "load_average": [load_before, os.getloadavg()[0]],
        }
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
