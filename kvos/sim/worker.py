"""The one replaced part: a worker that computes nothing and says how long it would have taken.

Beside it, the times that moving KV costs: to and from the host tier
(`CopyModel`) and between instances over a link (`LinkModel`: live
migration, disaggregation's hand-off).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvos.core.plan import SampledToken, SaveToHost, StepOutput, StepPlan
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


@dataclass(frozen=True)
class LinkModel:
    """Time to move KV from one instance to another: a fixed latency, then the bytes over the bandwidth."""

    bandwidth_bytes_per_s: float
    kv_bytes_per_token: int
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.bandwidth_bytes_per_s > 0:
            raise ValueError(f"bandwidth_bytes_per_s must be > 0, got {self.bandwidth_bytes_per_s}")
        if self.kv_bytes_per_token < 1:
            raise ValueError(f"kv_bytes_per_token must be >= 1, got {self.kv_bytes_per_token}")
        if not self.latency_s >= 0:
            raise ValueError(f"latency_s must be >= 0, got {self.latency_s}")

    def seconds(self, num_tokens: int) -> float:
        return self.latency_s + num_tokens * self.kv_bytes_per_token / self.bandwidth_bytes_per_s


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
        self._saves_s = 0.0
        """Write-backs a migration's reservation forced between steps: the next step waits for them."""

    def step_seconds(self, plan: StepPlan) -> float:
        forward = self.step_model.step_seconds(StepShape.from_plan(plan)) if plan.scheduled else 0.0
        if not (plan.saves or plan.loads or plan.kv_loads or plan.copies or self._saves_s):
            return forward
        copy, bs = self.copy, self.block_size
        saved = bs * sum(op.num_blocks for op in plan.saves)
        loaded = bs * sum(op.num_blocks for op in plan.loads) + sum(op.num_slots for op in plan.copies)
        moved = saved * copy.save_s_per_token + loaded * copy.load_s_per_token
        before = moved + self._saves_s  # the reservation's write-backs were counted in copy_s when forced
        self._saves_s = 0.0
        beside = bs * sum(op.num_blocks for kv_load in plan.kv_loads for op in kv_load.loads) * copy.load_s_per_token
        self.copy_s += moved + beside
        return before + max(forward, beside)

    # -- live migration: the books move blocks, a link model times them (`kvos.sim.migration`) --

    def read_blocks(self, block_ids: Sequence[int]) -> None:
        """No bytes to copy out: the chunk carries only its size."""
        return None

    def write_blocks(self, block_ids: Sequence[int], data: None) -> None:
        """No bytes to copy in: the link's time was spent before the call landed."""

    def save_to_host(self, saves: list[SaveToHost]) -> None:
        """The write-backs a reservation forced: the real worker runs them before its next step."""
        seconds = self.block_size * sum(op.num_blocks for op in saves) * self.copy.save_s_per_token
        self._saves_s += seconds
        self.copy_s += seconds

    def execute(self, plan: StepPlan) -> StepOutput:
        seconds = self.step_seconds(plan)
        self.clock_s += seconds
        self.busy_s += seconds
        sampled = {s.req_id: _SAMPLED for s in plan.scheduled if s.sample}
        return StepOutput(plan.step_id, sampled, kv_loaded=[(load.req_id, plan.step_id) for load in plan.kv_loads])
