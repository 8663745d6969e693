"""How fast `kvos sim` simulates: a large fleet under a steady load, wall time and events per second.

Issue 14's target is 1,000,000 requests across 1,000 instances in at most
60 s. The workload is synthetic (no tokenizer, so the timing is the
simulator's alone): prompts of 64 to 463 tokens and outputs of 8 to 127, in
a fixed pseudo-random order, Poisson arrivals at `--rate-per-instance`
times the fleet size, the least-requests router, a fixed linear step model
(about 10 ms per decode step: at 2 req/s an instance runs one or two requests at a time).

Reported: wall seconds, events (arrivals and step or decode-run ends) per
second, simulated steps per second (every step the engine would take,
whether run one by one or inside a decode run), and requests per second.
`--one-by-one` turns decode runs off (the reference path); `--profile-out`
writes a cProfile of the run; `--native` runs the simulator compiled with
mypyc (`kvos.sim.native`; built first if the sources have no build yet, which
is not timed).

Usage: python -m benchmarks.sim_speed [--num-requests 1000000] [--num-instances 1000] [--one-by-one] [--native]

The scheduler's own cost per step at a GPU's batch sizes (one instance, every
request at once, each step through `schedule` and `update_from_output`):
python -m benchmarks.sim_speed --num-instances 1 --num-requests 4000 --rate-per-instance 1e9 \
    --one-by-one --max-num-seqs 256
"""

from __future__ import annotations

import argparse
import cProfile
import json
import sys
from pathlib import Path

STEP_MODEL_TERMS = {
    "prefill_intercept": 0.020,
    "decode_intercept": 0.010,
    "per_prefill_token": 1.0e-4,
    "per_attention_pair": 1.0e-8,
    "per_context_token": 1.0e-6,
    "per_decode": 2.0e-4,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=1_000_000)
    parser.add_argument("--num-instances", type=int, default=1000)
    parser.add_argument("--rate-per-instance", type=float, default=2.0, help="requests/s offered per instance")
    parser.add_argument("--router", default="least-requests")
    parser.add_argument("--one-by-one", action="store_true", help="no decode runs: every step through schedule()")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="each instance's batch (sequences) limit")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="each instance's token budget")
    parser.add_argument("--profile-out", type=Path, default=None, help="write a cProfile of the run here")
    parser.add_argument("--native", action="store_true", help="the simulator compiled with mypyc (kvos sim build)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.native:
        from kvos.sim import native

        native.build()
        if native.activate() is None:
            parser.error("the compiled simulator could not be loaded (imported as Python already)")
    # Imported after the choice: the compiled modules must load before anything imports the Python ones.
    from kvos.config import SchedulerConfig
    from kvos.sim.simulator import FleetConfig, InstanceConfig, Simulator
    from kvos.sim.step_model import LinearStepModel
    from kvos.sim.workload import arrival_times, with_arrivals

    n = args.num_requests
    lengths = [(64 + (k * 37) % 400, 8 + (k * 13) % 120) for k in range(n)]
    requests = with_arrivals(lengths, arrival_times(n, args.rate_per_instance * args.num_instances, seed=3))
    scheduler = SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)
    instance = InstanceConfig(scheduler=scheduler)
    simulator = Simulator(
        FleetConfig(instance, args.num_instances, args.router),
        LinearStepModel(**STEP_MODEL_TERMS),
        decode_runs=not args.one_by_one,
    )
    profiler = cProfile.Profile() if args.profile_out is not None else None
    if profiler is not None:
        profiler.enable()
    result = simulator.run(requests)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(str(args.profile_out))
    steps = sum(i.num_steps for i in result.instances)
    runs = sum(i.num_runs for i in result.instances)
    report = {
        "num_requests": n,
        "num_instances": args.num_instances,
        "decode_runs": not args.one_by_one,
        "native": args.native,
        "wall_s": result.wall_s,
        "num_events": result.num_events,
        "events_per_s": result.num_events / result.wall_s,
        "simulated_steps": steps,
        "steps_per_s": steps / result.wall_s,
        "decode_runs_taken": runs,
        "requests_per_s": n / result.wall_s,
        "simulated_s": result.end_s,
        "completed": sum(1 for t in result.times.num_output_tokens if t > 0),
        # With --one-by-one: what the real scheduler, KV books and the simulated worker cost per engine step.
        "ms_per_step": 1e3 * result.wall_s / steps,
        "us_per_output_token": 1e6 * result.wall_s / sum(result.times.num_output_tokens),
    }
    print(json.dumps(report, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
