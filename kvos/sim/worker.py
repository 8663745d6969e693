"""The one replaced part: a worker that computes nothing and says how long it would have taken."""

from __future__ import annotations

from dataclasses import dataclass

from kvos.core.plan import SampledToken, StepOutput, StepPlan
from kvos.sim.step_model import StepShape, StepTimeModel, check_seconds

SIM_TOKEN_ID = 0
"""What every simulated request samples. Requests run with ignore_eos, as the serving benchmark sends them,
so they end at max_tokens whatever the id (it must only not be a stop token id, and simulated requests have none)."""

_SAMPLED = SampledToken(SIM_TOKEN_ID)


@dataclass(frozen=True)
class CopyModel:
    """Seconds per token that moving KV to the host tier (`save`) and back into the pool (`load`) costs a step.

    The default moves it for free (no tier, or a study that ignores copies).
    `kvos sim profile` with a host tier measures both on the real worker
    (`kvos.sim.profile`): what a move adds to a step, per-op overhead and the
    forward pass's wait included. `from_bandwidth` prices bytes over a
    bandwidth alone, a lower bound.
    """

    save_s_per_token: float = 0.0
    load_s_per_token: float = 0.0

    def __post_init__(self) -> None:
        check_seconds(self, "save_s_per_token", "load_s_per_token")

    @classmethod
    def from_bandwidth(cls, kv_bytes_per_token: int, bytes_per_s: float) -> CopyModel:
        if not (kv_bytes_per_token >= 0 and bytes_per_s > 0):
            raise ValueError(
                f"need kv_bytes_per_token >= 0 and bytes_per_s > 0, got {kv_bytes_per_token}, {bytes_per_s}"
            )
        return cls(kv_bytes_per_token / bytes_per_s, kv_bytes_per_token / bytes_per_s)


class SimWorker:
    """`execute(plan) -> StepOutput` as `kvos.worker.Worker` answers, advancing a virtual clock by the step's time.

    Moves between the pool and the host tier run on the real worker's copy
    thread in plan order, overlapping the forward pass, which waits only for
    those its requests need. Modelled: the write-backs and swap-outs
    (`saves`), the loads of requests scheduled this step (`loads`) and
    copy-on-write copies (priced as loads) come first and the forward pass
    waits for them; the loads of requests waiting for their KV (`kv_loads`)
    overlap it, and the step ends when both are done, with those requests'
    loads reported done (so they compute from the next step, as they do
    when the copy beats the forward pass).
    """

    def __init__(self, step_model: StepTimeModel, copy: CopyModel | None = None, block_size: int = 16) -> None:
        self.step_model = step_model
        self.copy = copy if copy is not None else CopyModel()
        self.block_size = block_size
        self.clock_s = 0.0
        self.busy_s = 0.0
        """Time spent in steps, for utilisation."""
        self.copy_s = 0.0
        """Time the copy thread spent moving KV."""

    def step_seconds(self, plan: StepPlan) -> float:
        forward = self.step_model.step_seconds(StepShape.from_plan(plan)) if plan.scheduled else 0.0
        if not (plan.saves or plan.loads or plan.kv_loads or plan.copies):
            return forward
        copy, bs = self.copy, self.block_size
        saved = bs * sum(op.num_blocks for op in plan.saves)
        loaded = bs * sum(op.num_blocks for op in plan.loads) + sum(op.num_slots for op in plan.copies)
        before = saved * copy.save_s_per_token + loaded * copy.load_s_per_token
        beside = bs * sum(op.num_blocks for kv_load in plan.kv_loads for op in kv_load.loads) * copy.load_s_per_token
        self.copy_s += before + beside
        return before + max(forward, beside)

    def execute(self, plan: StepPlan) -> StepOutput:
        seconds = self.step_seconds(plan)
        self.clock_s += seconds
        self.busy_s += seconds
        sampled = {s.req_id: _SAMPLED for s in plan.scheduled if s.sample}
        return StepOutput(plan.step_id, sampled, kv_loaded=[(load.req_id, plan.step_id) for load in plan.kv_loads])
