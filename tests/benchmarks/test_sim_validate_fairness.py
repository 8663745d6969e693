"""The fairness validation simulates what the server was sent: send times, lengths, tenants, priorities."""

from __future__ import annotations

import pytest

from benchmarks.sharegpt import BenchRequest
from benchmarks.sim_validate_fairness import sim_requests, simulated_report
from kvos.config import SchedulerConfig
from kvos.sim.simulator import InstanceConfig
from kvos.sim.step_model import LinearStepModel

STREAMS = {
    "heavy": [(0.0, BenchRequest("h0", [1] * 40, 8)), (0.5, BenchRequest("h1", [1] * 20, 4))],
    "light": [(0.2, BenchRequest("l0", [1] * 30, 6))],
}


def test_requests_keep_their_send_times_lengths_tenants_and_the_light_tenants_urgency() -> None:
    fcfs = sim_requests("fcfs", STREAMS)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens, r.tenant, r.priority) for r in fcfs] == [
        (0.0, 40, 8, "heavy", 0),
        (0.2, 30, 6, "light", 0),
        (0.5, 20, 4, "heavy", 0),
    ]
    assert [r.priority for r in sim_requests("priority", STREAMS)] == [1, 0, 1]  # lower is more urgent


def test_the_simulated_report_counts_each_tenants_tokens_over_the_run() -> None:
    steps = LinearStepModel(0.020, 0.010, 0.0, 0.0, 0.0, 0.0)
    instance = InstanceConfig(scheduler=SchedulerConfig(policy="fair", max_num_seqs=1))
    report = simulated_report("fair", instance, steps, sim_requests("fair", STREAMS))
    # One sequence at a time, every request alone: 20 ms for its prompt and first token, 10 ms per token after.
    # h0 ends at 0.02 + 7 x 0.01 = 0.09; l0 at 0.2 + 0.07 = 0.27; h1 at 0.5 + 0.05 = 0.55.
    assert report["duration_s"] == pytest.approx(0.55)
    assert report["tenants"]["heavy"]["output_tokens_per_s"] == pytest.approx(12 / 0.55)
    assert report["tenants"]["light"]["output_tokens_per_s"] == pytest.approx(6 / 0.55)
    assert report["tenants"]["light"]["ttft_ms"]["p50"] == pytest.approx(20.0)
