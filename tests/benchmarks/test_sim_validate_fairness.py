"""The fairness validation simulates what the server was sent: send times, lengths, tenants, priorities."""

from __future__ import annotations

import pytest

from benchmarks.sharegpt import BenchRequest
from benchmarks.sim_validate import in_engine_order
from benchmarks.sim_validate_fairness import in_send_order, sim_requests, simulated_report
from kvos.config import SchedulerConfig
from kvos.sim.simulator import InstanceConfig
from kvos.sim.step_model import LinearStepModel

STREAMS = {
    "heavy": [(0.0, BenchRequest("h0", [1] * 40, 8)), (0.5, BenchRequest("h1", [1] * 20, 4))],
    "light": [(0.2, BenchRequest("l0", [1] * 30, 6))],
}


def test_requests_keep_their_send_times_lengths_tenants_and_the_light_tenants_urgency() -> None:
    fcfs = sim_requests("fcfs", STREAMS)
    # In the streams' order, as the client lists its results, so a run's records index both alike.
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens, r.tenant, r.priority) for r in fcfs] == [
        (0.0, 40, 8, "heavy", 0),
        (0.5, 20, 4, "heavy", 0),
        (0.2, 30, 6, "light", 0),
    ]
    assert [r.arrival_s for r in in_send_order(fcfs)] == [0.0, 0.2, 0.5]
    assert [r.priority for r in sim_requests("priority", STREAMS)] == [1, 1, 0]  # lower is more urgent


def test_the_simulated_report_counts_each_tenants_tokens_over_the_run() -> None:
    steps = LinearStepModel(0.020, 0.010, 0.0, 0.0, 0.0, 0.0)
    instance = InstanceConfig(scheduler=SchedulerConfig(policy="fair", max_num_seqs=1))
    report = simulated_report("fair", instance, steps, in_send_order(sim_requests("fair", STREAMS)))
    # One sequence at a time, every request alone: 20 ms for its prompt and first token, 10 ms per token after.
    # h0 ends at 0.02 + 7 x 0.01 = 0.09; l0 at 0.2 + 0.07 = 0.27; h1 at 0.5 + 0.05 = 0.55.
    assert report["duration_s"] == pytest.approx(0.55)
    assert report["tenants"]["heavy"]["output_tokens_per_s"] == pytest.approx(12 / 0.55)
    assert report["tenants"]["light"]["output_tokens_per_s"] == pytest.approx(6 / 0.55)
    assert report["tenants"]["light"]["ttft_ms"]["p50"] == pytest.approx(20.0)


def test_a_run_fitted_on_itself_takes_the_requests_in_the_engines_order() -> None:
    # The engine took the light request (index 2) before h1 (index 1): the order the instrumented server saw.
    specs = in_engine_order(sim_requests("fcfs", STREAMS), [0, 2, 1])
    assert [(r.tenant, r.arrival_s) for r in specs] == [("heavy", 0.0), ("light", 0.2), ("heavy", 0.5)]
    steps = LinearStepModel(0.020, 0.010, 0.0, 0.0, 0.0, 0.0)
    instance = InstanceConfig(scheduler=SchedulerConfig(max_num_seqs=1))
    report = simulated_report("fcfs", instance, steps, specs)
    assert report["tenants"]["light"]["ttft_ms"]["p50"] == pytest.approx(20.0)
    assert report["tenants"]["heavy"]["completed"] == 2
