"""The simulator against the real engine, the planner's trivial case, routers, and simulation speed."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvos.cluster.routers import InstanceView
from kvos.config import EngineConfig, SchedulerConfig, SchedulingPolicyName
from kvos.core.engine_core import EngineCore
from kvos.core.plan import StepPlan
from kvos.core.request import Request
from kvos.memory.factory import host_tier
from kvos.model.loader import load_model
from kvos.sampling_params import SamplingParams
from kvos.sim.metrics import summarize_sim
from kvos.sim.migration import MigrationConfig
from kvos.sim.planner import SLO, plan_disaggregated, plan_instances
from kvos.sim.router import ROUTERS, LeastRequestsRouter
from kvos.sim.simulator import DiskTierConfig, FleetConfig, HostTierConfig, InstanceConfig, Simulator
from kvos.sim.step_model import FrontEnd, LinearStepModel, StepShape
from kvos.sim.worker import CopyModel, LinkModel
from kvos.sim.workload import (
    SimRequest,
    SimSession,
    SimTurn,
    Workload,
    arrival_times,
    load_trace,
    with_arrivals,
    write_trace,
)

STEP_MODEL = LinearStepModel(
    prefill_intercept=0.020,
    decode_intercept=0.010,
    per_prefill_token=1.0e-4,
    per_attention_pair=1.0e-8,
    per_context_token=1.0e-6,
    per_decode=2.0e-4,
)

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 4096,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
TINY_KV_BLOCKS = 24
"""Few enough blocks that the workload below preempts."""


def workload(seed: int = 0, num: int = 40, rate: float = 40.0) -> list[SimRequest]:
    import random

    rng = random.Random(seed)
    times = arrival_times(num, rate, seed=seed)
    return [
        SimRequest(t, rng.randint(3, 70), rng.randint(1, 40), tenant=f"t{k % 2}", priority=rng.randint(0, 2))
        for k, t in enumerate(times)
    ]


def conversations(seed: int = 0, num: int = 6) -> list[SimSession]:
    """Three-turn chats, each turn's prompt its history plus a new message, within the tiny model's 128 tokens."""
    import random

    rng = random.Random(seed)
    sessions = []
    for _ in range(num):
        turns, history = [], 0
        for t in range(3):
            prompt = history + rng.randint(5, 30 if t == 0 else 15)
            output = rng.randint(2, 12)
            turns.append(SimTurn(prompt, output, 0.0 if t == 0 else rng.uniform(0.0, 0.3)))
            history = prompt + output
        sessions.append(SimSession(rng.uniform(0.0, 0.4), tuple(turns)))
    return sessions


def tiny_core(tmp_path: Path, **scheduler: Any) -> EngineCore:
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    bytes_per_token = 2 * 2 * 2 * 16 * 4  # K and V x layers x kv heads x head dim x float32
    config = EngineConfig.from_kwargs(
        model=str(tmp_path),
        load_format="dummy",
        max_model_len=128,
        kv_cache_memory_bytes=TINY_KV_BLOCKS * 16 * bytes_per_token,
        **scheduler,
        dtype="float32",
    )
    return EngineCore(config, load_model(config.model), frozenset())


def plan_key(plan: StepPlan) -> tuple:
    """What the scheduler decided, without the sampled token ids (the real model's differ from the simulator's)."""
    return (
        plan.step_id,
        tuple(
            (s.req_id, len(s.new_token_ids), s.num_computed_tokens, s.sample, s.table_update) for s in plan.scheduled
        ),
        tuple(d.req_id for d in plan.new_requests),
        tuple(plan.copies),
        tuple(plan.saves),
        tuple(plan.loads),
        tuple(plan.kv_loads),
        tuple(plan.finished_req_ids),
        tuple(plan.preempted_req_ids),
        # Disk files are named by digests, rooted in the model's identity: the simulator's differ from the engine's.
        len(plan.disk_drops),
        tuple((op.tier, op.block_id) for op in plan.disk_saves),
        tuple((op.tier, op.block_id) for op in plan.disk_loads),
    )


def instance_of(core: EngineCore, **tiers: Any) -> InstanceConfig:
    """The simulated instance of a real engine core: its scheduler config and KV sizes, plus `tiers`."""
    return InstanceConfig(
        scheduler=core.config.scheduler,
        kv_capacity_tokens=core.capacity_tokens,
        block_size=core.config.cache.block_size,
        max_model_len=core.max_model_len,
        **tiers,
    )


def assert_same_plans(simulated: list[StepPlan], real: list[StepPlan]) -> None:
    assert len(simulated) == len(real)
    for sim_plan, real_plan in zip(simulated, real):
        assert plan_key(sim_plan) == plan_key(real_plan)


def drive_real_engine(
    core: EngineCore, requests: list[SimRequest], sessions: list[SimSession] | None = None
) -> list[StepPlan]:
    """The real EngineCore on a fake clock: each step takes STEP_MODEL's time; requests join between steps.

    Session turns are numbered after the requests, session by session; each is sent its think time after
    the turn before it ends, with that turn's prompt and the tokens the model gave it as its history.
    """
    import heapq

    plans: list[StepPlan] = []
    execute = core.worker.execute
    copies = core.worker.copies
    take_reports = copies.take_reports

    def recording(plan: StepPlan):
        if plan.scheduled:
            plans.append(plan)
        return execute(plan)

    def drained_reports():  # host-tier loads done by the step's end, every time (the simulator's assumption)
        copies.drain()
        return take_reports()

    core.worker.execute = recording  # type: ignore[method-assign]
    copies.take_reports = drained_reports  # type: ignore[method-assign]
    turns = [(j, t) for j, session in enumerate(sessions or []) for t in range(len(session.turns))]
    first_turn = {j: len(requests) + turns.index((j, 0)) for j in range(len(sessions or []))}
    sends = [(session.start_s, first_turn[j]) for j, session in enumerate(sessions or [])]
    heapq.heapify(sends)
    live: dict[int, Request] = {}
    now, i = 0.0, 0
    while i < len(requests) or sends or core.has_unfinished_requests():
        if not core.has_unfinished_requests():  # idle until the next arrival
            pending = ([requests[i].arrival_s] if i < len(requests) else []) + [t for t, _ in sends[:1]]
            now = max(now, min(pending))
        due: list[tuple[float, int, SimRequest, list[int]]] = []
        while i < len(requests) and requests[i].arrival_s <= now:
            due.append((requests[i].arrival_s, i, requests[i], [i] + [0] * (requests[i].prompt_tokens - 1)))
            i += 1
        while sends and sends[0][0] <= now:
            sent, k = heapq.heappop(sends)
            j, t = turns[k - len(requests)]
            turn = sessions[j].turns[t]  # type: ignore[index]
            before = live.get(j)
            history = [*before.prompt_token_ids, *before.output_token_ids] if before else [k]
            spec = SimRequest(0.0, turn.prompt_tokens, turn.output_tokens)
            due.append((sent, k, spec, history + [0] * (turn.prompt_tokens - len(history))))
        for sent, k, spec, prompt in sorted(due, key=lambda d: d[:2]):  # the simulator's order: by send, then index
            params = SamplingParams(max_tokens=spec.output_tokens, ignore_eos=True, temperature=0.0)
            request = Request(str(k), prompt, params, sent, spec.priority, spec.tenant)
            core.add_request(request)
            if k >= len(requests):
                live[turns[k - len(requests)][0]] = request
        num_before = len(plans)
        updates = core.step()
        now += sum(STEP_MODEL.step_seconds(StepShape.from_plan(p)) for p in plans[num_before:])
        for update in updates:
            k = int(update.req_id)
            if update.finish_reason is not None and k >= len(requests):
                j, t = turns[k - len(requests)]
                if t + 1 < len(sessions[j].turns):  # type: ignore[index]
                    heapq.heappush(sends, (now + sessions[j].turns[t + 1].think_s, k + 1))  # type: ignore[index]
    return plans


def simulated_plans(
    config: InstanceConfig, requests: list[SimRequest], sessions: list[SimSession] | None = None
) -> tuple[list[StepPlan], dict]:
    from kvos.sim import simulator

    plans: list[StepPlan] = []
    execute = simulator.SimWorker.execute

    def recording(self, plan: StepPlan):
        if plan.scheduled:
            plans.append(plan)
        return execute(self, plan)

    simulator.SimWorker.execute = recording  # type: ignore[method-assign]
    try:
        # One step at a time: the plans of decode runs are never built (their equivalence is tested below).
        result = Simulator(FleetConfig(config), STEP_MODEL, decode_runs=False).run(requests, sessions or ())
    finally:
        simulator.SimWorker.execute = execute  # type: ignore[method-assign]
    return plans, summarize_sim(result, 2.0, 0.2)


@pytest.mark.parametrize(
    "scheduler",
    [
        {"policy": "fcfs", "max_num_batched_tokens": 32, "max_num_seqs": 6},
        {"policy": "priority", "max_num_batched_tokens": 48, "max_num_seqs": 4, "preemption_quantum_steps": 2},
        {"policy": "fair", "max_num_batched_tokens": 64, "max_num_seqs": 8},
    ],
    ids=["fcfs", "priority", "fair"],
)
def test_simulator_makes_the_real_engines_decisions(tmp_path: Path, scheduler: dict) -> None:
    requests = workload()
    core = tiny_core(tmp_path, **scheduler)
    try:
        real = drive_real_engine(core, requests)
        config = instance_of(core)
    finally:
        core.close()
    simulated, summary = simulated_plans(config, requests)
    assert_same_plans(simulated, real)
    assert summary["completed"] == len(requests)
    assert summary["total_output_tokens"] == sum(r.output_tokens for r in requests)
    if scheduler["policy"] == "fcfs":
        assert summary["simulation"]["preemptions"] > 0, "the workload should exercise preemption"


@pytest.mark.parametrize(
    ("scheduler", "host_pages"),
    [
        ({"policy": "fcfs", "max_num_batched_tokens": 32, "max_num_seqs": 6}, 0),
        ({"policy": "priority", "max_num_batched_tokens": 48, "max_num_seqs": 4, "preemption_quantum_steps": 2}, 0),
        ({"policy": "fcfs", "max_num_batched_tokens": 32, "max_num_seqs": 6}, 40),
    ],
    ids=["fcfs", "priority", "fcfs-host-swap"],
)
def test_simulator_makes_the_real_engines_decisions_with_the_virtual_cache(
    tmp_path: Path, scheduler: dict, host_pages: int
) -> None:
    """The virtual cache's books (rows, pages committed as requests grow, deferred reclamation, swaps to a
    host tier) run in the simulator without memory and decide as the engine's, page for page.

    The engine's look-ahead mapper is a thread, whose timing would make its own plans vary from run to run;
    here it maps at once, the simulator's model of it. (With seed 6 a look-ahead page decides a step: without
    the look-ahead the plans differ.)"""
    from kvos.memory.virtual.page_mapper import InlineMapper
    from kvos.sim.simulator import VirtualCacheConfig

    requests = workload(seed=6, num=60)
    bytes_per_token = 2 * 2 * 2 * 16 * 4
    page = 4096
    host = {"kv_offload_bytes": host_pages * page, "preemption_mode": "swap"} if host_pages else {}
    core = tiny_core(tmp_path, kv_cache="virtual", **scheduler, **host)
    try:
        kv = core.kv_manager
        assert kv.layout.page_size == page  # type: ignore[attr-defined]
        kv._mapper.close()  # type: ignore[attr-defined]
        kv._mapper = InlineMapper(kv.table)  # type: ignore[attr-defined]
        real = drive_real_engine(core, requests)
        real_counters = dataclasses.replace(kv.counters)  # type: ignore[attr-defined]
        config = instance_of(
            core,
            host=HostTierConfig(host_pages * page // bytes_per_token) if host_pages else None,
            virtual=VirtualCacheConfig(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", page_size=page),
        )
    finally:
        core.close()
    simulated, summary = simulated_plans(config, requests)
    assert_same_plans(simulated, real)
    assert summary["completed"] == len(requests)
    simulation = summary["simulation"]
    assert simulation["preemptions"] > 0, "the workload should fill the budget"
    assert 0 < simulation["kv_peak_use"] <= 1
    assert simulation["blocks_moved"]["swap_out"] == real_counters.blocks_swapped_out
    if host_pages:
        assert real_counters.blocks_swapped_out > 0, "the workload should swap"


def test_plan_for_a_trivial_case_is_one_instance() -> None:
    requests = with_arrivals([(100, 50)] * 50, arrival_times(50, 0.2, seed=1))
    result = plan_instances(FleetConfig(), STEP_MODEL, requests, SLO(ttft_s=1.0, tpot_s=0.1))
    assert result.num_instances == 1
    assert result.tried[0][0] == 1 and result.tried[0][1] == 1.0


def test_disaggregated_plan_for_a_trivial_case_is_one_of_each() -> None:
    requests = with_arrivals([(100, 50)] * 50, arrival_times(50, 0.2, seed=1))
    link = LinkModel(bandwidth_bytes_per_s=1e9, kv_bytes_per_token=4096)
    result = plan_disaggregated(FleetConfig(), link, STEP_MODEL, requests, SLO(ttft_s=1.0, tpot_s=0.1))
    assert (result.num_prefill, result.num_decode) == (1, 1)


def test_plan_grows_the_fleet_with_the_rate() -> None:
    requests = with_arrivals([(200, 100)] * 400, arrival_times(400, 60.0, seed=2))
    result = plan_instances(FleetConfig(router="least-requests"), STEP_MODEL, requests, SLO(ttft_s=0.5, tpot_s=0.05))
    assert result.num_instances > 1
    failing = [n for n, attainment, _ in result.tried if attainment < 0.9]
    assert max(failing) == result.num_instances - 1


def no_views(request: Request, with_prefix: bool) -> list[InstanceView]:
    raise AssertionError("least-requests keeps its own counts: it must not ask for views")


def test_least_requests_router_picks_the_emptiest_instance() -> None:
    router = LeastRequestsRouter(3)
    request = Request("r", [1], SamplingParams())
    assert [router.route(request, no_views) for _ in range(4)] == [0, 1, 2, 0]
    router.on_finish(1)
    router.on_finish(2)
    assert router.route(request, no_views) == 1
    assert router.route(request, no_views) == 2
    assert router.loads == [2, 1, 1]


def test_least_requests_heap_chooses_what_a_scan_of_every_load_chooses() -> None:
    """The heap with lazy deletion against the naive O(instances) scan (fewest unfinished, lowest index on a tie)."""
    import random

    rng = random.Random(11)
    router = LeastRequestsRouter(7)
    loads = [0] * 7
    request = Request("r", [1], SamplingParams())
    for _ in range(3000):
        busy = [i for i, load in enumerate(loads) if load]
        if busy and rng.random() < 0.45:
            index = rng.choice(busy)
            router.on_finish(index)
            loads[index] -= 1
        else:
            expected = min(range(7), key=lambda i: (loads[i], i))
            assert router.route(request, no_views) == expected
            loads[expected] += 1
    assert router.loads == loads


def test_many_instances_share_one_clock_and_finish_everything() -> None:
    requests = with_arrivals([(64, 16), (300, 40)] * 200, arrival_times(400, 200.0))
    for router in ROUTERS:
        result = Simulator(FleetConfig(num_instances=8, router=router), STEP_MODEL).run(requests)
        summary = summarize_sim(result, 2.0, 0.2)
        assert summary["completed"] == 400 and summary["failed"] == 0
        assert all(instance.num_steps > 0 for instance in result.instances)
        assert all(instance.kv.num_used_blocks == 0 for instance in result.instances)


def test_too_long_requests_fail_as_the_engine_refuses_them() -> None:
    config = FleetConfig(InstanceConfig(max_model_len=128))
    requests = [SimRequest(0.0, 100, 10), SimRequest(0.1, 100, 50)]
    summary = summarize_sim(Simulator(config, STEP_MODEL).run(requests), 2.0, 0.2)
    assert (summary["completed"], summary["failed"]) == (1, 1)


def test_the_virtual_cache_is_refused_where_the_engine_refuses_it() -> None:
    from kvos.sim.simulator import VirtualCacheConfig

    virtual = VirtualCacheConfig(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", page_size=4096)
    with pytest.raises(ValueError, match="a disk tier needs the paged cache"):
        InstanceConfig(virtual=virtual, disk=DiskTierConfig(4096))
    link = LinkModel(1e9, 512)
    with pytest.raises(ValueError, match="no block export"):
        FleetConfig(InstanceConfig(virtual=virtual), 2, migration=MigrationConfig(10, 1.0), link=link)
    with pytest.raises(ValueError, match="no block export"):
        FleetConfig(InstanceConfig(virtual=virtual), 2, prefill_instances=1, link=link)
    with pytest.raises(ValueError, match="dtype must name a torch dtype, got 'bf16'"):
        dataclasses.replace(virtual, dtype="bf16")


def test_trace_round_trips_and_names_a_bad_line(tmp_path: Path) -> None:
    requests, sessions = workload(num=5), conversations(num=2)
    requests[3] = dataclasses.replace(requests[3], output_tokens=5, hidden_tokens=2)
    path = tmp_path / "trace.jsonl"
    write_trace(path, requests, sessions)
    assert load_trace(path) == Workload(requests, sessions)
    path.write_text('{"arrival_s": 0, "prompt_tokens": 5}\n')
    with pytest.raises(ValueError, match="trace.jsonl:1: missing field 'output_tokens'"):
        load_trace(path)
    first = '{"session": "a", "arrival_s": 1.0, "prompt_tokens": 10, "output_tokens": 4}\n'
    path.write_text(first + '{"session": "a", "arrival_s": 3.0, "prompt_tokens": 20, "output_tokens": 4}\n')
    with pytest.raises(ValueError, match="trace.jsonl:2: a session's later lines give think_s"):
        load_trace(path)
    path.write_text(first + '{"session": "a", "think_s": 1.0, "prompt_tokens": 12, "output_tokens": 4}\n')
    with pytest.raises(ValueError, match=r"session from line 1: turn 1: prompt_tokens \(12\) must exceed"):
        load_trace(path)


def test_simulation_speed_is_reported() -> None:
    """Events per second on a mid-sized fleet; nothing asserted about time (the machine may be busy)."""
    num = 5000
    lengths = [(64 + (k * 37) % 400, 8 + (k * 13) % 120) for k in range(num)]
    requests = with_arrivals(lengths, arrival_times(num, 500.0, seed=3))
    result = Simulator(FleetConfig(num_instances=50, router="least-requests"), STEP_MODEL).run(requests)
    summary = summarize_sim(result, 2.0, 0.2)
    assert summary["completed"] == num
    sim = summary["simulation"]
    print(
        f"\nsimulated {num} requests on 50 instances: {sim['num_events']} events "
        f"({sim['num_steps']} steps) in {sim['wall_s']:.2f} s = {sim['events_per_s']:.0f} events/s"
    )


def test_a_run_pauses_the_collector_and_leaves_no_cycles() -> None:
    """`Simulator.run` turns the cyclic collector off for speed: that is only safe if nothing it makes is a cycle."""
    requests = workload(seed=5, num=120, rate=12.0)
    instance = InstanceConfig(
        scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8),
        kv_capacity_tokens=24 * 16,
        max_model_len=128,
    )
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        result = Simulator(FleetConfig(instance), STEP_MODEL).run(requests)
        assert gc.isenabled()
        gc.collect()
        garbage = [type(o) for o in gc.garbage if type(o).__module__.startswith("kvos")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert sum(i.scheduler.num_preemptions for i in result.instances) > 0, "preemption should be exercised"
    assert garbage == []


def test_poisson_arrivals_are_the_serving_benchmarks() -> None:
    from benchmarks.serve import poisson_delays

    assert arrival_times(300, 3.0, seed=7) == poisson_delays(300, 3.0, 7)


def test_cli_profile_then_run_then_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvos.entrypoints.cli import main

    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    profile = tmp_path / "profile.json"
    common = ["--model", str(tmp_path), "--load-format", "dummy", "--kv-cache-memory", "16MiB"]
    assert main(["sim", "profile", *common, "--grid", "smoke", "--out", str(profile)]) == 0
    data = json.loads(profile.read_text())
    assert len(data["samples"]) == 14
    # The first-use cost is timed on prompt lengths no step before it ran: the grid's steps (prompt tokens
    # 0, 16, 48 beside 0, 1 or 4 decodes) and a compiled engine's warm-up batches (1, 2, max_num_seqs).
    rows = [step["rows"] for step in data["first_use"]["steps"]]
    grid_rows = {t + b for t in (0, 16, 48) for b in (0, 1, 4)} | {1, 2, 128}
    assert len(set(rows)) == len(rows) == 32 and min(rows) == 8 and max(rows) < 150 and not set(rows) & grid_rows
    extras = [step["extra_s"] for step in data["first_use"]["steps"]]
    assert data["first_use"]["seconds"] == max(0.0, statistics.median(extras))
    # As the `kvos` console script runs it: its own folder, not the working directory, first on the path
    # (`python -P`), from the repository root, as docs/simulator.md says to; cluster router classes inside.
    script = "import sys; from kvos.entrypoints.cli import main; sys.exit(main())"
    fleet = ["--num-instances", "2", "--router", "prefix-aware", "--fixed-lengths", "40,10", "--num-requests", "5"]
    console = tmp_path / "console.json"
    done = subprocess.run(
        [sys.executable, "-P", "-c", script, "sim", "run", "--profile", str(profile), *fleet, "--json", str(console)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(console.read_text())["runs"][0]["completed"] == 5
    out, plot = tmp_path / "run.json", tmp_path / "goodput.png"
    workload_args = ["--fixed-lengths", "40,10", "--num-requests", "20"]
    assert (
        main(
            [
                "sim",
                "run",
                "--profile",
                str(profile),
                *workload_args,
                "--rates",
                "1,4",
                "--json",
                str(out),
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    assert [run["completed"] for run in json.loads(out.read_text())["runs"]] == [20, 20]
    assert plot.stat().st_size > 0
    # SLOs no step time can miss: the smoke profile is timed on whatever load the machine has.
    assert (
        main(
            [
                "sim",
                "plan",
                "--profile",
                str(profile),
                *workload_args,
                "--rate",
                "0.01",
                "--ttft-slo",
                "1e3",
                "--tpot-slo",
                "1e3",
                "--router",
                "round-robin,least-load",
                "--disaggregated",
                "--link-bandwidth",
                "1e9",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    plans = json.loads(out.read_text())["plans"]
    assert [(p["layout"], p["router"]) for p in plans] == [
        ("colocated", "round-robin"),
        ("disaggregated", "round-robin"),
        ("colocated", "least-load"),
        ("disaggregated", "least-load"),
    ]
    assert [p["num_instances"] for p in plans] == [1, 2, 1, 2]
    # The virtual cache's books with the paged engine's step times: its page size must then be given.
    assert main(["sim", "run", "--profile", str(profile), *workload_args, "--kv-cache", "virtual"]) == 2
    assert "needs --page-size" in capsys.readouterr().err
    virtual = ["--kv-cache", "virtual", "--page-size", "4096", "--json", str(out)]
    assert main(["sim", "run", "--profile", str(profile), *workload_args, *virtual]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert run["completed"] == 20 and 0 < run["simulation"]["kv_peak_use"] <= 1
    # Chat sessions from a trace, with a host tier under a pool too small to keep them between turns; the
    # profile of an engine with host and disk tiers times their moves, and the simulated tiers move at that cost.
    tiered, disk_dir = tmp_path / "tiered.json", tmp_path / "disk"
    disk_flags = ["--kv-disk-path", str(disk_dir), "--kv-disk-size", "4MiB"]
    tier_flags = ["--kv-offload-size", "4MiB", *disk_flags]
    assert main(["sim", "profile", *common, *tier_flags, "--grid", "smoke", "--out", str(tiered)]) == 0
    data = json.loads(tiered.read_text())
    for tier in ("host_copy", "disk_copy"):
        assert set(data["engine"][tier]) == {"save_s_per_token", "load_s_per_token"}
    assert not list(disk_dir.glob("*.kv")), "the profile's block files are removed"
    # What was measured is this machine's noise for a 2-layer model; known costs make the run checkable.
    data["engine"]["host_copy"] = {"save_s_per_token": 1e-3, "load_s_per_token": 2e-3}
    data["engine"]["disk_copy"] = {"save_s_per_token": 3e-3, "load_s_per_token": 5e-3}
    tiered.write_text(json.dumps(data))
    trace = tmp_path / "chats.jsonl"
    write_trace(trace, [], conversations(num=4))
    # Then a host tier too small for the sessions' history too: it goes on to disk and comes back from there.
    for tiers, found in (
        (["--host-capacity-tokens", "4096"], "host"),
        (["--host-capacity-tokens", "32", "--disk-capacity-tokens", "4096"], "disk"),
    ):
        run_args = ["--trace", str(trace), "--kv-capacity-tokens", "64", *tiers, "--json", str(out)]
        assert main(["sim", "run", "--profile", str(tiered), *run_args]) == 0
        (run,) = json.loads(out.read_text())["runs"]
        assert run["completed"] == 12
        simulation = run["simulation"]
        moved = simulation["blocks_moved"]
        assert simulation["hit_rate_by_tier"][found] > 0 and moved["demote" if found == "host" else "disk_write"] > 0
        saved, loaded = 16 * (moved["demote"] + moved["swap_out"]), 16 * (moved["promote"] + moved["swap_in"])
        down, up = 16 * moved["disk_write"], 16 * moved["disk_read"]
        assert simulation["copy_s"] == pytest.approx(1e-3 * saved + 2e-3 * loaded + 3e-3 * down + 5e-3 * up)


def run_recording_plans(
    config: FleetConfig, requests: list[SimRequest], decode_runs: bool, sessions: list[SimSession] | None = None
) -> tuple[Any, dict]:
    """A run, and every plan the real scheduler made in it, by (instance, step id)."""
    from kvos.sim import simulator

    plans: dict[tuple[int, int], StepPlan] = {}
    schedule = simulator.Scheduler.schedule

    def recording(self, *args, **kwargs):
        plan = schedule(self, *args, **kwargs)
        if plan.scheduled:
            plans[(id(self), plan.step_id)] = plan
        return plan

    simulator.Scheduler.schedule = recording  # type: ignore[method-assign]
    try:
        result = Simulator(config, STEP_MODEL, decode_runs=decode_runs).run(requests, sessions or ())
    finally:
        simulator.Scheduler.schedule = schedule  # type: ignore[method-assign]
    order = {id(instance.scheduler): n for n, instance in enumerate(result.instances)}
    return result, {(order[key[0]], key[1]): plan for key, plan in plans.items()}


def assert_runs_decide_as_steps(fast: Any, fast_plans: dict, slow: Any, slow_plans: dict) -> None:
    """A run with decode runs against the same run one step at a time: plans, token times and counts."""
    # Every plan the fast path made is the one-by-one path's plan of that step, exactly.
    for key, plan in fast_plans.items():
        assert plan_key(plan) == plan_key(slow_plans[key]), key
    # The steps it skipped were pure decodes: no admission, preemption, copy or prompt chunk.
    for key in slow_plans.keys() - fast_plans.keys():
        plan = slow_plans[key]
        assert not plan.new_requests and not plan.preempted_req_ids and not plan.copies
        assert all(len(s.new_token_ids) == 1 and s.sample for s in plan.scheduled)
    # The same token times for every request, and the same state left behind.
    for name in ("first_token_s", "last_token_s", "num_output_tokens"):
        assert getattr(fast.times, name) == getattr(slow.times, name), name
    assert sorted(fast.times.itl_s) == sorted(slow.times.itl_s)
    for a, b in zip(fast.instances, slow.instances):
        assert (a.num_steps, a.scheduler.num_preemptions, a.peak_used_blocks) == (
            b.num_steps,
            b.scheduler.num_preemptions,
            b.peak_used_blocks,
        )
        assert a.worker.busy_s == b.worker.busy_s
        assert a.worker.rows_run == b.worker.rows_run


@pytest.mark.parametrize(
    "policy, num_instances, router, kv_tokens, migrate",
    [
        ("fcfs", 1, "round-robin", 24 * 16, False),  # small enough to preempt
        ("priority", 1, "round-robin", 24 * 16, False),
        ("fcfs", 4, "least-requests", 64 * 16, False),
        ("fair", 2, "round-robin", 64 * 16, False),  # not a fast policy: runs stay off, results unchanged
        # The cluster's routers read each instance's reports, which a run stands in for, with chats.
        ("fcfs", 4, "least-load", 24 * 16, False),
        ("fcfs", 4, "prefix-aware", 24 * 16, False),
        ("fcfs", 3, "prefix-aware", 64 * 16, False),
        # Live migration: its calls cut runs, and the imbalance checks read the reports inside them.
        ("fcfs", 3, "round-robin", 64 * 16, True),
        ("fcfs", 4, "least-requests", 24 * 16, True),
        ("fcfs", 3, "prefix-aware", 64 * 16, True),
    ],
)
def test_decode_runs_make_the_same_decisions_as_single_steps(
    policy: SchedulingPolicyName, num_instances: int, router: str, kv_tokens: int, migrate: bool
) -> None:
    requests = workload(seed=5, num=120, rate=12.0)
    if policy != "priority":
        requests = [SimRequest(r.arrival_s, r.prompt_tokens, r.output_tokens, r.tenant) for r in requests]
    instance = InstanceConfig(
        scheduler=SchedulerConfig(policy=policy, max_num_batched_tokens=64, max_num_seqs=8),
        kv_capacity_tokens=kv_tokens,
        max_model_len=128,
        first_use_s=0.004,  # a run's first step can be a batch size new to the instance
    )
    migration = MigrationConfig(freeness_gap=20.0, interval_s=0.2) if migrate else None
    config = FleetConfig(instance, num_instances, router, migration=migration, link=LinkModel(1e6, 100, 1e-3))
    chats = conversations(num=10) if router in ("least-load", "prefix-aware") else None
    slow, slow_plans = run_recording_plans(config, requests, decode_runs=False, sessions=chats)
    fast, fast_plans = run_recording_plans(config, requests, decode_runs=True, sessions=chats)
    runs = sum(i.num_runs for i in fast.instances)
    if policy == "fair":
        assert runs == 0
    else:
        assert runs > 0 and len(fast_plans) < len(slow_plans) / 2, "the workload should have decode runs"
    assert_runs_decide_as_steps(fast, fast_plans, slow, slow_plans)
    for a, b in zip(fast.instances, slow.instances):
        assert list(a.kv.allocator._free) == list(b.kv.allocator._free)
        assert a.kv.allocator._cached == b.kv.allocator._cached
    assert fast.migrations == slow.migrations
    if migrate:
        assert sum(m.outcome == "migrated" for m in fast.migrations) >= 3, "the workload should migrate"
    if policy == "fcfs" and num_instances == 1:
        assert fast.instances[0].scheduler.num_preemptions > 0, "the workload should exercise preemption"


@pytest.mark.parametrize(
    "policy, num_instances, router, kv_tokens",
    [
        ("fcfs", 1, "round-robin", 24 * 16),  # small enough to preempt
        ("priority", 1, "round-robin", 24 * 16),
        ("fcfs", 4, "least-requests", 40 * 16),
    ],
)
def test_decode_runs_with_the_virtual_cache_make_the_same_decisions_as_single_steps(
    policy: SchedulingPolicyName, num_instances: int, router: str, kv_tokens: int
) -> None:
    """A run grows the rows and maps the look-ahead as its steps would have: the same plans, times and pages."""
    from kvos.sim.simulator import VirtualCacheConfig

    requests = workload(seed=5, num=120, rate=12.0)
    if policy != "priority":
        requests = [SimRequest(r.arrival_s, r.prompt_tokens, r.output_tokens, r.tenant) for r in requests]
    # 512 bytes a token in 4 KiB pages: 8 tokens a page, and an 8-token look-ahead.
    virtual = VirtualCacheConfig(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", page_size=4096)
    instance = InstanceConfig(
        scheduler=SchedulerConfig(policy=policy, max_num_batched_tokens=64, max_num_seqs=8),
        kv_capacity_tokens=kv_tokens,
        max_model_len=128,
        virtual=virtual,
        first_use_s=0.004,
    )
    config = FleetConfig(instance, num_instances, router)
    slow, slow_plans = run_recording_plans(config, requests, decode_runs=False)
    fast, fast_plans = run_recording_plans(config, requests, decode_runs=True)
    assert sum(i.num_runs for i in fast.instances) > 0 and len(fast_plans) < len(slow_plans) / 2
    assert_runs_decide_as_steps(fast, fast_plans, slow, slow_plans)
    for a, b in zip(fast.instances, slow.instances):
        assert (a.kv.table.mapped, a.kv.table.tenant) == (b.kv.table.mapped, b.kv.table.tenant)  # type: ignore[union-attr]
    if num_instances == 1:
        assert fast.instances[0].scheduler.num_preemptions > 0, "the workload should exercise preemption"


@pytest.mark.parametrize(
    "host_blocks, disk_blocks",
    [(0, 0), (64, 0), (0, 96), (8, 96)],
    ids=["pool-only", "host-tier", "disk-tier", "host-and-disk"],
)
def test_simulator_makes_the_real_engines_decisions_for_chat_sessions(
    tmp_path: Path, host_blocks: int, disk_blocks: int
) -> None:
    """Closed-loop sessions beside open-loop requests: the same prefix hits, write-backs, host loads and swaps,
    disk writes and the prefetches of prefixes found on disk.

    With a tier below the pool, more open-loop requests crowd it until the pool evicts the sessions' history
    (and, with the host tier, preempts, swapping victims out)."""
    below = bool(host_blocks or disk_blocks)
    requests, sessions = workload(num=40 if below else 8, rate=40.0 if below else 8.0), conversations()
    bytes_per_token = 2 * 2 * 2 * 16 * 4
    tiers: dict[str, Any] = {}
    if host_blocks:
        tiers |= {"kv_offload_bytes": host_blocks * 16 * bytes_per_token, "preemption_mode": "swap"}
    if disk_blocks:
        tiers |= {"kv_disk_path": str(tmp_path / "disk"), "kv_disk_bytes": disk_blocks * 16 * bytes_per_token}
    core = tiny_core(tmp_path, policy="fcfs", max_num_batched_tokens=32, max_num_seqs=6, **tiers)
    try:
        real = drive_real_engine(core, requests, sessions)
        found = host_tier(core.kv_manager)
        disk = core.kv_manager.disk  # type: ignore[attr-defined]
        config = instance_of(
            core,
            host=HostTierConfig(found[0].num_blocks * found[1]) if found is not None else None,
            disk=DiskTierConfig(disk.num_blocks * 16) if disk is not None else None,
        )
        real_hits = dataclasses.replace(core.kv_manager.counters)  # before close() writes the pool to disk
    finally:
        core.close()
    simulated, summary = simulated_plans(config, requests, sessions)
    assert_same_plans(simulated, real)
    num_turns = sum(len(s.turns) for s in sessions)
    assert summary["completed"] == len(requests) + num_turns
    simulation = summary["simulation"]
    if not below:
        assert simulation["hit_rate_by_tier"]["primary"] > 0, "later turns should find their history"
    if host_blocks:
        assert real_hits.host_hit_tokens > 0 and real_hits.blocks_swapped_out > 0, "the workload should use the tier"
        assert simulation["blocks_moved"]["demote"] == real_hits.blocks_demoted
        assert simulation["blocks_moved"]["swap_out"] == real_hits.blocks_swapped_out
        assert simulation["host_tier"]["peak_held"] > 0
    if disk_blocks:
        assert real_hits.disk_hit_tokens > 0, "later turns should find their history on disk"
        assert simulation["blocks_moved"]["disk_write"] == real_hits.blocks_to_disk
        assert simulation["blocks_moved"]["disk_read"] == real_hits.blocks_from_disk
        assert simulation["disk_tier"]["stored_at_end"] > 0
    queried = simulation["prompt_tokens_queried"]
    for tier in ("host", "disk"):
        assert simulation["hit_rate_by_tier"][tier] * queried == pytest.approx(getattr(real_hits, f"{tier}_hit_tokens"))


def test_a_session_turn_is_sent_a_think_time_after_the_reply_and_finds_its_history() -> None:
    """By hand: prefill steps 100 ms, decode steps 50 ms, 10 ms to the engine and 20 ms back, blocks of 16."""
    steps = LinearStepModel(0.100, 0.050, 0.0, 0.0, 0.0, 0.0)
    chat = SimSession(0.0, (SimTurn(32, 3), SimTurn(48, 2, think_s=1.0)))
    config = InstanceConfig(front_end=FrontEnd(to_engine_s=0.010, to_client_s=0.020))
    late = SimRequest(100.0, 8, 1)
    result = Simulator(FleetConfig(config), steps).run([late], [chat])
    times = result.times
    # Turn 0 (request 1) reaches the engine at 10 ms: prefill 10-110, decodes to 160 and 210; read at 230 ms.
    assert times.first_token_s[1] == pytest.approx(0.130)
    assert times.last_token_s[1] == pytest.approx(0.230)
    # Turn 1 is sent at 1.230 s, reaches the engine at 1.240: its 48-token prompt holds the 32 prompt tokens
    # (two full blocks, cached) and the 3 reply tokens; prefill 1.240-1.340, one decode to 1.390.
    assert times.arrival_s[2] == pytest.approx(1.230)
    assert times.first_token_s[2] == pytest.approx(1.360)
    assert times.last_token_s[2] == pytest.approx(1.410)
    assert times.arrival_s[0] == 100.0 and times.num_output_tokens[0] == 1
    tiers = summarize_sim(result, 2.0, 0.2)["simulation"]
    assert tiers["prompt_tokens_queried"] == 8 + 32 + 48
    assert tiers["hit_rate_by_tier"]["primary"] * (8 + 32 + 48) == pytest.approx(32)


def test_sessions_share_the_prefix_every_conversation_starts_with() -> None:
    """Two 40-token first prompts, one after the other: 20 shared tokens hold one full block of 16."""
    for shared, hits in ((0, 0), (20, 16)):
        chats = [SimSession(start, (SimTurn(40, 2),), prefix_tokens=shared) for start in (0.0, 10.0)]
        result = Simulator(FleetConfig(), STEP_MODEL).run([], chats)
        assert result.instances[0].kv.counters.primary_hit_tokens == hits
    with pytest.raises(ValueError, match="prefix_tokens must be >= 0 and below the first prompt's 40, got 40"):
        SimSession(0.0, (SimTurn(40, 2),), prefix_tokens=40)


def test_a_refused_turn_ends_its_session() -> None:
    chat = SimSession(0.0, (SimTurn(10, 2), SimTurn(100, 2), SimTurn(110, 2)))
    config = InstanceConfig(max_model_len=64)
    result = Simulator(FleetConfig(config), STEP_MODEL).run([], [chat])
    assert list(result.times.rejected) == [1] and list(result.times.abandoned) == [2]
    summary = summarize_sim(result, 2.0, 0.2)
    assert summary["completed"] == 1 and summary["failed"] == 2
    assert "an earlier turn of its session was rejected" in " ".join(summary["errors"])


def test_host_tier_moves_cost_copy_time_by_hand() -> None:
    """By hand: steps take 100 ms; KV moves at 1 ms per token (16 ms a block); a pool of 4 blocks of 16.

    Turn 0 (32 prompt tokens, 2 out) leaves two full cached blocks. A 48-token request in the think time
    needs the whole pool: its two steps write both of those blocks back to the host tier (32 ms). Turn 1
    then finds the 32 tokens in the host tier: its step first writes back two of that request's cached
    blocks the pool reuses, then loads the two (64 ms), then computes.
    """
    steps = LinearStepModel(0.100, 0.100, 0.0, 0.0, 0.0, 0.0)
    copy = CopyModel.from_bandwidth(kv_bytes_per_token=1000, bytes_per_s=1e6)
    chat = SimSession(0.0, (SimTurn(32, 2), SimTurn(48, 1, think_s=1.0)))
    filler = SimRequest(0.5, 48, 2)
    cases = ((None, 0.700, 0.100, 0), (HostTierConfig(128, copy), 0.732, 0.164, 32))
    for host, filler_end, turn_ttft, host_hits in cases:
        config = InstanceConfig(kv_capacity_tokens=64, host=host)
        result = Simulator(FleetConfig(config), steps).run([filler], [chat])
        times = result.times
        assert times.last_token_s[0] == pytest.approx(filler_end)
        assert times.arrival_s[2] == pytest.approx(1.200)
        assert times.first_token_s[2] - times.arrival_s[2] == pytest.approx(turn_ttft)
        counters = result.instances[0].kv.counters
        assert counters.host_hit_tokens == host_hits
        assert counters.primary_hit_tokens == 0
        use = summarize_sim(result, 2.0, 0.2)["simulation"]["host_tier"]
        if host is None:
            assert use is None
        else:
            # Of its 8 blocks: turn 1's two hits pinned while they load; at the end the four written back.
            assert use == {"peak_held": 2 / 8, "cached_at_end": 4 / 8}


def test_disk_tier_moves_cost_copy_time_by_hand() -> None:
    """By hand, the host-tier case above with a disk tier in its place (16 ms a block each way).

    The filler's two steps each write one of turn 0's cached blocks to disk before computing (32 ms). Turn 1
    finds its 32 history tokens on disk: it waits one step while they come up, a step that computes nothing
    and first writes one of the filler's cached blocks to disk to make room (16 + 32 ms). The next step takes
    it in and writes another filler block to disk for its last prompt block (16 ms), then computes (100 ms).
    """
    steps = LinearStepModel(0.100, 0.100, 0.0, 0.0, 0.0, 0.0)
    copy = CopyModel.from_bandwidth(kv_bytes_per_token=1000, bytes_per_s=1e6)
    chat = SimSession(0.0, (SimTurn(32, 2), SimTurn(48, 1, think_s=1.0)))
    filler = SimRequest(0.5, 48, 2)
    config = InstanceConfig(kv_capacity_tokens=64, disk=DiskTierConfig(128, copy))
    result = Simulator(FleetConfig(config), steps).run([filler], [chat])
    times = result.times
    assert times.last_token_s[0] == pytest.approx(0.732)
    assert times.arrival_s[2] == pytest.approx(1.200)
    assert times.first_token_s[2] - times.arrival_s[2] == pytest.approx(0.048 + 0.116)
    counters = result.instances[0].kv.counters
    assert (counters.disk_hit_tokens, counters.primary_hit_tokens, counters.blocks_to_disk) == (32, 0, 4)
    simulation = summarize_sim(result, 2.0, 0.2)["simulation"]
    assert simulation["copy_s"] == pytest.approx(0.032 + 0.048 + 0.016)
    assert simulation["disk_tier"] == {"stored_at_end": 4 / 8}
    assert simulation["blocks_moved"]["disk_read"] == 2


def test_front_end_delays_each_request_on_its_way_in_and_each_token_on_its_way_out() -> None:
    """By hand: with only step intercepts (prefill 20 ms, decode 10 ms), 5 ms to the engine and 3 ms back."""
    steps = LinearStepModel(0.020, 0.010, 0.0, 0.0, 0.0, 0.0)
    front = FrontEnd(to_engine_s=0.005, to_client_s=0.003)
    pair = [SimRequest(0.0, 8, 2), SimRequest(0.004, 8, 2)]

    bare = Simulator(FleetConfig(), steps).run(pair)
    # The engine sees them at 0 and 4 ms: the first prefills alone (0-20 ms), the second joins the next step.
    assert list(bare.times.first_token_s) == pytest.approx([0.020, 0.040])

    result = Simulator(FleetConfig(InstanceConfig(front_end=front)), steps).run(pair)
    # At 5 and 9 ms: the first prefills alone (5-25 ms); the next step (25-45 ms) decodes it and prefills the
    # second, which finishes in the step after (45-55 ms). The client reads each token 3 ms later.
    assert list(result.times.first_token_s) == pytest.approx([0.028, 0.048])
    assert list(result.times.last_token_s) == pytest.approx([0.048, 0.058])
    summary = summarize_sim(result, 2.0, 0.2)
    assert summary["ttft_ms"]["p99"] == pytest.approx(48 - 4)  # from the arrival, not from reaching the engine

    lone = [SimRequest(0.0, 8, 3), SimRequest(10.0, 8, 3)]
    summary = summarize_sim(Simulator(FleetConfig(InstanceConfig(front_end=front)), steps).run(lone), 2.0, 0.2)
    assert summary["ttft_ms"]["p50"] == pytest.approx(5 + 20 + 3)
    assert summary["tpot_ms"]["p50"] == pytest.approx(10.0)  # the gaps between tokens are the engine's


def test_the_profile_visits_the_grid_in_alternating_rounds_and_pools_their_timings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forward, backward, forward: each point's sample is the median of every timing of its visits, so a
    slow spell of the machine cannot fall on one stretch of neighbouring points only. A point with more
    sequences than the engine schedules (--max-num-seqs 2) is timed with as many decodes as fit beside its
    prompt chunk."""
    from kvos.sim import profile

    visits: list[tuple[int, int, int]] = []

    def timed(core: EngineCore, prefill: int, batch: int, context: int, repeats: int, step_id: int) -> list[float]:
        visits.append((prefill, batch, context))
        # A machine that slows down over time: each visit's timings grow with how many visits came before.
        return [0.001 * len(visits) + 1e-6 * k for k in range(repeats)]

    monkeypatch.setattr(profile, "_time_point", timed)
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    config = EngineConfig.from_kwargs(
        model=str(tmp_path), load_format="dummy", kv_cache_memory_bytes=16 * 2**20, max_num_seqs=2
    )
    grid = profile.ProfileGrid(prefill_tokens=(0, 16), decode_batch_sizes=(0, 2), contexts=(8, 16), repeats=5)
    points = [(0, 2, 8), (0, 2, 16), (16, 0, 8), (16, 1, 8), (16, 1, 16)]
    assert grid.points() == [(0, 2, 8), (0, 2, 16), (16, 0, 8), (16, 2, 8), (16, 2, 16)]
    result = profile.profile_engine(config, grid)
    assert visits == points + points[::-1] + points
    n = len(points)
    for i, (shape, seconds) in enumerate(result.samples):
        t, b, length = points[i]
        assert (shape.prefill_tokens, shape.num_decodes, shape.decode_context) == (t, b, b * (length + 1))
        # Two timings a visit (5 repeats over 3 rounds, rounded up), at visits i+1, 2n-i and 2n+i+1.
        times = [0.001 * v + 1e-6 * k for v in (i + 1, 2 * n - i, 2 * n + i + 1) for k in range(2)]
        assert seconds == pytest.approx(statistics.median(times))


@pytest.mark.parametrize("decode_runs", [True, False], ids=["decode-runs", "one-by-one"])
def test_hidden_leading_tokens_delay_the_clients_first_token(decode_runs: bool) -> None:
    """By hand: prefill 20 ms, decode 10 ms. A request whose first 2 tokens show no text (an end-of-turn
    token that ignore_eos runs past) is first seen at its third token; its gaps count from there. A
    second request arriving mid-way cuts the first one's decode run, on either side of its first seen token."""
    steps = LinearStepModel(0.020, 0.010, 0.0, 0.0, 0.0, 0.0)
    alone = Simulator(FleetConfig(), steps, decode_runs=decode_runs).run([SimRequest(0.0, 8, 6, hidden_tokens=2)])
    # Tokens at 20, 30, 40, 50, 60, 70 ms; the client sees the third (40 ms) first.
    assert list(alone.times.first_token_s) == pytest.approx([0.040])
    assert list(alone.times.last_token_s) == pytest.approx([0.070])
    assert sorted(alone.times.itl_s) == pytest.approx([0.010] * 3)
    summary = summarize_sim(alone, 2.0, 0.2)
    assert summary["ttft_ms"]["p50"] == pytest.approx(40.0)
    assert summary["tpot_ms"]["p50"] == pytest.approx((70 - 40) / 5)  # as serve.py counts it: over tokens - 1

    pair = [SimRequest(0.0, 8, 6, hidden_tokens=3), SimRequest(0.025, 8, 2, hidden_tokens=1)]
    both = Simulator(FleetConfig(), steps, decode_runs=decode_runs).run(pair)
    # First: tokens at 20, 30; the second joins the step 30-50 (its prompt), so the first's third token is
    # at 50, then 60, 70, 80. The second's tokens at 50 (hidden) and 60.
    assert list(both.times.first_token_s) == pytest.approx([0.060, 0.060])
    assert list(both.times.last_token_s) == pytest.approx([0.080, 0.060])
    assert sorted(both.times.itl_s) == pytest.approx([0.010, 0.010])


@pytest.mark.parametrize("decode_runs", [True, False], ids=["decode-runs", "one-by-one"])
def test_a_step_pays_the_first_use_cost_once_per_row_count(decode_runs: bool) -> None:
    """By hand: prefill 20 ms, decode 10 ms, 5 ms more the first time an instance runs a row count (prompt
    tokens plus decodes). The first request's prompt (8 rows) and first decode (1 row) pay it; a later
    request's same counts do not, a third's 12-token prompt does, and so does the first step where two
    requests decode together (2 rows)."""
    steps = LinearStepModel(0.020, 0.010, 0.0, 0.0, 0.0, 0.0)
    requests = [SimRequest(0.0, 8, 20), SimRequest(1.0, 8, 20), SimRequest(2.0, 12, 20), SimRequest(2.001, 8, 20)]
    config = FleetConfig(InstanceConfig(first_use_s=0.005))
    result = Simulator(config, steps, decode_runs=decode_runs).run(requests)
    # 1: 25 + 15 + 18 x 10 ms. 2: the same counts, no extra. 3: 12 rows, new (2.000-2.025); 4 arrives
    # during it and its prompt runs beside 3's first decode (9 rows, new: 2.025-2.050); then both decode
    # (2 rows, new: 2.050-2.065; then 10 ms a step), and 4's last token alone (1 row, built).
    assert list(result.times.first_token_s) == pytest.approx([0.025, 1.020, 2.025, 2.050])
    assert list(result.times.last_token_s) == pytest.approx([0.220, 1.210, 2.065 + 0.010 * 17, 2.065 + 0.010 * 18])
    (instance,) = result.instances
    assert instance.worker.rows_run == {8, 1, 12, 9, 2}


def test_a_negative_first_use_cost_is_refused() -> None:
    with pytest.raises(ValueError, match="first_use_s must be >= 0, got -0.001"):
        InstanceConfig(first_use_s=-0.001)


def test_hidden_tokens_must_leave_a_token_to_see() -> None:
    with pytest.raises(ValueError, match=r"hidden_tokens must be >= 0 and below output_tokens \(3\), got 3"):
        SimRequest(0.0, 8, 3, hidden_tokens=3)


def roofline_args(folder: Path, **arch: Any) -> list[str]:
    """`kvos sim`'s flags for the roofline step model, files written into `folder`: a device of 200 GFLOP/s
    and 20 GB/s, and TINY_LLAMA with `arch`'s changes."""
    hardware, config = folder / "hw.json", folder / "config.json"
    hardware.write_text(json.dumps({"name": "cpu", "peak_flops": {"float32": 2e11}, "memory_bandwidth": 2e10}))
    config.write_text(json.dumps({**TINY_LLAMA, **arch}))
    return ["--hardware", str(hardware), "--arch", str(config)]


def test_cli_simulations_in_parallel_report_what_one_process_does(tmp_path: Path) -> None:
    """`--jobs`: rates, and plan searches, each in a forked process; the reports equal one process's."""
    model = roofline_args(tmp_path, hidden_size=256, max_position_embeddings=1024)
    common = [*model, "--fixed-lengths", "100,30", "--num-requests", "300"]
    commands = {
        "run": ["run", *common, "--rates", "5,20,inf", "--num-instances", "2", "--router", "least-requests"],
        "plan": [
            "plan",
            *common,
            "--rate",
            "40",
            "--router",
            "round-robin,least-requests",
            "--scheduling-policy",
            "fcfs,priority",
        ],
    }
    script = "import sys; from kvos.entrypoints.cli import main; sys.exit(main())"
    compared = {}
    for name, command in commands.items():
        reports = []
        for jobs in ("1", "3"):
            out = tmp_path / f"{name}-{jobs}.json"
            done = subprocess.run(
                [sys.executable, "-P", "-c", script, "sim", *command, "--jobs", jobs, "--json", str(out)],
                cwd=Path(__file__).resolve().parents[2],
                env={**os.environ, "KVOS_CACHE_DIR": str(tmp_path / "cache")},  # the Python, not a compiled build
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stderr[-2000:]
            report = json.loads(out.read_text())
            for run in report.get("runs", []):
                run.pop("simulation")  # its own speed: the one thing that differs
            reports.append(report)
        assert reports[0] == reports[1], name
        compared[name] = reports[0]
    assert [run["rate"] for run in compared["run"]["runs"]] == ["5.0", "20.0", "inf"]
    assert len(compared["plan"]["plans"]) == 4


def test_cli_jobs_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvos.entrypoints.cli import main

    model = [*roofline_args(tmp_path), "--fixed-lengths", "20,5"]
    assert main(["sim", "run", *model, "--rates", "1,2", "--jobs", "0"]) == 2
    assert "--jobs must be >= 1, got 0" in capsys.readouterr().err
