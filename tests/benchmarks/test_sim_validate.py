"""The validation's simulation of a measured run with what that run's engine saw: its own steps' times
(the worker from `Worker.execute`'s times, the overhead from the rest of a step), its arrival order, and the
machine's speed through the run."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from benchmarks.sim_validate import WithRunSpeed, fit_on_run, in_engine_order, in_run_speed
from kvos.config import SchedulerConfig
from kvos.sim.simulator import FleetConfig, InstanceConfig, Simulator
from kvos.sim.step_model import LinearStepModel, StepShape
from kvos.sim.workload import SimRequest

WORKER = LinearStepModel(
    prefill_intercept=0.020,
    decode_intercept=0.010,
    per_prefill_token=1.0e-4,
    per_attention_pair=2.0e-8,
    per_context_token=1.0e-6,
    per_decode=3.0e-4,
)
PER_STEP, PER_SEQUENCE = 0.004, 0.0005


def served_steps() -> list[dict]:
    """Steps as `profile_serving.served_steps` gives them: the worker's time and the whole served time."""
    steps = []
    for prefill in (0, 64, 200):
        for decodes in (1, 4, 16, 40):
            for context in (100, 900, 3000):
                shape = StepShape(
                    prefill_tokens=prefill,
                    attention_pairs=prefill * (context + prefill),
                    num_decodes=decodes,
                    decode_context=context * decodes,
                    num_prefills=1 if prefill else 0,
                )
                worker = WORKER.step_seconds(shape)
                served = worker + PER_STEP + PER_SEQUENCE * (shape.num_prefills + decodes)
                steps.append({"shape": asdict(shape), "worker": worker, "seconds": served, "new_rows": False})
    return steps


def test_a_run_fitted_on_itself_recovers_its_worker_and_serving_overhead() -> None:
    model = fit_on_run(served_steps())
    assert isinstance(model.worker, LinearStepModel)
    for name, value in asdict(WORKER).items():
        assert getattr(model.worker, name) == pytest.approx(value, rel=1e-6, abs=1e-12), name
    assert model.overhead.per_step == pytest.approx(PER_STEP, rel=1e-6)
    assert model.overhead.per_sequence == pytest.approx(PER_SEQUENCE, rel=1e-6)


def test_steps_that_ran_a_row_count_first_are_left_out_of_a_runs_fit() -> None:
    """Their extra time is the first-use cost the simulated worker adds on its own: fitted in, it would be
    counted twice."""
    steps = served_steps()
    for step in steps[::5]:
        step["new_rows"] = True
        step["worker"] += 0.003
        step["seconds"] += 0.003
    model = fit_on_run(steps)
    for name, value in asdict(WORKER).items():
        assert getattr(model.worker, name) == pytest.approx(value, rel=1e-6, abs=1e-12), name
    assert model.overhead.per_step == pytest.approx(PER_STEP, rel=1e-6)


def test_requests_reach_the_simulated_engine_in_the_order_the_real_one_queued_them() -> None:
    sent = [SimRequest(0.0, 10, 4), SimRequest(0.0, 20, 4), SimRequest(0.5, 30, 4), SimRequest(0.501, 40, 4)]
    ordered = in_engine_order(sent, [1, 0, 3, 2])
    assert [r.prompt_tokens for r in ordered] == [20, 10, 40, 30]
    # The one sent at 0.5 was queued behind one sent a moment later: it arrives with it, never before.
    assert [r.arrival_s for r in ordered] == [0.0, 0.0, 0.501, 0.501]
    with pytest.raises(ValueError, match="each of the 4 requests once"):
        in_engine_order(sent, [0, 1, 1, 2])


def test_the_runs_speed_is_measured_window_by_window_and_replayed_step_by_step() -> None:
    steps = served_steps()  # 36 steps
    for k, step in enumerate(steps):
        step["seconds"] *= 1.25 if k < 20 else 0.8  # the machine slowed down, then sped up
    model = fit_on_run(served_steps())
    scales = in_run_speed(model, steps, window=10)
    assert scales == pytest.approx([1.25, 1.25, 0.8, 0.8], rel=1e-6)

    shape = StepShape(**steps[0]["shape"])
    sped = WithRunSpeed(model, [2.0, 0.5], window=3)
    times = [sped.step_seconds(shape) for _ in range(8)]
    base = model.step_seconds(shape)
    # Steps 0-2 in the first window, 3-5 in the second, and after the run's end its last speed holds.
    assert times == pytest.approx([2 * base] * 3 + [0.5 * base] * 5)


def test_a_simulated_request_takes_its_steps_at_the_runs_speed() -> None:
    # One request alone: a 20 ms prompt step, then 10 ms decode steps; the run's first two steps at 1.5x.
    model = LinearStepModel(0.020, 0.010, 0.0, 0.0, 0.0, 0.0)
    sped = WithRunSpeed(model, [1.5, 1.0], window=2)
    instance = InstanceConfig(scheduler=SchedulerConfig(max_num_seqs=1))
    result = Simulator(FleetConfig(instance), sped, decode_runs=False).run([SimRequest(0.0, 16, 5)])
    assert result.times.first_token_s[0] == pytest.approx(0.030)
    assert result.times.last_token_s[0] == pytest.approx(0.030 + 0.015 + 3 * 0.010)
    with pytest.raises(NotImplementedError, match="decode_runs=False"):
        Simulator(FleetConfig(instance), WithRunSpeed(model, [1.0]), decode_runs=True).run([SimRequest(0.0, 16, 50)])
