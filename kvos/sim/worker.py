"""The one replaced part: a worker that computes nothing and says how long it would have taken."""

from __future__ import annotations

from kvos.core.plan import SampledToken, StepOutput, StepPlan
from kvos.sim.step_model import StepShape, StepTimeModel

SIM_TOKEN_ID = 0
"""What every simulated request samples. Requests run with ignore_eos, as the serving benchmark sends them,
so they end at max_tokens whatever the id (it must only not be a stop token id, and simulated requests have none)."""

_SAMPLED = SampledToken(SIM_TOKEN_ID)


class SimWorker:
    """`execute(plan) -> StepOutput` as `kvos.worker.Worker` answers, advancing a virtual clock by the step's time."""

    def __init__(self, step_model: StepTimeModel) -> None:
        self.step_model = step_model
        self.clock_s = 0.0
        self.busy_s = 0.0
        """Time spent in steps, for utilisation."""

    def step_seconds(self, plan: StepPlan) -> float:
        return self.step_model.step_seconds(StepShape.from_plan(plan)) if plan.scheduled else 0.0

    def execute(self, plan: StepPlan) -> StepOutput:
        seconds = self.step_seconds(plan)
        self.clock_s += seconds
        self.busy_s += seconds
        sampled = {s.req_id: _SAMPLED for s in plan.scheduled if s.sample}
        # The step model does not time copies: a swap-in is done by the end of the step that asked for it.
        return StepOutput(plan.step_id, sampled, kv_loaded=[(load.req_id, plan.step_id) for load in plan.kv_loads])
