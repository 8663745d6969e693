"""Where a served step's time goes, and the serving overhead the simulator adds to the worker's step time.

`kvos sim profile` times `Worker.execute` alone. A step of `kvos serve`
also pays the scheduler, the front end (output processing, detokenizing),
the async engine's hand-offs and the HTTP/SSE work that shares the cores.
This script measures that:

1. For each rate, start `kvos serve` in a child process whose engine loop is
   instrumented (`--child`): every iteration of `AsyncLLMEngine._step` records
   when it started and ended, the time in `LLMEngine.step`, `EngineCore.step`
   and `Worker.execute`, and the step's shape (`StepShape.from_plan`).
2. Replay ShareGPT requests at that rate with `benchmarks.serve` (another
   seed than the validation's, so validating does not reuse the fitted data).
3. Each busy step's served time is the time from its start to the next
   step's start. Print where it went, by number of requests in the step, and
   fit `ServingOverhead` (`kvos.sim.step_model.fit_overhead`) on the served
   time minus the profile's worker model; report the fit's error.
4. Match each client request with the server's record of it (both read
   CLOCK_MONOTONIC) and time the front end: from the send to the HTTP
   handler giving it to the engine, and from the engine handing out its
   first token to the client reading it (`kvos.sim.step_model.FrontEnd`).
5. Write the served steps and the front end's times into the profile JSON
   (`serving`), so `kvos sim --profile` simulates served steps and the front
   end from then on.

Usage: python -m benchmarks.profile_serving --profile P.json [--rates 2,inf] [--num-requests 60]
           [--kvos-args "--kv-cache-memory 2GiB"]   (the flags the profile was taken with)
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import serve, serve_sweep
from benchmarks.peers import load_tokenizer, resolve_gguf
from benchmarks.sharegpt import sample_requests

if TYPE_CHECKING:
    from kvos.config import EngineConfig
    from kvos.sim.step_model import StepTimeModel

DEFAULT_SEED = 1
"""Not the validation's seed (0): the overhead is fitted on other requests than those it is checked on."""

BINS = ((1, 1), (2, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 1 << 30))
PARTS = ("worker", "scheduler", "front_end", "streams", "loop")


# -- the child: kvos serve with an instrumented engine loop ----------------------------------


def instrument(trace_path: Path) -> None:
    """Wrap the engine loop's calls to time them; the records are written when the server exits."""
    from kvos.core.engine_core import EngineCore
    from kvos.engine.async_engine import AsyncLLMEngine
    from kvos.engine.llm_engine import LLMEngine
    from kvos.sim.step_model import StepShape
    from kvos.worker.worker import Worker

    clock = time.perf_counter
    records: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    requests: dict[str, dict[str, Any]] = {}
    """Per request: when the HTTP handler queued it for the engine, when the engine took it in (at a step
    boundary), and when its first token was handed to its stream."""
    async_step, engine_step, core_step, execute = AsyncLLMEngine._step, LLMEngine.step, EngineCore.step, Worker.execute
    queue, add = AsyncLLMEngine.add_request, AsyncLLMEngine._add

    async def timed_queue(self: AsyncLLMEngine, req_id: str, prompt_token_ids: list[int], *args: Any, **kw: Any) -> Any:
        requests[req_id] = {"queued": clock(), "prompt_tokens": len(prompt_token_ids)}
        return await queue(self, req_id, prompt_token_ids, *args, **kw)

    def timed_add(self: AsyncLLMEngine, command: Any) -> None:
        add(self, command)
        requests[command.stream.req_id]["added"] = clock()

    def timed_async_step(self: AsyncLLMEngine) -> None:
        current.clear()
        current.update(start=clock(), worker_s=0.0, engine_s=0.0, core_s=0.0, first_tokens=[])
        async_step(self)
        current["end"] = clock()
        current["busy_after"] = self.engine.has_unfinished_requests()
        for req_id in current.pop("first_tokens"):
            requests[req_id]["first_token"] = current["end"]
        records.append(dict(current))

    def timed_engine_step(self: LLMEngine) -> Any:
        start = clock()
        outputs = engine_step(self)
        current["engine_s"] = clock() - start
        for output in outputs:
            seen = requests.get(output.req_id)
            if seen is not None and "first_token" not in seen and any(o.token_ids for o in output.outputs):
                current["first_tokens"].append(output.req_id)
        return outputs

    def timed_core_step(self: EngineCore) -> Any:
        start = clock()
        updates = core_step(self)
        current["core_s"] = clock() - start
        return updates

    def timed_execute(self: Worker, plan: Any) -> Any:
        start = clock()
        output = execute(self, plan)
        current["worker_s"] = current.get("worker_s", 0.0) + clock() - start
        if plan.scheduled:
            current["shape"] = asdict(StepShape.from_plan(plan))
        return output

    AsyncLLMEngine.add_request = timed_queue  # type: ignore[method-assign]
    AsyncLLMEngine._add = timed_add  # type: ignore[method-assign]
    AsyncLLMEngine._step = timed_async_step  # type: ignore[method-assign]
    LLMEngine.step = timed_engine_step  # type: ignore[method-assign]
    EngineCore.step = timed_core_step  # type: ignore[method-assign]
    Worker.execute = timed_execute  # type: ignore[method-assign]

    def write() -> None:
        trace_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        request_path(trace_path).write_text(json.dumps(requests))

    atexit.register(write)


def request_path(trace_path: Path) -> Path:
    return trace_path.with_suffix(".requests.json")


def child_main(trace_path: Path, serve_argv: list[str]) -> int:
    instrument(trace_path)
    from kvos.entrypoints.cli import main as kvos_main

    return kvos_main(serve_argv)


# -- the parent: load, then analyse ------------------------------------------------------------


def served_steps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Busy steps after the warm-up, each with its served time and its parts (seconds).

    The warm-up request's steps (everything up to the first idle moment) are
    dropped. A step counts only when the engine still had work after it, so
    the next step started at once and start-to-start is a served step's time.
    `new_rows` marks a step whose row count (`StepShape.rows`) no earlier step
    of the server had: it paid the first-use cost the engine profile measures
    apart (`kvos.sim.profile`), so the fits leave it out.
    """
    from kvos.sim.step_model import StepShape

    first = next((k for k, r in enumerate(records) if not r["busy_after"]), len(records))
    new_rows = []
    rows_run: set[int] = set()
    for r in records:
        rows = StepShape(**r["shape"]).rows if "shape" in r else 0
        new_rows.append(rows not in rows_run)
        rows_run.add(rows)
    steps = []
    for k, (r, after) in enumerate(zip(records[first + 1 :], records[first + 2 :]), start=first + 1):
        if not r["busy_after"] or "shape" not in r:
            continue
        steps.append(
            {
                "shape": r["shape"],
                "new_rows": new_rows[k],
                "seconds": after["start"] - r["start"],
                "worker": r["worker_s"],
                "scheduler": r["core_s"] - r["worker_s"],
                "front_end": r["engine_s"] - r["core_s"],
                "streams": (r["end"] - r["start"]) - r["engine_s"],
                "loop": after["start"] - r["end"],
            }
        )
    return steps


def format_first_uses(steps: list[dict[str, Any]], worker: StepTimeModel, first_use_s: float) -> str:
    """The worker's time in steps that ran a row count first against those that did not, each over the worker
    model's prediction (median ms over it, and the ratio): the first use the profile measured, seen served."""
    from kvos.sim.step_model import StepShape

    lines = [f"first use of a row count, as the profile measured it: {1000 * first_use_s:.2f} ms"]
    for kind, prompt in (("prompt", True), ("decode-only", False)):
        for new in (True, False):
            group = [s for s in steps if (s["shape"]["prefill_tokens"] > 0) == prompt and s["new_rows"] == new]
            if not group:
                continue
            predicted = [worker.step_seconds(StepShape(**s["shape"])) for s in group]
            over = statistics.median(1000 * (s["worker"] - p) for s, p in zip(group, predicted))
            ratio = statistics.median(s["worker"] / p for s, p in zip(group, predicted))
            lines.append(
                f"  {kind} steps, {'new' if new else 'run before'} row count: {len(group)}, worker time "
                f"{over:+.2f} ms over the model (median), ratio {ratio:.3f}"
            )
    return "\n".join(lines)


def breakdown(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ms per part of the served step, by requests in the step."""
    rows = []
    for low, high in BINS:
        group = [s for s in steps if low <= s["shape"]["num_prefills"] + s["shape"]["num_decodes"] <= high]
        if not group:
            continue
        row: dict[str, Any] = {"requests": f"{low}-{high}" if high < 1 << 30 else f"{low}+", "steps": len(group)}
        for part in (*PARTS, "seconds"):
            row[f"{part}_ms"] = 1000 * statistics.fmean(s[part] for s in group)
        rows.append(row)
    return rows


def format_breakdown(rows: list[dict[str, Any]]) -> str:
    header = f"{'requests':>9} {'steps':>6} " + " ".join(f"{p:>9}" for p in (*PARTS, "served"))
    lines = [header + "   (mean ms per step)", "-" * len(header)]
    for row in rows:
        parts = " ".join(f"{row[f'{p}_ms']:>9.1f}" for p in (*PARTS, "seconds"))
        lines.append(f"{row['requests']:>9} {row['steps']:>6} {parts}")
    return "\n".join(lines)


def match_requests(client: list[Any], server: dict[str, dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """Each completed client request (its index in `client`, in send order) with the server's record of it.

    By id when the client saw every completion's id: kvos names the engine
    request of a completion's choice i `<completion id>-<i>`
    (`kvos/entrypoints/server/plumbing.py`). Otherwise by length: the server
    counts a prompt's tokens as the client does plus a constant (a BOS
    token, say), found as the one offset under which both sides hold the
    same lengths, and each client request, in send order, takes the first
    unmatched server record of its length in the order the server queued
    them (requests sent close together can swap places on the way, and a
    burst reaches the engine in any order). Requests of the same length
    sent together can then be paired wrongly: a burst of 80 ShareGPT
    requests held several prompts of 4, 6 and 9 tokens.
    """
    sent = sorted((k for k, r in enumerate(client) if r.ok), key=lambda k: client[k].sent_s)
    by_id = [(k, server.get(f"{client[k].response_id}-0")) for k in sent if client[k].response_id]
    if sent and len(by_id) == len(sent) and all(r is not None and "first_token" in r for _, r in by_id):
        return [(k, r) for k, r in by_id if r is not None]
    taken = sorted((r for r in server.values() if "first_token" in r), key=lambda r: r["queued"])
    taken = taken[len(taken) - len(sent) :]  # the warm-up went first
    if not sent or not taken:
        return []
    # The offset under which the server's prompt lengths are the client's (sent all at once, they arrive
    # in any order, so pairs in order say nothing).
    lengths = sorted(client[k].prompt_tokens for k in sent)
    offsets = [
        c
        for c in sorted({t["prompt_tokens"] - client[sent[0]].prompt_tokens for t in taken})
        if sorted(t["prompt_tokens"] - c for t in taken) == lengths
    ]
    if not offsets:
        raise RuntimeError("the server's prompt lengths are not the client's plus a constant; cannot match them")
    offset = offsets[0]
    matched = []
    for k in sent:
        record = next(r for r in taken if r["prompt_tokens"] == client[k].prompt_tokens + offset)
        taken.remove(record)
        matched.append((k, record))
    return matched


def front_end_delays(client: list[Any], server: dict[str, dict[str, Any]]) -> list[dict[str, float]]:
    """Per request (`match_requests`), seconds from the client's send to the front end handing it to the
    engine (`to_engine`), in the engine's queue until a step boundary (`queued`), and from the engine
    handing out its first token to the client reading it (`to_client`)."""
    return delays_of(client, match_requests(client, server))


def delays_of(client: list[Any], matched: list[tuple[int, dict[str, Any]]]) -> list[dict[str, float]]:
    """`front_end_delays` of requests already matched with their server records (and the client's index
    of each, `request`)."""
    return [
        {
            "request": k,
            "to_engine": record["queued"] - client[k].sent_s,
            "queued": record["added"] - record["queued"],
            "to_client": client[k].sent_s + client[k].ttft_s - record["first_token"],
        }
        for k, record in matched
    ]


def delay_tuples(rate: float, delays: list[dict[str, float]], hidden: list[int]) -> list[tuple[float, float, float]]:
    """(rate, to the engine, to the client) of each request, as `fit_front_end` takes them; NaN to the client
    for a request whose first tokens show no text: the client's TTFT then also holds those tokens' steps,
    which the simulator times itself (`SimRequest.hidden_tokens`)."""
    return [(rate, d["to_engine"], math.nan if hidden[int(d["request"])] else d["to_client"]) for d in delays]


def engine_config(kvos_args: str, gguf: Path) -> EngineConfig:
    """The `EngineConfig` that `kvos serve GGUF <kvos_args>` builds, read with kvos's own parser (so no flag
    is missed)."""
    from kvos.config import EngineConfig
    from kvos.entrypoints.cli import build_parser, engine_options

    args = build_parser().parse_args(["serve", str(gguf), *shlex.split(kvos_args)])
    return EngineConfig.from_kwargs(**engine_options(args))


HIDDEN_LOOKAHEAD = 8
"""Reply tokens generated per request to find the first one a client sees (at most this many minus one hide)."""


def hidden_tokens(config: EngineConfig, prompts: list[Any], max_tokens: list[int]) -> list[int]:
    """How many leading tokens of each request's greedy reply show a streaming client no text.

    The serving benchmark sends raw prompts with `ignore_eos`, and a chat
    model answers some of them with its end-of-turn token first: the server
    skips it (a special token), the client sees nothing, and its TTFT is the
    next token's. Found on the engine the server runs (`config`, built here
    and closed again), from each prompt as the client sends it (text or
    token ids): a request's text is empty until the token the client sees
    first.
    """
    from kvos.engine.llm_engine import LLMEngine
    from kvos.sampling_params import SamplingParams

    engine = LLMEngine(config)
    hidden = [0] * len(prompts)
    try:
        for k, (prompt, most) in enumerate(zip(prompts, max_tokens)):
            limit = min(most, HIDDEN_LOOKAHEAD)
            engine.add_request(str(k), prompt, SamplingParams(max_tokens=limit, temperature=0.0, ignore_eos=True))
        pending = set(range(len(prompts)))
        while pending:
            for out in engine.step():
                k = int(out.req_id)
                reply = out.outputs[0]
                if k in pending and (reply.text or out.finished):
                    hidden[k] = len(reply.token_ids) - 1
                    pending.discard(k)
    finally:
        engine.close()
    print(f"{sum(1 for h in hidden if h)} of {len(prompts)} requests begin with tokens that show no text")
    return hidden


STOP_TIMEOUT_S = 60.0
"""How long an instrumented server may take to stop: it writes its trace on the way out."""


def instrumented_command(trace: Path, gguf: Path, port: int, kvos_args: str) -> list[str]:
    """`kvos serve GGUF --port PORT KVOS_ARGS` with the engine loop instrumented (`child_command`)."""
    return child_command(trace, ["serve", str(gguf), "--port", str(port), *shlex.split(kvos_args)])


def child_command(trace: Path, kvos_argv: list[str]) -> list[str]:
    """`kvos KVOS_ARGV` with the engine loop instrumented (`--child`), writing its trace to `trace` (and the
    requests' times beside it) when it exits; a trace left by an earlier run is removed first."""
    trace.unlink(missing_ok=True)
    request_path(trace).unlink(missing_ok=True)
    return [sys.executable, "-m", "benchmarks.profile_serving", "--child", str(trace), *kvos_argv]


def read_trace(trace: Path, log: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """What a stopped instrumented server wrote: its engine loop's records and its per-request times."""
    if not trace.exists():
        raise RuntimeError(f"the server wrote no step trace to {trace}; see its log {log}")
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    return records, json.loads(request_path(trace).read_text())


def run_rate(
    rate: float, gguf: Path, args: argparse.Namespace, requests: list, count_tokens: Any
) -> tuple[list[dict], list[dict[str, float]]]:
    """Serve `requests` at `rate` on an instrumented server; its served steps and each request's front-end delays."""
    trace = Path(args.log_dir) / f"kvos-serving-trace-{rate}.jsonl"
    url = f"http://127.0.0.1:{args.port}"
    command = instrumented_command(trace, gguf, args.port, args.kvos_args)
    log = Path(args.log_dir) / f"kvos-profile-serving-{rate}.log"
    with serve_sweep.running_server(command, url, log, args.start_timeout, stop_timeout_s=STOP_TIMEOUT_S):
        client_args = serve.build_parser().parse_args(
            [url, "--request-rate", str(rate), "--seed", str(args.seed), "--no-progress"]
        )
        _, results, duration = asyncio.run(serve.run_requests(client_args, requests, count_tokens))
        summary = serve.summarize(results, duration, client_args.ttft_slo, client_args.tpot_slo)
        print(f"rate {rate:g}: {summary['completed']} requests, {summary['output_throughput']:.1f} tok/s", flush=True)
    records, server_requests = read_trace(trace, log)
    delays = front_end_delays(results, server_requests)
    for part in ("to_engine", "queued", "to_client") if delays else ():
        values = sorted(d[part] for d in delays)
        print(
            f"rate {rate:g}: {part} p50 {1000 * values[len(values) // 2]:.1f} ms, "
            f"p90 {1000 * values[9 * len(values) // 10]:.1f} ms",
            flush=True,
        )
    return served_steps(records), delays


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(Path(argv[1]), argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, required=True, help="a `kvos sim profile` JSON; the steps join it")
    parser.add_argument(
        "--out", type=Path, default=None, help="profile with served steps to write (default: --profile)"
    )
    parser.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--rates", default="2,inf", help="comma-separated requests/s; inf = all at once")
    parser.add_argument("--num-requests", type=int, default=60)
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--max-output-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--kvos-args", default="--kv-cache-memory 2GiB", help="`kvos serve` flags (the profile's)")
    parser.add_argument("--port", type=int, default=8160)
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--log-dir", default="/tmp")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    if any(not r > 0 for r in rates):
        parser.error("--rates must be > 0 (inf sends everything at once)")

    from kvos.sim.step_model import Profile, StepShape, fit_front_end, fit_linear, fit_overhead

    profile = Profile.load(args.profile)
    gguf = resolve_gguf(args.model)
    tokenizer = load_tokenizer(gguf)

    def count_tokens(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    requests = sample_requests(
        tokenizer, args.num_requests, args.max_prompt_tokens, args.max_output_tokens, seed=args.seed
    )
    hidden = hidden_tokens(
        engine_config(args.kvos_args, gguf), [r.prompt for r in requests], [r.max_tokens for r in requests]
    )
    load_before = os.getloadavg()[0]
    steps: list[dict[str, Any]] = []
    delays: list[tuple[float, float, float]] = []
    for rate in rates:
        rate_steps, rate_delays = run_rate(rate, gguf, args, requests, count_tokens)
        steps.extend(rate_steps)
        delays.extend(delay_tuples(rate, rate_delays, hidden))
    if len(steps) < 3:
        raise RuntimeError(f"only {len(steps)} busy served steps were recorded; send more requests")
    rows = breakdown(steps)
    print(format_breakdown(rows))
    served = tuple((StepShape(**s["shape"]), s["seconds"]) for s in steps if not s["new_rows"])
    print(f"served steps: {len(steps) - len(served)} of {len(steps)} ran a row count for the first time (left out)")
    worker, _ = fit_linear(profile.samples)
    print(format_first_uses(steps, worker, profile.first_use_seconds()))
    model, error = fit_overhead(worker, served)
    worker_error = [abs(worker.step_seconds(s) - s_meas) / s_meas for s, s_meas in served]
    print(
        f"served steps: {len(served)}; worker model alone: mean error {100 * statistics.fmean(worker_error):.1f}%\n"
        f"overhead fit: {asdict(model.overhead)}\n"
        f"worker + overhead against the served steps: mean {error.mean_abs_pct:.1f}%, "
        f"p90 {error.p90_abs_pct:.1f}%, max {error.max_abs_pct:.1f}%"
    )
    if any(math.isfinite(rate) for rate, _, _ in delays):
        front_end = fit_front_end(delays)
        print(
            f"front end: {1000 * front_end.to_engine_s:.1f} ms from a send to the engine, "
            f"{1000 * front_end.to_client_s:.1f} ms from a token to the client (means)"
        )
    else:
        print("front end: not fitted (it is fitted at finite rates only; add one to --rates)")
        delays = []
    info = {
        "rates": [r if math.isfinite(r) else "inf" for r in rates],
        "num_requests": args.num_requests,
        "seed": args.seed,
        "kvos_args": args.kvos_args,
        "breakdown_ms": rows,
        "load_before_after": [load_before, os.getloadavg()[0]],
    }
    out = args.out or args.profile
    with_serving = replace(profile, served=served, serving=info, front_end_delays=tuple(delays))
    out.write_text(json.dumps(with_serving.to_json(), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
