"""The one replaced part: a worker that computes nothing and says how long it would have taken."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvos.core.plan import SampledToken, StepOutput, StepPlan
from kvos.sim.step_model import StepShape, StepTimeModel

SIM_TOKEN_ID = 0
"""What every simulated request samples. Requests run with ignore_eos, as the serving benchmark sends them,
so they end at max_tokens whatever the id (it must only not be a stop token id, and simulated requests have none)."""

_SAMPLED = SampledToken(SIM_TOKEN_ID)


@dataclass(frozen=True)
class CopyModel:
    """Time to move KV between the pool and the host tier: bytes over the copy rate.

    The default moves it for free (no tier, or a study that ignores copies).
    On a real engine both numbers are logged at start-up with a host tier
    (`preemption auto` measures the copy rate) and `KVShape.bytes_per_token`
    gives the size.
    """

    kv_bytes_per_token: int = 0
    bytes_per_s: float = math.inf

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token < 0:
            raise ValueError(f"kv_bytes_per_token must be >= 0, got {self.kv_bytes_per_token}")
        if not self.bytes_per_s > 0:
            raise ValueError(f"bytes_per_s must be > 0, got {self.bytes_per_s}")

    def seconds(self, num_tokens: int) -> float:
        return num_tokens * self.kv_bytes_per_token / self.bytes_per_s


class SimWorker:
    """`execute(plan) -> StepOutput` as `kvos.worker.Worker` answers, advancing a virtual clock by the step's time.

    Moves between the pool and the host tier run on the real worker's copy
    thread in plan order, overlapping the forward pass, which waits only for
    those its requests need. Modelled: the write-backs and swap-outs
    (`saves`), the loads of requests scheduled this step (`loads`) and
    copy-on-write copies come first and the forward pass waits for them; the
    loads of requests waiting for their KV (`kv_loads`) overlap it, and the
    step ends when both are done, with those requests' loads reported done
    (so they compute from the next step, as they do when the copy beats the
    forward pass).
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
        blocks_before = sum(op.num_blocks for op in plan.saves) + sum(op.num_blocks for op in plan.loads)
        blocks_beside = sum(op.num_blocks for kv_load in plan.kv_loads for op in kv_load.loads)
        before = self.copy.seconds(blocks_before * self.block_size + sum(op.num_slots for op in plan.copies))
        beside = self.copy.seconds(blocks_beside * self.block_size)
        self.copy_s += before + beside
        return before + max(forward, beside)

    def execute(self, plan: StepPlan) -> StepOutput:
        seconds = self.step_seconds(plan)
        self.clock_s += seconds
        self.busy_s += seconds
        sampled = {s.req_id: _SAMPLED for s in plan.scheduled if s.sample}
        return StepOutput(plan.step_id, sampled, kv_loaded=[(load.req_id, plan.step_id) for load in plan.kv_loads])
