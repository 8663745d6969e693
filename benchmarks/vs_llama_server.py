"""Offline throughput: kvos's defaults against llama.cpp's `llama-server` at each parallel-slot setting.

The same ShareGPT requests (token ids, each generating exactly its reference
answer's length) go through:

- kvos: `LLM()` with no options, in a fresh process (`benchmarks.offline_throughput`),
  so its peak resident memory is its own;
- llama-server: a fresh server per `-np` setting (defaults plus `-t 2
  --cont-batching`), every request sent at once through its OpenAI
  endpoint, as a user with a batch job would.

Every engine runs cold: a fresh process per run, so no prompt cache carries
over (both keep a prompt's KV, and a repeat pass runs about 2x faster). The
table prints output tokens/s, % of each engine's roofline limit, peak RSS,
and kvos's ratio to each setting and to llama-server's best.

Usage: python -m benchmarks.vs_llama_server --llama-server PATH [--np 1,4,16,64]
           [--num-requests 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.peers import arch_from_gguf, load_tokenizer, resolve_gguf
from benchmarks.roofline import ArchShape, load_or_measure, percent_of_limit
from benchmarks.serve_sweep import llama_cpp_bound, llama_server_command, run_server
from benchmarks.sharegpt import sample_requests


def run_kvos(args: argparse.Namespace) -> dict:
    """kvos's offline run in a child process, so that the RSS it reports is kvos's alone."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kvos.json"
        command = [
            sys.executable,
            "-m",
            "benchmarks.offline_throughput",
            "--engines",
            "kvos",
            "--num-requests",
            str(args.num_requests),
            "--seed",
            str(args.seed),
            "--json",
            str(out),
            *args.kvos_args,
        ]
        subprocess.run(command, check=True)
        report = json.loads(out.read_text())
    run = next(r for r in report["runs"] if r["engine"] == "kvos")
    return {
        "output_throughput": run["num_output_tokens"] / run["elapsed_s"],
        "duration_s": run["elapsed_s"],
        "bound_s": run["bound_s"],
        "rss_idle_mib": run["rss_idle_mib"],
        "rss_peak_mib": run["rss_peak_mib"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-server", required=True, help="path of llama.cpp's llama-server binary")
    parser.add_argument("--np", default="1,4,16,64", help="llama-server parallel-slot settings to run")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ctx-per-slot", type=int, default=1024, help="llama-server context per slot")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=8150)
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--log-dir", default="/tmp")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("kvos_args", nargs="*", help="after --: extra benchmarks.offline_throughput flags for kvos")
    args = parser.parse_args(argv)
    # The serving client reads these; an offline batch has no SLO, so they only fill the report.
    args.ttft_slo, args.tpot_slo = 2.0, 0.2
    slots = [int(n) for n in args.np.split(",") if n]
    if not Path(args.llama_server).is_file():
        parser.error(f"--llama-server {args.llama_server!r} is not a file")

    # The same sample as benchmarks.offline_throughput's (same sampler, bounds and seed).
    gguf = resolve_gguf(None)
    tokenizer = load_tokenizer(gguf)
    requests = sample_requests(tokenizer, args.num_requests, seed=args.seed)
    work = [(len(r.prompt_token_ids), r.max_tokens) for r in requests]
    machine = load_or_measure("cpu")
    shape = ArchShape.from_any(arch_from_gguf(gguf))

    def count_tokens(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    load_before = os.getloadavg()[0]
    print(f"kvos offline, {len(requests)} requests ...", flush=True)
    results: dict[str, dict] = {"kvos": run_kvos(args)}
    for n in slots:
        print(f"llama-server -np {n} ...", flush=True)
        command = llama_server_command(args.llama_server, gguf, args.port, args.threads, n, args.ctx_per_slot)
        log = Path(args.log_dir) / f"llama-server-np{n}.log"
        report = run_server(command, args.port, float("inf"), args, requests, count_tokens, log)
        report["bound_s"] = llama_cpp_bound(shape, machine, work, gguf, n)
        results[f"llama-server -np {n}"] = report
    load_after = os.getloadavg()[0]

    kvos = results["kvos"]
    peers = {k: v for k, v in results.items() if k != "kvos"}
    best = max(peers, key=lambda k: peers[k]["output_throughput"]) if peers else None
    print(f"\n{len(requests)} ShareGPT requests, {sum(r.max_tokens for r in requests)} output tokens, cold engines")
    print(f"{'engine':<20} {'tok/s':>7} {'% of limit':>10} {'RSS idle/peak MiB':>18} {'kvos / this':>11}")
    for name, r in results.items():
        pct = percent_of_limit(r["duration_s"], r["bound_s"])
        ratio = kvos["output_throughput"] / r["output_throughput"]
        completed = f"  ({r['completed']} done, {r['failed']} failed)" if "completed" in r else ""
        print(
            f"{name:<20} {r['output_throughput']:>7.1f} {pct:>9.1f}% "
            f"{r['rss_idle_mib'] or 0:>8.0f}/{r['rss_peak_mib'] or 0:<9.0f} {ratio:>10.2f}x"
            f"{completed}"
        )
    if best is not None:
        ratio = kvos["output_throughput"] / peers[best]["output_throughput"]
        print(f"kvos / llama-server's best ({best}): {ratio:.2f}x")
    print(f"1-minute load average before/after: {load_before:.2f}/{load_after:.2f}")
    if args.json is not None:
        report_all = {
            "date": datetime.date.today().isoformat(),
            "model": gguf.name,
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "results": results,
            "best_peer": best,
            "load_average": [load_before, load_after],
        }
        args.json.write_text(json.dumps(report_all, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
