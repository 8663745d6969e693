"""The one replaced part: a worker that computes nothing and says how long it would have taken.

Beside it, the times that moving KV costs: down to and up from a tier
below the pool, host or disk (`CopyModel`), and between instances over a
link (`LinkModel`: live migration, disaggregation's hand-off).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvos.core.plan import SampledToken, SaveToDisk, SaveToHost, StepOutput, StepPlan
from kvos.memory.kv_manager import TierOps
from kvos.sim.step_model import StepShape, StepTimeModel, check_seconds

SIM_TOKEN_ID = 0
"""What every simulated request samples. Requests run with ignore_eos, as the serving benchmark sends them,
so they end at max_tokens whatever the id (it must only not be a stop token id, and simulated requests have none)."""

_SAMPLED = SampledToken(SIM_TOKEN_ID)


@dataclass(frozen=True)
class CopyModel:
    """Seconds per token that moving KV down to a tier (`save`) and back up (`load`) costs a step.

    One model per tier: the host tier's (pool <-> host memory) and the disk
    tier's (pool or host tier <-> files). The default moves it for free (no
    tier, or a study that ignores copies). `kvos sim profile` with a host or
    disk tier measures both on the real worker (`kvos.sim.profile`): the
    copy thread's time per token moved, per-op overhead included.
    `from_bandwidth` prices bytes over a bandwidth alone, a lower bound.
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

    Moves between tiers run on the real worker's copy thread, one job after
    another in plan order, overlapping the forward pass, which waits only for
    the jobs that touch blocks its requests use. Modelled, in queue order:
    the saves' job (disk writes, then write-backs and swap-outs to the host
    tier), the loads' job (host loads of requests scheduled this step, and
    copy-on-write copies, priced as loads), then the loads that fill blocks
    of waiting requests (their KV coming back from the host tier,
    `kv_loads`, and prefixes coming up from disk, `disk_loads`). The forward
    pass starts once the loads' job is done, or the saves' job if that
    touches the pool (a disk write from the host tier alone does not), and
    the step ends when it and the queue are both done, with the waiting
    requests' loads reported done (so they compute from the next step, as
    they do when the copy beats the forward pass).
    """

    def __init__(
        self,
        step_model: StepTimeModel,
        copy: CopyModel | None = None,
        block_size: int = 16,
        disk: CopyModel | None = None,
        first_use_s: float = 0.0,
    ) -> None:
        self.step_model = step_model
        self.first_use_s = first_use_s
        """What a step pays on top of its shape's time when its row count is new to this worker."""
        self.rows_run: set[int] = set()
        """Row counts the worker has run (`StepShape.rows`): their kernels are built. Kept only when a first use
        costs something."""
        self.copy = copy if copy is not None else CopyModel()
        """The host tier's moves."""
        self.disk = disk if disk is not None else CopyModel()
        """The disk tier's moves."""
        self.block_size = block_size
        self.clock_s = 0.0
        self.busy_s = 0.0
        """Time spent in steps, for utilisation."""
        self.copy_s = 0.0
        """Time the copy thread spent moving KV."""
        self._saves_s = 0.0
        """Moves down the tiers a migration's reservation forced between steps: the next step waits for them."""

    def first_use(self, rows: int) -> float:
        """The extra seconds a step of `rows` token rows pays now: `first_use_s` the first time, then 0.

        On a CPU, oneDNN builds a matmul for every row count of every linear
        the first time it meets it (`kvos.sim.profile` measures the cost). The
        real worker's process keeps what it built; so does this worker. (oneDNN
        keeps at most 1,024 matmuls, about 256 row counts of a Llama's four
        linear shapes, and builds an evicted one again; that is not modelled.)
        """
        if rows in self.rows_run:
            return 0.0
        self.rows_run.add(rows)
        return self.first_use_s

    def step_seconds(self, plan: StepPlan) -> float:
        if plan.scheduled:
            shape = StepShape.from_plan(plan)
            forward = self.step_model.step_seconds(shape)
            if self.first_use_s:
                forward += self.first_use(shape.rows)
        else:
            forward = 0.0
        if not (plan.moves_kv or plan.copies or self._saves_s):
            return forward
        host, disk, bs = self.copy, self.disk, self.block_size
        saves = self._saves_seconds(plan.disk_saves, plan.saves)
        loaded = bs * sum(op.num_blocks for op in plan.loads) + sum(op.num_slots for op in plan.copies)
        loads = loaded * host.load_s_per_token
        # A reservation's write-backs were queued before this plan's jobs (and counted in copy_s when forced).
        queued = saves + loads + self._saves_s
        pool_saves = plan.saves or any(op.tier == "primary" for op in plan.disk_saves)
        before = queued if (loaded or pool_saves) else self._saves_s
        self._saves_s = 0.0
        beside = bs * (
            sum(op.num_blocks for kv_load in plan.kv_loads for op in kv_load.loads) * host.load_s_per_token
            + len(plan.disk_loads) * disk.load_s_per_token
        )
        self.copy_s += saves + loads + beside
        return max(before + forward, queued + beside)

    def _saves_seconds(self, disk_saves: Sequence[SaveToDisk], saves: Sequence[SaveToHost]) -> float:
        """The saves' job: disk writes (a block each), then write-backs to the host tier."""
        return self.block_size * (
            len(disk_saves) * self.disk.save_s_per_token
            + sum(op.num_blocks for op in saves) * self.copy.save_s_per_token
        )

    # -- live migration: the books move blocks, a link model times them (`kvos.sim.migration`) --

    def read_blocks(self, block_ids: Sequence[int]) -> None:
        """No bytes to copy out: the chunk carries only its size."""
        return None

    def write_blocks(self, block_ids: Sequence[int], data: None) -> None:
        """No bytes to copy in: the link's time was spent before the call landed."""

    def write_down(self, ops: TierOps) -> StepOutput:
        """The moves down the tiers a reservation forced: the real worker runs them before its next step.
        None fails (every simulated write lands)."""
        seconds = self._saves_seconds(ops.disk_saves, ops.saves)
        self._saves_s += seconds
        self.copy_s += seconds
        return StepOutput(-1)

    def execute(self, plan: StepPlan) -> StepOutput:
        seconds = self.step_seconds(plan)
        self.clock_s += seconds
        self.busy_s += seconds
        sampled = {s.req_id: _SAMPLED for s in plan.scheduled if s.sample}
        return StepOutput(
            plan.step_id,
            sampled,
            kv_loaded=[(load.req_id, plan.step_id) for load in plan.kv_loads],
            disk_loaded=[op.key for op in plan.disk_loads],
        )
