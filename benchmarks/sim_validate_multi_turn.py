"""Simulated against measured: multi-turn chat sessions, with and without the host and disk KV tiers.

The tiers scenario of `benchmarks.multi_turn` (ShareGPT conversations
replayed as chat sessions, each turn sending the whole history, a think time
between a reply and the next turn, a primary pool of a quarter of the
sessions' KV) is served by `kvos serve` and simulated by `kvos sim` with the
same sessions:

- the same think times (the same seed), sent closed-loop: a simulated turn
  goes out its think time after the simulated client read the reply before it;
- each turn's prompt as long as the server counted it (chat template
  included, from the stream's usage), its history being the turn before plus
  the reply, and its output length the one the server was asked for;
- every prompt beginning with the chat template's opening (SmolLM2's
  default system prompt), which all sessions share;
- the server's scheduler config, pool and tier sizes (`benchmarks.multi_turn`'s:
  host+disk is a host tier of an eighth of the host config's, over a disk
  tier of its size, in a fresh directory per run), the profile's step model
  and front end, and KV moves at the cost per token the profile measured on
  the real worker (profile with `--kv-offload-size`, and `--kv-disk-path`
  `--kv-disk-size`, for that), or at --copy-bandwidth / --disk-bandwidth.

With `--instances N`, each configuration is served by `kvos serve --instances N
--router R` for every router of `--routers` and simulated with the same
router over N instances (`kvos.sim` runs the cluster's router classes); each
session sends its own OpenAI `user`, which the session router keys on. The
prefix-cache hits per router are what routing decides; the timings are not
comparable there, since all N instances and the client share this machine's
cores, which a profile of one engine does not model.

Printed per configuration (tiers off, host tier, host and disk tiers): output tokens/s, TTFT of
first and of later turns, time between tokens, the prompt tokens found per
tier, the preemptions and the copy thread's time, measured (median of --repeats runs, each on a fresh
server, with their range) against simulated, with the error in %. With
`--step-scales 1.1,1.2`, each configuration is simulated again with every
step that much longer, and a second table gives the output rate and the
hits per tier of each measured run and each simulation: a figure that moves
with the step times (in a closed loop, which tier still holds a session's
history when its next turn comes) is compared at the speed the servers ran.

With `--fit-on-runs` every run is served with its engine loop instrumented
(`benchmarks.profile_serving`) and also simulated with a served-step model
fitted on that run's own steps (`benchmarks.sim_validate.fit_on_run`; the
front end and the KV moves stay the profile's): no prediction, but a check
of the tiers' books and the closed loop with the machine's drift between the
profile and the run taken out. (The run's speed window by window,
`WithRunSpeed`, is not used: a closed loop leaves the engine idle between
turns, and its steps are counted only while busy.)

Usage: python -m benchmarks.sim_validate_multi_turn --profile P.json [--json out.json]   (about a minute per repeat)
           [--configs off,host,host+disk] [--sessions 8] [--turns 3] [--max-output-tokens 32] [--think-time 1.0]
           [--repeats 1] [--step-scales 1.1,1.2] [--fit-on-runs]
           [--instances 2 --routers round-robin,least-load,prefix-aware,session] [--pool-bytes N]
The profile: `kvos sim profile --kv-offload-size 256MiB --kv-disk-path DIR --kv-disk-size 256MiB` and
`benchmarks.profile_serving` with the servers' flags (less the pool size).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import multi_turn, profile_serving
from benchmarks.peers import load_tokenizer, resolve_gguf
from benchmarks.profile_serving import engine_config
from benchmarks.serve import percentiles_ms
from benchmarks.sharegpt import load_sharegpt
from benchmarks.sim_validate import error_pct, fit_on_run, measured_median
from kvos.sim.metrics import nearest_rank_ms, tier_summary
from kvos.sim.router import CLUSTER_ROUTERS
from kvos.sim.simulator import DiskTierConfig, FleetConfig, HostTierConfig, InstanceConfig, SimResult, Simulator
from kvos.sim.step_model import Profile, StepShape, StepTimeModel
from kvos.sim.worker import CopyModel
from kvos.sim.workload import SimSession, SimTurn

CONFIGS = ("off", "host", "host+disk")

FIGURES = (
    ("output tok/s", lambda s: s["output_tok_s"]),
    ("first-turn TTFT p50 ms", lambda s: s["ttft_first_turn_ms"]["p50"]),
    ("later-turn TTFT p50 ms", lambda s: s["ttft_later_turns_ms"]["p50"]),
    ("later-turn TTFT p90 ms", lambda s: s["ttft_later_turns_ms"]["p90"]),
    ("TBT p50 ms", lambda s: s["tbt_ms"]["p50"]),
    ("TBT p90 ms", lambda s: s["tbt_ms"]["p90"]),
    ("hits primary %", lambda s: 100 * s["hit_rate_by_tier"]["primary"]),
    ("hits host %", lambda s: 100 * s["hit_rate_by_tier"]["host"]),
    ("hits disk %", lambda s: 100 * s["hit_rate_by_tier"]["disk"]),
    ("preemptions", lambda s: sum(s["preemptions_by_mode"].values())),
    ("KV copy time s", lambda s: sum(s["copy_seconds"].values()) if "copy_seconds" in s else s["copy_s"]),
)


@dataclasses.dataclass(frozen=True)
class Slowed:
    """`model` with every step `factor` times as long: which simulated figures follow the machine's speed?"""

    model: StepTimeModel
    factor: float

    def step_seconds(self, shape: StepShape) -> float:
        return self.factor * self.model.step_seconds(shape)

    def decode_steps_seconds(self, num_decodes: int, context: int, num_steps: int) -> list[float]:
        return [self.factor * t for t in self.model.decode_steps_seconds(num_decodes, context, num_steps)]

    def terms(self, shape: StepShape) -> dict[str, float]:
        return {name: self.factor * seconds for name, seconds in self.model.terms(shape).items()}

    def describe(self) -> dict[str, Any]:
        return {"kind": "slowed", "model": self.model.describe(), "factor": self.factor}


def template_prefix_tokens(tokenizer: Any) -> int:
    """Tokens every chat prompt begins with: the template's opening (SmolLM2's default system prompt)."""
    a, b = (
        tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)
        for text in ("Hello there", "What is up")
    )
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


def sim_sessions(
    plans: list[multi_turn.SessionPlan],
    delays: list[list[float]],
    results: list[multi_turn.TurnResult],
    prefix_tokens: int = 0,
) -> list[SimSession]:
    """The served sessions as the simulator takes them: prompt lengths as the server counted them, all
    beginning with the template's `prefix_tokens`, each session's tenant its OpenAI `user`."""
    prompts = {(r.session, r.turn): r.prompt_tokens for r in results if r.ok}
    sessions = []
    for i, (plan, pauses) in enumerate(zip(plans, delays)):
        turns = []
        for t, output in enumerate(plan.output_tokens):
            if (i, t) not in prompts:
                raise RuntimeError(f"session {i} turn {t} failed on the server; nothing to compare it with")
            turns.append(SimTurn(prompts[(i, t)], output, pauses[t] if t else 0.0))
        sessions.append(
            SimSession(pauses[0], tuple(turns), tenant=multi_turn.session_user(i), prefix_tokens=prefix_tokens)
        )
    return sessions


def summarize_sessions(result: SimResult, sessions: list[SimSession]) -> dict[str, Any]:
    """`multi_turn.summarize`'s figures for a simulated run (every request is a session turn)."""
    times = result.times
    first_turns = set()
    k = 0
    for session in sessions:
        first_turns.add(k)
        k += len(session.turns)
    ttft = [times.first_token_s[k] - times.arrival_s[k] for k in range(len(times.arrival_s))]
    output = sum(times.num_output_tokens)
    return {
        "output_tokens": output,
        "output_tok_s": output / result.end_s if result.end_s else 0.0,
        "ttft_first_turn_ms": percentiles_ms([t for k, t in enumerate(ttft) if k in first_turns]),
        "ttft_later_turns_ms": percentiles_ms([t for k, t in enumerate(ttft) if k not in first_turns]),
        "tbt_ms": nearest_rank_ms(times.itl_s),
        "failed": len(times.rejected) + len(times.abandoned),
        **tier_summary(result.instances),
    }


def format_table(rows: list[tuple[str, list[dict[str, Any]], dict[str, Any]]]) -> str:
    """Per config and figure: measured (median of the runs, their range), simulated (error), and with
    --fit-on-runs the median of the runs' simulations with their own steps (`simulated["fitted_on_runs"]`)."""
    fitted = any(simulated.get("fitted_on_runs") for _, _, simulated in rows)
    header = f"{'config':<22} {'figure':<24} {'measured':>10} {'runs range':>17} {'simulated':>10} {'error':>8}" + (
        f"   {'fit on run':>10} {'error':>8}" if fitted else ""
    )
    lines = [header, "-" * len(header)]
    for name, runs, simulated in rows:
        for figure, pick in FIGURES:
            m, spread = measured_median([pick(run) for run in runs])
            s = pick(simulated)
            line = f"{name:<22} {figure:<24} {m:>10.1f} {spread:>17} {s:>10.1f} {error_pct(m, s):>+7.1f}%"
            if fitted:
                f, _ = measured_median([pick(sim) for sim in simulated["fitted_on_runs"]])
                line += f"   {f:>10.1f} {error_pct(m, f):>+7.1f}%"
            lines.append(line)
    return "\n".join(lines)


def format_scaled(rows: list[tuple[str, list[dict[str, Any]], dict[str, Any]]]) -> str:
    """Output rate and hits per tier, measured against simulated with steps as profiled and scaled."""
    header = f"{'config':<22} {'steps x':>8} {'output tok/s':>13} {'hits primary / host / disk %':>30}"
    lines = [header, "-" * len(header)]

    def line(name: str, label: str, summary: dict[str, Any]) -> str:
        hits = " / ".join(f"{100 * summary['hit_rate_by_tier'][t]:.1f}" for t in ("primary", "host", "disk"))
        return f"{name:<22} {label:>8} {summary['output_tok_s']:>13.1f} {hits:>30}"

    for name, runs, simulated in rows:
        lines.extend(line(name, "measured", run) for run in runs)
        lines.append(line(name, "1", simulated))
        lines.extend(line(name, f"{factor:g}", s) for factor, s in simulated["step_scaled"].items())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, required=True, help="a profile with served steps, same flags")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-user-tokens", type=int, default=300)
    parser.add_argument("--max-output-tokens", type=int, default=32)
    parser.add_argument("--think-time", type=float, default=1.0, help="mean seconds between a reply and the next turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--configs",
        default="off,host",
        help="comma-separated: off (pool only), host (host tier), host+disk (a small host tier over a disk tier)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="measured runs per config, each on a fresh server")
    parser.add_argument("--serve-flags", default="", help="`kvos serve` flags (the profile's, less the pool size)")
    parser.add_argument(
        "--pool-bytes", type=int, default=None, help="KV pool per instance (default: a quarter of the sessions' KV)"
    )
    parser.add_argument("--instances", type=int, default=1, help="engine instances behind the server's router")
    parser.add_argument("--routers", default="least-load", help="with --instances > 1: comma-separated routers")
    parser.add_argument(
        "--copy-bandwidth", type=float, default=None, help="bytes/s of host-tier moves (default: the profile's)"
    )
    parser.add_argument(
        "--disk-bandwidth", type=float, default=None, help="bytes/s of disk-tier moves (default: the profile's)"
    )
    parser.add_argument("--log-dir", default=None, help="server logs (default: a temporary directory)")
    parser.add_argument(
        "--step-scales",
        default="",
        help="comma-separated factors: also simulate each config with every step that much longer (a diagnostic)",
    )
    parser.add_argument(
        "--fit-on-runs",
        action="store_true",
        help="serve on instrumented servers and also simulate each run with step times fitted on it",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not configs or any(c not in CONFIGS for c in configs):
        parser.error(f"--configs takes some of {', '.join(CONFIGS)}, got {args.configs!r}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.instances < 1:
        parser.error(f"--instances must be >= 1, got {args.instances}")
    routers = [r.strip() for r in args.routers.split(",") if r.strip()] if args.instances > 1 else [""]
    unknown = [r for r in routers if r and r not in CLUSTER_ROUTERS]
    if unknown or not routers:
        parser.error(f"--routers takes {', '.join(CLUSTER_ROUTERS)}, got {args.routers!r}")
    try:
        scales = [float(f) for f in args.step_scales.split(",") if f.strip()]
    except ValueError:
        parser.error(f"--step-scales takes comma-separated numbers, got {args.step_scales!r}")
    if any(not f > 0 for f in scales):
        parser.error(f"--step-scales must be > 0, got {args.step_scales!r}")
    args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="kvos-sim-mt-")
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    serve_flags = shlex.split(args.serve_flags)

    gguf = resolve_gguf(None)
    profile = Profile.load(args.profile)
    step_model = profile.step_model()
    bytes_per_token = multi_turn.kv_bytes_per_token(serve_flags)
    moves = {}
    for tier, bandwidth, flags in (
        ("host", args.copy_bandwidth, "--kv-offload-size"),
        ("disk", args.disk_bandwidth, "--kv-disk-path and --kv-disk-size"),
    ):
        if bandwidth:
            moves[tier] = CopyModel.from_bandwidth(bytes_per_token, bandwidth)
        elif f"{tier}_copy" in profile.engine:
            moves[tier] = CopyModel(**profile.engine[f"{tier}_copy"])
        elif any(tier in c for c in configs):
            parser.error(f"the profile has no {tier}-tier moves (profile with {flags}) and no bandwidth for them")
        else:
            moves[tier] = CopyModel()
    print(f"step model: {step_model.describe()}\nfront end: {profile.front_end()}\nKV moves: {moves}")

    tokenizer = load_tokenizer(gguf)
    plans = multi_turn.plan_sessions(
        tokenizer, load_sharegpt(), args.sessions, args.turns, args.max_user_tokens, args.max_output_tokens, args.seed
    )
    delays = multi_turn.think_delays(plans, args.think_time, args.seed)
    prefix_tokens = template_prefix_tokens(tokenizer)
    pool, host = multi_turn.tier_sizes(plans, bytes_per_token)
    pool = args.pool_bytes or pool
    serve_args = argparse.Namespace(log_dir=args.log_dir, think_time=args.think_time, seed=args.seed)
    """What `multi_turn.serve_sessions` reads from its own command line."""
    config = engine_config(args.serve_flags, gguf)
    block_size = int(profile.engine["block_size"])

    load_before = os.getloadavg()[0]
    rows = []
    for tier, router in ((t, r) for t in configs for r in routers):
        name = f"{tier}/{router}" if router else tier
        host_bytes = host // 8 if tier == "host+disk" else host
        flags = ["--kv-cache-memory", str(pool), *serve_flags]
        if tier != "off":
            flags += ["--kv-offload-size", str(host_bytes)]
        if router:
            flags += ["--instances", str(args.instances), "--router", router]
        runs, results, run_models = [], [], []
        for run in range(args.repeats):
            log_name = f"{name.replace('/', '-').replace('+', '-')}-{run}"
            disk_dir = tempfile.mkdtemp(prefix="kvos-sim-mt-disk-", dir=args.log_dir)  # every run starts empty
            disk = ["--kv-disk-path", disk_dir, "--kv-disk-size", str(host)] if tier == "host+disk" else []
            trace = Path(args.log_dir) / f"{log_name}-trace.jsonl" if args.fit_on_runs else None
            summary, turn_results = multi_turn.serve_sessions(log_name, [*flags, *disk], plans, serve_args, trace)
            shutil.rmtree(disk_dir, ignore_errors=True)
            if trace is not None:
                records, _ = profile_serving.read_trace(trace, Path(args.log_dir) / f"{log_name}.log")
                run_models.append(fit_on_run(profile_serving.served_steps(records)))
            runs.append(summary)
            results.append(turn_results)
        sessions = sim_sessions(plans, delays, results[0], prefix_tokens)
        instance = InstanceConfig(
            scheduler=config.scheduler,
            kv_capacity_tokens=pool // bytes_per_token,
            block_size=block_size,
            max_model_len=int(profile.engine["max_model_len"]),
            enable_prefix_caching=config.cache.enable_prefix_caching,
            front_end=profile.front_end(),
            first_use_s=profile.first_use_seconds(),
            host=HostTierConfig(host_bytes // bytes_per_token, moves["host"]) if tier != "off" else None,
            disk=DiskTierConfig(host // bytes_per_token, moves["disk"]) if tier == "host+disk" else None,
        )
        fleet = FleetConfig(instance, args.instances, router) if router else FleetConfig(instance)
        result = Simulator(fleet, step_model).run([], sessions)
        simulated = summarize_sessions(result, sessions)
        if run_models:
            # Each run's sessions as that run's server counted them, at that run's own step times.
            simulated["fitted_on_runs"] = []
            for model, turn_results in zip(run_models, results):
                run_sessions = sim_sessions(plans, delays, turn_results, prefix_tokens)
                run_result = Simulator(fleet, model).run([], run_sessions)
                simulated["fitted_on_runs"].append(summarize_sessions(run_result, run_sessions))
            simulated["fits"] = [model.describe() for model in run_models]
        rows.append((name, runs, simulated))
        for factor in scales:
            slowed = summarize_sessions(Simulator(fleet, Slowed(step_model, factor)).run([], sessions), sessions)
            simulated.setdefault("step_scaled", {})[factor] = slowed
        # Per turn, for a closer look: each measured run's, and the simulation's (in the same order).
        for run, turn_results in zip(runs, results):
            run["turn_results"] = [dataclasses.asdict(r) for r in turn_results]
        simulated["turn_times"] = [
            {"sent_s": a, "ttft_s": f - a, "latency_s": last - a}
            for a, f, last in zip(result.times.arrival_s, result.times.first_token_s, result.times.last_token_s)
        ]
    print(format_table(rows))
    if scales:
        print(format_scaled(rows))
    print(f"1-minute load average before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f}")
    if args.json is not None:
        report = {
            "date": datetime.date.today().isoformat(),
            "config": {k: str(v) for k, v in vars(args).items()},
            "step_model": step_model.describe(),
            "front_end": dataclasses.asdict(profile.front_end()),
            "kv_bytes_per_token": bytes_per_token,
            "copy": {tier: dataclasses.asdict(m) for tier, m in moves.items()},
            "pool_tokens": pool // bytes_per_token,
            "host_tokens": host // bytes_per_token,
            "results": {name: {"measured_runs": runs, "simulated": sim} for name, runs, sim in rows},
        }
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
