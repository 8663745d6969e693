"""`kvos sim run | plan | profile | build`: the simulator's command line (run from the repository root)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from kvos.config import DTYPE_BYTES, SCHEDULING_POLICIES, SchedulerConfig, SchedulingPolicyName
from kvos.sim.repo import benchmarks

logger = logging.getLogger(__name__)


def add_sim_parser(sub: Any) -> None:
    """Register `kvos sim` and its three subcommands on the top-level CLI's subparsers."""
    sim = sub.add_parser("sim", help="simulate serving with kvos's own scheduler (run from the repository root)")
    commands = sim.add_subparsers(dest="sim_command", required=True)

    run = commands.add_parser("run", help="simulate a workload at one or more rates; JSON report and goodput PNG")
    _add_model_args(run)
    _add_workload_args(run)
    _add_fleet_args(run)
    run.add_argument(
        "--rates", default="1", help="comma-separated requests/s (ignored with --trace); inf = all at once"
    )
    _add_jobs_arg(run, "rates")
    run.add_argument("--json", type=Path, default=None, help="write the report here")
    run.add_argument("--plot", type=Path, default=None, help="write goodput against rate here (PNG)")
    run.add_argument(
        "--breakdown",
        action="store_true",
        help="report each run's busy time split into the step-time model's terms (slower: it visits every "
        "simulated step)",
    )
    run.set_defaults(func=cmd_run)

    plan = commands.add_parser(
        "plan", help="fewest instances that meet the SLOs at a rate, per layout, router and policy"
    )
    _add_model_args(plan)
    _add_workload_args(plan)
    _add_fleet_args(plan, several=True)
    plan.add_argument("--rate", type=float, required=True, help="requests/s offered to the whole fleet")
    plan.add_argument("--attainment", type=float, default=0.9, help="fraction of requests that must meet both SLOs")
    plan.add_argument("--max-instances", type=int, default=4096)
    plan.add_argument(
        "--disaggregated", action="store_true", help="also size prefill/decode-disaggregated fleets (needs a link)"
    )
    _add_jobs_arg(plan, "searches (one per layout, router and policy)")
    plan.add_argument("--json", type=Path, default=None)
    plan.set_defaults(func=cmd_plan)

    from kvos.entrypoints.cli import add_engine_args

    profile = commands.add_parser("profile", help="time this machine's real engine steps and fit a step-time model")
    add_engine_args(profile)
    profile.add_argument("--out", type=Path, required=True, help="profile JSON to write")
    profile.add_argument(
        "--grid",
        choices=["full", "quick", "smoke"],
        default="full",
        help="points timed: full (76), quick (27, for validation runs) or smoke (14, one repeat: a plumbing check)",
    )
    profile.set_defaults(func=cmd_profile)

    build = commands.add_parser(
        "build", help="compile the simulator's hot path with mypyc (needs mypy and a C compiler); run and plan use it"
    )
    build.set_defaults(func=cmd_build)


def _add_jobs_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help=f"{what} simulated at once, each in a process of its own (default: one per CPU)",
    )


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("step-time model (one of --profile or --hardware)")
    group.add_argument("--profile", type=Path, default=None, help="a `kvos sim profile` JSON: its fitted linear model")
    group.add_argument("--hardware", type=Path, default=None, help="hardware JSON for the roofline model")
    group.add_argument("--arch", default=None, help="roofline: model config.json or .gguf (default: kvos's default)")
    group.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="float32", help="roofline: compute dtype")
    group.add_argument("--quantization", choices=["int8", "int4"], default=None, help="roofline: weight format")
    group.add_argument(
        "--calibrate", type=Path, default=None, help="roofline: profile whose steps set the efficiencies"
    )
    group.add_argument(
        "--first-use-ms",
        type=float,
        default=None,
        help="ms a step pays once more the first time its instance runs its row count (default: the profile's "
        "measured first use, else 0; 0 asks what an engine that builds its kernels up front would do)",
    )
    group.add_argument(
        "--overlap-host",
        action="store_true",
        help="what-if: the engine's own time per step (the profile's served steps) overlaps the device's, as "
        "async scheduling does: a step takes the longer of the two instead of their sum",
    )


def _add_workload_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload (ShareGPT lengths unless --trace or --fixed-lengths)")
    group.add_argument("--trace", type=Path, default=None, help="JSONL: arrival_s, prompt_tokens, output_tokens, ...")
    group.add_argument("--fixed-lengths", default=None, help="'PROMPT,OUTPUT': every request the same size")
    group.add_argument("--num-requests", type=int, default=200)
    group.add_argument("--max-prompt-tokens", type=int, default=512)
    group.add_argument("--max-output-tokens", type=int, default=128)
    group.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    group.add_argument("--cv", type=float, default=1.0, help="gamma arrivals: coefficient of variation of the gaps")
    group.add_argument("--seed", type=int, default=0, help="fixes the sampled requests and the arrival times")
    group.add_argument("--ttft-slo", type=float, default=2.0, help="seconds")
    group.add_argument("--tpot-slo", type=float, default=0.2, help="seconds")


def _add_fleet_args(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """Fleet flags; with `several`, --router and --scheduling-policy take comma-separated lists to compare."""
    from kvos.cluster.config import add_disaggregation_args, add_placement_args
    from kvos.sim import ROUTERS

    d = SchedulerConfig()
    group = parser.add_argument_group("fleet (instance sizes default to the profile's engine)")
    if several:
        group.add_argument("--router", default="round-robin", help=f"comma-separated, of {', '.join(ROUTERS)}")
        group.add_argument(
            "--scheduling-policy", default=d.policy, help=f"comma-separated, of {', '.join(SCHEDULING_POLICIES)}"
        )
    else:
        group.add_argument("--num-instances", type=int, default=1)
        add_disaggregation_args(group)  # instances = P + D, overriding --num-instances
        group.add_argument("--router", choices=list(ROUTERS), default="round-robin")
        group.add_argument("--scheduling-policy", choices=list(SCHEDULING_POLICIES), default=d.policy)
    add_placement_args(group)
    group.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    group.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    group.add_argument("--kv-capacity-tokens", type=int, default=None, help="KV cache size per instance, tokens")
    group.add_argument(
        "--kv-cache",
        choices=["paged", "virtual"],
        default=None,
        help="the paged pool or the virtual cache (default: the profile's engine's, else paged)",
    )
    group.add_argument(
        "--page-size",
        type=int,
        default=None,
        help="virtual cache: bytes per page (default: the profile's engine's; 4096 on a host, 2 MiB on a GPU)",
    )
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument(
        "--host-capacity-tokens", type=int, default=None, help="a host KV tier per instance of this many tokens"
    )
    group.add_argument(
        "--copy-bandwidth",
        type=float,
        default=None,
        help="host tier: bytes/s of KV moves (default: the profile's measured moves, else free)",
    )
    group.add_argument("--preemption-mode", choices=["swap", "recompute"], default="swap", help="with a host tier")
    group.add_argument(
        "--disk-capacity-tokens",
        type=int,
        default=None,
        help="a disk KV tier per instance of this many tokens (below the host tier, if any)",
    )
    group.add_argument(
        "--disk-bandwidth",
        type=float,
        default=None,
        help="disk tier: bytes/s of KV moves (default: the profile's measured moves, else free)",
    )
    group.add_argument(
        "--link-bandwidth",
        type=float,
        default=None,
        help="KV between instances (migration, disaggregation; both need it): bytes/s",
    )
    group.add_argument("--link-latency", type=float, default=0.0, help="KV between instances: per transfer, seconds")
    group.add_argument(
        "--kv-bytes-per-token",
        type=int,
        default=None,
        help="KV moves (host and disk tiers, migration, disaggregation): bytes per token "
        "(default: the profile's engine, or --arch at --dtype)",
    )


# -- building the pieces ---------------------------------------------------------------


def _profile(args: argparse.Namespace) -> Any:
    """The profile that describes the engine (--profile, or the roofline's --calibrate), or None."""
    from kvos.sim.step_model import Profile

    source = args.profile or args.calibrate
    return Profile.load(source) if source is not None else None


def make_step_model(args: argparse.Namespace) -> Any:
    from kvos.sim.step_model import HardwareSpec, Profile, calibrate_roofline, fit_overhead, roofline_for

    if (args.profile is None) == (args.hardware is None):
        raise ValueError("give exactly one step-time model: --profile PROFILE.json or --hardware HARDWARE.json")
    if args.profile is not None:
        return _overlapped(args, Profile.load(args.profile).step_model())
    weight_bytes = benchmarks("roofline").kvos_weight_bytes_per_param(args.dtype, args.quantization, rows=1)
    model = roofline_for(
        _arch(args.arch), HardwareSpec.from_json(args.hardware), args.dtype, weight_bytes, DTYPE_BYTES[args.dtype]
    )
    if args.calibrate is not None:
        profile = Profile.load(args.calibrate)
        model, error = calibrate_roofline(model, profile.samples)
        logger.info("roofline calibrated on %s: %s", args.calibrate, error)
        if profile.served:
            served, error = fit_overhead(model, profile.served)
            logger.info("serving overhead fitted on %s: %s", args.calibrate, error)
            return _overlapped(args, served)
    return _overlapped(args, model)


def _overlapped(args: argparse.Namespace, model: Any) -> Any:
    """`model`, with the engine's own time overlapping the device's under --overlap-host."""
    from kvos.sim.step_model import ServedStepModel

    if not args.overlap_host:
        return model
    if not isinstance(model, ServedStepModel):
        raise ValueError(
            "--overlap-host needs the engine's own time per step: a profile with served steps "
            "(python -m benchmarks.profile_serving adds them), given as --profile or --calibrate"
        )
    return ServedStepModel(model.worker, model.overhead, overlap=True)


def _first_use_s(args: argparse.Namespace, profile: Any) -> float:
    if args.first_use_ms is not None:
        if not args.first_use_ms >= 0:
            raise ValueError(f"--first-use-ms must be >= 0, got {args.first_use_ms}")
        return args.first_use_ms / 1000
    return profile.first_use_seconds() if profile is not None else 0.0


def _arch(source: str | None) -> Any:
    peers, roofline = benchmarks("peers"), benchmarks("roofline")
    if source is not None and not source.endswith(".gguf"):
        path = Path(source)
        return roofline.ArchShape.from_any(json.loads((path / "config.json" if path.is_dir() else path).read_text()))
    return roofline.ArchShape.from_any(peers.arch_from_gguf(peers.resolve_gguf(source)))


def make_fleet(
    args: argparse.Namespace, num_instances: int | None = None, router: str | None = None, policy: str | None = None
) -> Any:
    from kvos.sim.migration import MigrationConfig
    from kvos.sim.simulator import DiskTierConfig, FleetConfig, HostTierConfig, InstanceConfig
    from kvos.sim.step_model import FrontEnd
    from kvos.sim.worker import CopyModel

    profile = _profile(args)
    engine = profile.engine if profile is not None else {}

    def moves(bandwidth: float | None, measured: str) -> CopyModel:
        """A tier's moves: at --*-bandwidth, else as the profile measured them, else free."""
        if bandwidth:
            return CopyModel.from_bandwidth(_kv_bytes_per_token(args), bandwidth)
        return CopyModel(**engine[measured]) if measured in engine else CopyModel()

    host = None
    if args.host_capacity_tokens is not None:
        host = HostTierConfig(args.host_capacity_tokens, moves(args.copy_bandwidth, "host_copy"), args.preemption_mode)
    disk = None
    if args.disk_capacity_tokens is not None:
        disk = DiskTierConfig(args.disk_capacity_tokens, moves(args.disk_bandwidth, "disk_copy"))
    scheduler = SchedulerConfig(
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        policy=cast(SchedulingPolicyName, policy or args.scheduling_policy),
    )
    d = InstanceConfig()  # its defaults; a class compiled by `kvos sim build` has no class-level ones
    instance = InstanceConfig(
        virtual=_virtual_cache(args, engine),
        scheduler=scheduler,
        kv_capacity_tokens=args.kv_capacity_tokens or engine.get("kv_capacity_tokens", d.kv_capacity_tokens),
        block_size=engine.get("block_size", d.block_size),
        max_model_len=args.max_model_len or engine.get("max_model_len", d.max_model_len),
        front_end=profile.front_end() if profile is not None else FrontEnd(),
        first_use_s=_first_use_s(args, profile),
        host=host,
        disk=disk,
    )
    prefill, decode = getattr(args, "prefill_instances", 0), getattr(args, "decode_instances", 0)
    if (prefill or decode) and not (prefill >= 1 and decode >= 1):
        raise ValueError(
            f"disaggregation needs both --prefill-instances and --decode-instances >= 1, got {prefill} and {decode}"
        )
    migration = None
    if args.migration_freeness_gap is not None:
        migration = MigrationConfig(args.migration_freeness_gap, args.migration_interval_s)
    link = None
    if migration is not None or prefill:
        link = _link(args, "--migrate-on-imbalance" if migration is not None else "--prefill-instances")
    if prefill:
        num_instances = prefill + decode
    return FleetConfig(
        instance,
        num_instances or int(getattr(args, "num_instances", 1)),
        router or args.router,
        args.prefix_overload_steps,
        migration,
        prefill,
        link,
    )


def _virtual_cache(args: argparse.Namespace, engine: dict[str, Any]) -> Any:
    """The virtual cache's shape and pages, when --kv-cache (or the profile's engine) says virtual; else None.

    The shape is the profile's engine's, else --arch's at --dtype."""
    from kvos.sim.simulator import VirtualCacheConfig

    kind = args.kv_cache or engine.get("kv_cache", "paged")
    if engine.get("kv_cache", kind) != kind:
        logger.warning(
            "the profile timed steps on the %s cache: simulating the %s cache's books with them",
            engine["kv_cache"],
            kind,
        )
    if kind != "virtual":
        return None
    page_size = args.page_size or engine.get("kv_page_size")
    if page_size is None:
        raise ValueError("the virtual cache needs --page-size: the profile's engine did not record one")
    if "kv_shape" in engine:
        return VirtualCacheConfig.of_profile(engine, page_size)
    arch = _arch(args.arch)
    return VirtualCacheConfig(
        arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim, args.dtype, page_size=page_size
    )


def make_workload(args: argparse.Namespace, rate: float) -> Any:
    from kvos.sim.workload import Workload, arrival_times, load_trace, sharegpt_lengths, with_arrivals

    if args.trace is not None:
        return load_trace(args.trace)
    if args.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {args.num_requests}")
    if args.fixed_lengths is not None:
        try:
            prompt, output = (int(x) for x in args.fixed_lengths.split(","))
        except ValueError as exc:
            raise ValueError(f"--fixed-lengths looks like '256,64', got {args.fixed_lengths!r}") from exc
        lengths = [(prompt, output)] * args.num_requests
    else:
        lengths = sharegpt_lengths(args.num_requests, args.max_prompt_tokens, args.max_output_tokens, args.seed)
    return Workload(
        with_arrivals(lengths, arrival_times(args.num_requests, rate, args.arrival, args.cv, args.seed)), []
    )


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError as exc:
        raise ValueError(f"--rates looks like '1,2,4,inf', got {text!r}") from exc
    if any(not r > 0 for r in rates):
        raise ValueError(f"--rates must be > 0, got {text!r}")
    return rates


# -- commands ----------------------------------------------------------------------------

_TASK: Callable[[Any], Any] | None = None
_ITEMS: Sequence[Any] = ()


def _run_item(index: int) -> Any:
    assert _TASK is not None
    return _TASK(_ITEMS[index])


def in_parallel(task: Callable[[Any], Any], items: Sequence[Any], jobs: int) -> Iterator[Any]:
    """`task(item)` for each item, in order, in up to `jobs` forked processes.

    Each simulation is deterministic and shares nothing with the others, so the results are exactly
    a loop's. The children are forked, not spawned: they start with this process's objects (the step
    model, the workload) and its imports (the compiled simulator, if it was loaded), and only an item's
    index goes to them; its result (plain data) comes back pickled.
    """
    global _TASK, _ITEMS
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if jobs == 1 or len(items) == 1:
        yield from map(task, items)
        return
    _TASK, _ITEMS = task, items
    try:
        with multiprocessing.get_context("fork").Pool(min(jobs, len(items))) as pool:
            yield from pool.imap(_run_item, range(len(items)))
    finally:
        _TASK, _ITEMS = None, ()


def _load_native() -> None:
    """Run and plan load the compiled build of the current sources, if there is one, before their imports."""
    from kvos.sim import native

    where = native.activate()
    if where is not None:
        logger.info("the simulator runs compiled (mypyc) from %s", where)
    else:
        logger.info("the simulator runs as Python; `kvos sim build` compiles it once (1.4-1.7x faster)")


def cmd_run(args: argparse.Namespace) -> int:
    _load_native()
    from kvos.sim.metrics import busy_by_term, plot_goodput, summarize_sim
    from kvos.sim.simulator import Simulator
    from kvos.sim.step_model import TermTotals

    step_model = make_step_model(args)
    fleet = make_fleet(args)
    rates = [math.nan] if args.trace is not None else _rates(args.rates)
    workloads = [make_workload(args, rate) for rate in rates]

    def simulate(workload: Any) -> dict[str, Any]:
        totals = TermTotals(step_model) if args.breakdown else None
        result = Simulator(fleet, totals or step_model).run(workload.requests, workload.sessions)
        summary = summarize_sim(result, args.ttft_slo, args.tpot_slo)
        if totals is not None:
            summary["busy_by_term_s"] = busy_by_term(totals.seconds, result)
        return summary

    runs = []
    for rate, summary in zip(rates, in_parallel(simulate, workloads, args.jobs)):
        runs.append((rate, summary))
        print(
            f"rate {rate:g}: {summary['output_throughput']:.1f} tok/s, goodput {summary['goodput']:.3f} req/s, "
            f"TTFT p50/p90 {summary['ttft_ms']['p50']:.0f}/{summary['ttft_ms']['p90']:.0f} ms, "
            f"TPOT p50/p90 {summary['tpot_ms']['p50']:.1f}/{summary['tpot_ms']['p90']:.1f} ms, "
            f"{summary['simulation']['events_per_s']:.0f} events/s",
            file=sys.stderr,
        )
    report = {
        "benchmark": "sim",
        "step_model": step_model.describe(),
        "fleet": _jsonable(fleet),
        "runs": [{"rate": str(rate), **summary} for rate, summary in runs],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    if args.plot is not None:
        if args.trace is not None:
            raise ValueError("--plot draws goodput against rate; a trace has one rate of its own")
        plot_goodput(runs, str(args.plot), f"simulated goodput, {fleet.num_instances} instance(s)")
    return 0


def _names(text: str, known: Any, flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise ValueError(f"{flag} takes comma-separated names of {', '.join(known)}, got {text!r}")
    return names


def _kv_bytes_per_token(args: argparse.Namespace) -> int:
    """--kv-bytes-per-token, else the profiled engine's, else --arch's at --dtype."""
    profile = _profile(args)
    kv_bytes = args.kv_bytes_per_token or (profile.engine if profile is not None else {}).get("kv_bytes_per_token")
    if kv_bytes is None:
        kv_bytes = _arch(args.arch).kv_bytes_per_token(DTYPE_BYTES[args.dtype])
    return int(kv_bytes)


def _link(args: argparse.Namespace, needed_by: str) -> Any:
    from kvos.sim.worker import LinkModel

    if args.link_bandwidth is None:
        raise ValueError(f"{needed_by} needs --link-bandwidth (bytes/s of the KV link between instances)")
    return LinkModel(args.link_bandwidth, _kv_bytes_per_token(args), args.link_latency)


def cmd_plan(args: argparse.Namespace) -> int:
    _load_native()
    from kvos.sim import ROUTERS
    from kvos.sim.planner import SLO, plan_disaggregated, plan_instances

    if not args.rate > 0:
        raise ValueError(f"--rate must be > 0, got {args.rate}")
    slo = SLO(args.ttft_slo, args.tpot_slo, args.attainment)
    routers = _names(args.router, ROUTERS, "--router")
    policies = _names(args.scheduling_policy, SCHEDULING_POLICIES, "--scheduling-policy")
    link = _link(args, "--disaggregated") if args.disaggregated else None
    step_model = make_step_model(args)
    workload = make_workload(args, args.rate)
    if link is not None and workload.sessions:
        raise ValueError("--disaggregated does not simulate sessions (closed-loop turns): plan them colocated")
    layouts = ("colocated", "disaggregated") if link is not None else ("colocated",)
    searches = [(layout, router, policy) for router in routers for policy in policies for layout in layouts]
    fleets = {(router, policy): make_fleet(args, router=router, policy=policy) for _, router, policy in searches}

    def search(layout_router_policy: tuple[str, str, str]) -> dict[str, Any]:
        layout, router, policy = layout_router_policy
        fleet = fleets[router, policy]
        entry: dict[str, Any] = {"layout": layout, "router": router, "policy": policy}
        try:
            if link is None or layout == "colocated":
                entry |= plan_instances(
                    fleet, step_model, workload.requests, slo, args.max_instances, workload.sessions
                ).to_json()
            else:
                entry |= plan_disaggregated(
                    fleet, link, step_model, workload.requests, slo, args.max_instances
                ).to_json()
        except ValueError as exc:  # no fleet within --max-instances: say so, keep comparing
            entry |= {"num_instances": None, "error": str(exc)}
        return entry

    plans: list[dict[str, Any]] = []
    for entry in in_parallel(search, searches, args.jobs):
        plans.append(entry)
        tiers = entry.get("num_prefill"), entry.get("num_decode")
        split = f" = {tiers[0]} prefill + {tiers[1]} decode" if tiers[0] is not None else ""
        print(
            f"{entry['layout']:>13} {entry['router']:>14} {entry['policy']:>8}: {entry['num_instances']} instances"
            f"{split}",
            file=sys.stderr,
        )
    sized = [p for p in plans if p["num_instances"] is not None]
    best = min(sized, key=lambda p: p["num_instances"]) if sized else None
    report = {
        "rate": args.rate,
        "slo": _jsonable(slo),
        "link": _jsonable(link) if link is not None else None,
        "best": {k: best[k] for k in ("layout", "router", "policy", "num_instances")} if best else None,
        "plans": plans,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from kvos.config import EngineConfig
    from kvos.entrypoints.cli import engine_options
    from kvos.sim.profile import GRIDS, profile_engine

    profile = profile_engine(EngineConfig.from_kwargs(**engine_options(args)), GRIDS[args.grid])
    report = profile.to_json()
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    error = report["fit_error"]
    print(
        f"{len(profile.samples)} steps timed; joint linear fit: mean error {error['mean_abs_pct']:.1f}%, "
        f"p90 {error['p90_abs_pct']:.1f}%, max {error['max_abs_pct']:.1f}%; a new row count costs "
        f"{1000 * profile.first_use_seconds():.2f} ms once (median of {len(profile.first_uses)}); wrote {args.out}"
    )
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from kvos.sim import native

    try:
        where = native.build()
    except RuntimeError as exc:  # no mypy or no C compiler: say so, the simulator still runs as Python
        print(f"kvos: error: {exc}", file=sys.stderr)
        return 1
    print(f"compiled simulator: {where}")
    return 0


def _jsonable(config: Any) -> dict[str, Any]:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
