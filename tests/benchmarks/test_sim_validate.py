"""The validation's simulation of a measured run with what that run's engine saw: its own steps' times
(the worker from `Worker.execute`'s times, the overhead from the rest of a step) and its arrival order."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from benchmarks.sim_validate import fit_on_run, in_engine_order
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
                steps.append({"shape": asdict(shape), "worker": worker, "seconds": served})
    return steps


def test_a_run_fitted_on_itself_recovers_its_worker_and_serving_overhead() -> None:
    model = fit_on_run(served_steps())
    assert isinstance(model.worker, LinearStepModel)
    for name, value in asdict(WORKER).items():
        assert getattr(model.worker, name) == pytest.approx(value, rel=1e-6, abs=1e-12), name
    assert model.overhead.per_step == pytest.approx(PER_STEP, rel=1e-6)
    assert model.overhead.per_sequence == pytest.approx(PER_SEQUENCE, rel=1e-6)


def test_requests_reach_the_simulated_engine_in_the_order_the_real_one_queued_them() -> None:
    sent = [SimRequest(0.0, 10, 4), SimRequest(0.0, 20, 4), SimRequest(0.5, 30, 4), SimRequest(0.501, 40, 4)]
    ordered = in_engine_order(sent, [1, 0, 3, 2])
    assert [r.prompt_tokens for r in ordered] == [20, 10, 40, 30]
    # The one sent at 0.5 was queued behind one sent a moment later: it arrives with it, never before.
    assert [r.arrival_s for r in ordered] == [0.0, 0.0, 0.501, 0.501]
    with pytest.raises(ValueError, match="each of the 4 requests once"):
        in_engine_order(sent, [0, 1, 1, 2])
