"""Simulated against measured: the serving sweep's requests at several rates, through `kvos serve` and `kvos sim`.

1. Profile this machine's engine with the flags the server will run with
   (`kvos sim profile`, the full grid: saturation runs decode batches of 64, which the quick grid's 32
   leaves to extrapolation), unless given --profile.
2. Unless the profile has them, profile served steps and the front end
   (`benchmarks.profile_serving`, on other requests: seed 1) into the profile.
3. For each rate, start `kvos serve` fresh and replay the ShareGPT requests
   with `benchmarks.serve` (via `benchmarks.serve_sweep.run_one`).
4. Simulate the same requests at the same Poisson arrival times (the same
   seed gives the same gaps) on an instance with the server's scheduler
   config and KV capacity, twice: with the worker's step model alone and
   with the serving overhead and the front end added (what `kvos sim
   --profile` uses).
5. Print measured and simulated throughput and p50/p90 TTFT and TPOT per
   rate, with the error in % (issue 14's targets: throughput within 5%,
   latencies within 10%), and write it all as JSON with --json. With
   --repeats N the error is against the median of N measured runs, whose
   range is shown: on this shared 2-core VM one run's figures can differ
   from the next's by 10-30%.
6. With --fit-on-runs, every measured run is served by an instrumented
   server (`benchmarks.profile_serving`'s engine loop records) and is also
   simulated with step times and a front end fitted on that run's own
   steps and requests, the requests reaching the engine in the order they
   did (`InstrumentedRun.engine_order`). That is no prediction: it checks
   the simulator's scheduling, batching and queueing alone, with the
   machine's drift between a profile and the runs taken out (the VM's
   speed moves by more than the 10% target within minutes). A third
   column takes the drift within the run out too: each step at the run's
   speed around that step (`WithRunSpeed`, windows of `SPEED_WINDOW` steps).

Usage: python -m benchmarks.sim_validate --json sim-validate.json   (defaults: about 8 minutes on 2 idle cores)
           [--rates 1,2,4,inf] [--num-requests 80] [--kvos-args "--kv-cache-memory 2GiB"] [--profile P.json]
       python -m benchmarks.sim_validate --smoke   (a few requests, tiny profile grid: checks the plumbing only)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import profile_serving, serve_sweep
from benchmarks.peers import load_tokenizer, resolve_gguf
from benchmarks.profile_serving import engine_config
from benchmarks.sharegpt import sample_requests
from kvos.config import EngineConfig
from kvos.sim.metrics import summarize_sim
from kvos.sim.profile import GRIDS, profile_engine
from kvos.sim.simulator import FleetConfig, InstanceConfig, Simulator, VirtualCacheConfig
from kvos.sim.step_model import (
    FrontEnd,
    Profile,
    ServedStepModel,
    StepShape,
    StepTimeModel,
    fit_front_end,
    fit_linear,
    fit_overhead,
)
from kvos.sim.workload import SimRequest, arrival_times, with_arrivals

DEFAULT_KVOS_ARGS = "--kv-cache-memory 2GiB"
"""float32 without --compile: no compilation at each of the six server start-ups, so the run fits in minutes."""
FIGURES = (
    ("output tok/s", lambda s: s["output_throughput"]),
    ("TTFT p50 ms", lambda s: s["ttft_ms"]["p50"]),
    ("TTFT p90 ms", lambda s: s["ttft_ms"]["p90"]),
    ("TPOT p50 ms", lambda s: s["tpot_ms"]["p50"]),
    ("TPOT p90 ms", lambda s: s["tpot_ms"]["p90"]),
)


def instance_config(config: EngineConfig, profile: Profile) -> InstanceConfig:
    """The simulated instance of the server `config` describes: its scheduler, the profile's KV books and front end."""
    return InstanceConfig(
        scheduler=config.scheduler,
        kv_capacity_tokens=int(profile.engine["kv_capacity_tokens"]),
        block_size=int(profile.engine["block_size"]),
        max_model_len=int(profile.engine["max_model_len"]),
        enable_prefix_caching=config.cache.enable_prefix_caching,
        front_end=profile.front_end(),
        first_use_s=profile.first_use_seconds(),
        virtual=VirtualCacheConfig.of_profile(profile.engine) if config.cache.kv_cache == "virtual" else None,
    )


def error_pct(measured: float, simulated: float) -> float:
    return 100.0 * (simulated - measured) / measured if measured else math.nan


def measured_median(values: list[float]) -> tuple[float, str]:
    """The median of a figure over the measured runs, and their range as text ('' for a single run)."""
    return statistics.median(values), f"{min(values):.1f}-{max(values):.1f}" if len(values) > 1 else ""


@dataclass
class RateResult:
    """One rate's measured runs and its simulations."""

    rate: str
    runs: list[dict[str, Any]]
    served: dict[str, Any]
    """Simulated with the profile's served-step model and front end."""
    worker: dict[str, Any]
    """Simulated with the profile's worker model alone, no front end."""
    fitted: list[dict[str, Any]] = field(default_factory=list)
    """With --fit-on-runs: each run simulated with step times and a front end fitted on that run."""
    sped: list[dict[str, Any]] = field(default_factory=list)
    """With --fit-on-runs: the same, each step at the run's speed around it (`WithRunSpeed`)."""


def format_table(rows: list[RateResult]) -> str:
    """Per rate and figure: measured (the median of the runs, and their range), simulated with the serving
    overhead and front end (error against the median), worker only (error), and with --fit-on-runs the
    median of the runs' simulations fitted on themselves (error), then with the runs' speed too."""
    fitted = any(row.fitted for row in rows)
    header = (
        f"{'rate':>5} {'figure':<13} {'measured':>10} {'runs range':>17} {'simulated':>10} {'error':>8}   "
        f"{'worker only':>11} {'error':>8}"
        + (f"   {'fit on run':>10} {'error':>8}   {'+ run speed':>11} {'error':>8}" if fitted else "")
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        for name, pick in FIGURES:
            m, spread = measured_median([pick(run) for run in row.runs])
            s, w = pick(row.served), pick(row.worker)
            line = (
                f"{row.rate:>5} {name:<13} {m:>10.1f} {spread:>17} {s:>10.1f} {error_pct(m, s):>+7.1f}%   "
                f"{w:>11.1f} {error_pct(m, w):>+7.1f}%"
            )
            if fitted:
                f = statistics.median(pick(sim) for sim in row.fitted)
                v = statistics.median(pick(sim) for sim in row.sped)
                line += f"   {f:>10.1f} {error_pct(m, f):>+7.1f}%   {v:>11.1f} {error_pct(m, v):>+7.1f}%"
            lines.append(line)
    return "\n".join(lines)


@dataclass
class InstrumentedRun:
    """A measured run on an instrumented server, with what the engine saw of it."""

    summary: dict[str, Any]
    """The client's figures, as `benchmarks.serve` reports them."""
    steps: list[dict[str, Any]]
    """The served steps (`profile_serving.served_steps`)."""
    delays: list[dict[str, float]]
    """Each request's front-end delays (`profile_serving.front_end_delays`)."""
    engine_order: list[int]
    """The requests (indices into the replayed list) in the order the engine queued them: a burst sent at
    once reaches the engine in any order, and with first-come first-served that order sets each TTFT."""

    @classmethod
    def read(cls, summary: dict[str, Any], clients: list[Any], trace: Path, log: Path) -> InstrumentedRun:
        """The run of a stopped instrumented server: its trace matched with the client's results (`clients`,
        `benchmarks.serve.RequestResult`s in the order the engine order's indices refer to)."""
        records, server_requests = profile_serving.read_trace(trace, log)
        matched = profile_serving.match_requests(clients, server_requests)
        return cls(
            summary,
            profile_serving.served_steps(records),
            profile_serving.delays_of(clients, matched),
            [k for k, _ in sorted(matched, key=lambda m: m[1]["queued"])],
        )


def run_instrumented(
    rate: float, run: int, gguf: Path, args: argparse.Namespace, requests: list, count_tokens: Any, port: int
) -> InstrumentedRun:
    """Serve the requests at `rate` on a fresh instrumented server (`benchmarks.profile_serving`); its trace
    and log stay in the log folder, named by rate and run."""
    key = "inf" if math.isinf(rate) else f"{rate:g}"
    trace = Path(args.log_dir) / f"kvos-validate-trace-{key}-{run}.jsonl"
    log = Path(args.log_dir) / f"kvos-validate-{key}-{run}.log"
    url = f"http://127.0.0.1:{port}"
    command = profile_serving.instrumented_command(trace, gguf, port, args.kvos_args)
    with serve_sweep.running_server(
        command, url, log, args.start_timeout, stop_timeout_s=profile_serving.STOP_TIMEOUT_S
    ):
        summary, results = serve_sweep.replay(url, rate, args, requests, count_tokens)
    return InstrumentedRun.read(summary, results, trace, log)


def in_engine_order(requests: list[SimRequest], order: list[int]) -> list[SimRequest]:
    """The requests in the order the engine took them (`order`, every index once), each arriving when
    it was sent or, if sent before one queued ahead of it, at that one's arrival (sends a moment apart
    that swapped places on the way)."""
    if sorted(order) != list(range(len(requests))):
        raise ValueError(f"order must name each of the {len(requests)} requests once, got {order}")
    ordered: list[SimRequest] = []
    for k in order:
        arrival = max(requests[k].arrival_s, ordered[-1].arrival_s if ordered else 0.0)
        ordered.append(dataclasses.replace(requests[k], arrival_s=arrival))
    return ordered


def fit_on_run(steps: list[dict[str, Any]]) -> ServedStepModel:
    """A served-step model fitted on one run's own steps: the worker on `Worker.execute`'s times, the
    overhead on the rest of each step's served time. Steps that ran a row count for the first time are left
    out: the simulated worker adds the profile's first-use cost to those."""
    steps = [step for step in steps if not step["new_rows"]]
    worker, _ = fit_linear([(StepShape(**step["shape"]), step["worker"]) for step in steps])
    model, _ = fit_overhead(worker, [(StepShape(**step["shape"]), step["seconds"]) for step in steps])
    return model


SPEED_WINDOW = 100
"""Steps per window of `in_run_speed`: long enough that a window's sum is not one step's noise, short
enough to follow this VM's drift (a fairness run's 2,300 steps took about a minute)."""


def in_run_speed(model: StepTimeModel, steps: list[dict[str, Any]], window: int = SPEED_WINDOW) -> list[float]:
    """How fast the machine ran through a run, window by window: each `window` consecutive served steps'
    measured time over what `model` gives them."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    scales = []
    for start in range(0, len(steps), window):
        part = steps[start : start + window]
        modelled = sum(model.step_seconds(StepShape(**step["shape"])) for step in part)
        scales.append(sum(step["seconds"] for step in part) / modelled)
    return scales


@dataclass
class WithRunSpeed:
    """A run's fitted model, its k-th step scaled by `in_run_speed` at the measured run's k-th step.

    A fitted model has one speed, and this VM's can move by 10-20% within a
    run: a fairness run's first thousand steps took 11-14% longer than its
    fit, the last thousand 10-21% less, so the queue built up early and the
    light tenant's median wait came out half the measured one. The steps are
    counted in order, which follows the measured run only while both are
    busy (an idle moment's last step is not a served step): meant for runs
    near saturation, and for a simulator taking its steps one by one
    (`Simulator(..., decode_runs=False)`), so that each is asked for once.
    """

    model: StepTimeModel
    scales: list[float]
    window: int = SPEED_WINDOW
    taken: int = 0

    def step_seconds(self, shape: StepShape) -> float:
        scale = self.scales[min(self.taken // self.window, len(self.scales) - 1)]
        self.taken += 1
        return self.model.step_seconds(shape) * scale

    def decode_steps_seconds(self, num_decodes: int, context: int, num_steps: int) -> list[float]:
        raise NotImplementedError("WithRunSpeed counts steps one by one: simulate with decode_runs=False")

    def terms(self, shape: StepShape) -> dict[str, float]:
        """The model's terms at the speed of the steps taken so far (asking counts no step)."""
        scale = self.scales[min(self.taken // self.window, len(self.scales) - 1)]
        return {name: seconds * scale for name, seconds in self.model.terms(shape).items()}

    def describe(self) -> dict[str, Any]:
        return {"kind": "with_run_speed", "model": self.model.describe(), "window": self.window, "scales": self.scales}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--rates", default="1,2,4,inf", help="comma-separated requests/s; inf = all at once")
    parser.add_argument("--num-requests", type=int, default=80)
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--max-output-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ttft-slo", type=float, default=2.0, help="seconds")
    parser.add_argument("--tpot-slo", type=float, default=0.2, help="seconds")
    parser.add_argument("--kvos-args", default=DEFAULT_KVOS_ARGS, help="`kvos serve` flags; the profile uses them too")
    parser.add_argument(
        "--profile", type=Path, default=None, help="a `kvos sim profile` JSON made with --kvos-args (steps are added)"
    )
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full", help="profile grid when profiling here")
    parser.add_argument(
        "--serving-requests", type=int, default=40, help="requests per rate (2, inf) for the served-step profile"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measured runs per rate, each on a fresh server; errors are against their median",
    )
    parser.add_argument(
        "--fit-on-runs",
        action="store_true",
        help="serve on instrumented servers and also simulate each run with step times fitted on it",
    )
    parser.add_argument("--port", type=int, default=8150)
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for a server")
    parser.add_argument("--log-dir", default="/tmp", help="where each server's output goes")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="4 short requests, 2 rates, eager float32, tiny grid")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rates, args.num_requests, args.max_prompt_tokens, args.max_output_tokens = "4,inf", 4, 64, 16
        args.kvos_args, args.grid, args.serving_requests = "--kv-cache-memory 256MiB", "smoke", 4
    rates = [float(r) for r in args.rates.split(",")]
    if any(not r > 0 for r in rates):
        parser.error("--rates must be > 0 (inf sends everything at once)")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")

    gguf = resolve_gguf(args.model)
    config = engine_config(args.kvos_args, gguf)
    if args.profile is None:
        print("profiling the engine (kvos sim profile) ...", flush=True)
        profile = profile_engine(config, GRIDS[args.grid])
        args.profile = Path(tempfile.mkstemp(prefix="kvos-profile-", suffix=".json")[1])
        args.profile.write_text(json.dumps(profile.to_json(), indent=2) + "\n")
        print(f"profile written to {args.profile}")
    profiled = Profile.load(args.profile)
    if not (profiled.served and profiled.front_end_delays):
        print("profiling served steps (benchmarks.profile_serving) ...", flush=True)
        profile_serving.main(
            ["--profile", str(args.profile), "--num-requests", str(args.serving_requests)]
            + ["--kvos-args", args.kvos_args, "--model", str(gguf), "--port", str(args.port + 10)]
            + ["--log-dir", args.log_dir, "--max-prompt-tokens", str(args.max_prompt_tokens)]
            + ["--max-output-tokens", str(args.max_output_tokens)]
        )
    profile = Profile.load(args.profile)
    worker_model, fit = fit_linear(profile.samples)
    step_model = profile.step_model()
    print(f"step model: {step_model.describe()}\nworker fit error: {fit}")
    instance = instance_config(config, profile)
    print(f"front end: {instance.front_end}")

    tokenizer = load_tokenizer(gguf)

    def count_tokens(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    requests = sample_requests(
        tokenizer, args.num_requests, args.max_prompt_tokens, args.max_output_tokens, seed=args.seed
    )
    lengths = [(len(r.prompt_token_ids), r.max_tokens) for r in requests]
    # The sweep's client sends token ids (`serve_sweep.replay`).
    hidden = profile_serving.hidden_tokens(
        config, [list(r.prompt_token_ids) for r in requests], [r.max_tokens for r in requests]
    )
    sweep_args = argparse.Namespace(
        port=args.port,
        log_dir=args.log_dir,
        kvos_args=args.kvos_args,
        start_timeout=args.start_timeout,
        seed=args.seed,
        ttft_slo=args.ttft_slo,
        tpot_slo=args.tpot_slo,
    )
    load_before = os.getloadavg()[0]
    rows: list[RateResult] = []
    finite_delays: list[tuple[float, float, float]] = []
    """With --fit-on-runs: every request's front-end delays at the finite rates so far (a burst's say little)."""
    fits: list[dict[str, Any]] = []
    for rate in rates:
        key = "inf" if math.isinf(rate) else f"{rate:g}"
        sim_requests = with_arrivals(lengths, arrival_times(len(lengths), rate, "poisson", seed=args.seed), hidden)
        runs, fitted, sped = [], [], []
        for run in range(args.repeats):
            print(f"rate {key}: kvos serve (run {run + 1} of {args.repeats}) ...", flush=True)
            if not args.fit_on_runs:
                runs.append(serve_sweep.run_one("kvos", rate, gguf, sweep_args, requests, count_tokens))
                continue
            measured = run_instrumented(rate, run, gguf, sweep_args, requests, count_tokens, args.port + 20)
            runs.append(measured.summary)
            run_delays = profile_serving.delay_tuples(rate, measured.delays, hidden)
            if math.isfinite(rate):
                finite_delays.extend(run_delays)
                front_end = fit_front_end(run_delays)
            elif finite_delays:  # a burst's delays are its queue, not the front end's: the finite rates' so far
                front_end = fit_front_end(finite_delays)
            else:
                front_end = instance.front_end
            run_model = fit_on_run(measured.steps)
            run_speed = WithRunSpeed(run_model, in_run_speed(run_model, measured.steps))
            fits.append(
                {
                    "rate": key,
                    "steps": len(measured.steps),
                    "engine_order": measured.engine_order,
                    "delays": measured.delays,
                    "model": run_speed.describe(),
                    "front_end": dataclasses.asdict(front_end),
                }
            )
            run_fleet = FleetConfig(dataclasses.replace(instance, front_end=front_end))
            ordered = in_engine_order(sim_requests, measured.engine_order)
            for out, simulator in (
                (fitted, Simulator(run_fleet, run_model)),
                (sped, Simulator(run_fleet, run_speed, decode_runs=False)),
            ):
                out.append(summarize_sim(simulator.run(ordered), args.ttft_slo, args.tpot_slo))
        bare = dataclasses.replace(instance, front_end=FrontEnd())
        served, worker = (
            summarize_sim(Simulator(FleetConfig(where), model).run(sim_requests), args.ttft_slo, args.tpot_slo)
            for where, model in ((instance, step_model), (bare, worker_model))
        )
        rows.append(RateResult(key, runs, served, worker, fitted, sped))
    print(format_table(rows))
    print(f"1-minute load average before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f}")
    if args.json is not None:
        report = {
            "date": datetime.date.today().isoformat(),
            "model": gguf.name,
            "config": {k: str(v) for k, v in vars(args).items()},
            "profile_engine": profile.engine,
            "step_model": step_model.describe(),
            "front_end": dataclasses.asdict(instance.front_end),
            "serving_profile": profile.serving,
            "results": {
                row.rate: {
                    "measured_runs": row.runs,
                    "simulated": row.served,
                    "simulated_worker_only": row.worker,
                    "simulated_fitted_on_runs": row.fitted,
                    "simulated_fitted_with_run_speed": row.sped,
                }
                for row in rows
            },
            "fits_on_runs": fits,
        }
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
