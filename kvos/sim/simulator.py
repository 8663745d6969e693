"""The event loop: arrivals and step completions of many instances on one virtual clock.

    arrivals (sorted) --front end--> router --> instance.inbox
                                                    |  (delivered between steps, as AsyncLLMEngine drains commands)
    heap of step ends  <--- instance.start_step(now):  Scheduler.schedule() -> StepPlan
                                                      SimWorker.execute(plan) -> StepOutput, + step time
    pop the earliest   ---> instance.finish_step():    Scheduler.update_from_output(plan, output)

An arrival that finds its instance idle schedules a wake-up at the same
instant, which sorts after every arrival of that instant, so simultaneous
arrivals share the first step as they do in the engine. Each instance is
kvos's own `Scheduler` over a `PagedKVCacheManager` (or, with
`InstanceConfig.virtual`, the virtual cache's `VirtualKVCacheManager` on a
region without memory); the order of calls is `EngineCore.step`'s (including its flush of ended
requests when nothing is left), so the plans are the ones the engine would
make given the same arrivals and step times.

With a front end (`InstanceConfig.front_end`, measured by
`benchmarks.profile_serving`), a request reaches the router and its engine
`to_engine_s` after it arrives, and every token reaches the client
`to_client_s` after its step ends; TTFT and latency count from the arrival.

Chat sessions (`SimSession`) are a closed loop beside the sorted arrivals:
a heap of turns due, each pushed when the turn before it ends (its last
token read by the client, plus the think time), its prompt that turn's
prompt and output plus new tokens. A host tier (`InstanceConfig.host`)
puts the engine's own host-tier books under the pool, and a disk tier
(`InstanceConfig.disk`) its disk-tier books under that; the worker model
times their moves (`SimWorker`).

Live migration (`kvos.sim.migration`: load balancing, and the hand-off
of a disaggregated fleet) puts two more kinds of entry on the heap of step
ends: an imbalance check, and a migration call due, which runs at its
instance's next step boundary.

Decode runs (the fast path). Most steps change nothing the scheduler
decides on: every running request decodes one token, nobody waits, nobody
finishes, and the KV pool has blocks to spare. For such a state the next k
steps are known in advance: the same requests, one token each, the step
times from the model, new blocks at block boundaries. The instance then
takes them as one event (`DecodeRun`): k is capped at the step before the
first request finishes and at what the free blocks cover; an arrival
routed to the instance mid-run cuts the run at the first step boundary at
or after it, where the one-by-one engine would have taken it in. Applying
a run makes the same calls on the real books as the steps would (blocks
taken from `allocate_slots` in step order, the full blocks published) and
advances the scheduler's step counter; the next step that could decide
something (a finish, an admission, a preemption) runs through
`Scheduler.schedule` as before. Only policies whose queue and accounting
ignore pure decode steps with an empty queue qualify (`FAST_POLICIES`);
`tests/sim` checks that runs and one-by-one steps give the same plans and
times.
"""

from __future__ import annotations

import bisect
import functools
import gc
import heapq
import itertools
import math
import operator
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from kvos.cluster.config import ClusterConfig
from kvos.cluster.instance import InstanceLoad, instance_load
from kvos.cluster.migration import MigrationResult
from kvos.cluster.routers import InstanceView, leading_blocks
from kvos.config import SchedulerConfig
from kvos.core.migration import MigrationEndpoint
from kvos.core.plan import SequenceUpdate, StepOutput, StepPlan
from kvos.core.request import Request
from kvos.core.scheduler import Scheduler
from kvos.memory.block_allocator import BlockStored, KVEvent
from kvos.memory.block_hash import BlockHash
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.memory.shape import KVShape
from kvos.memory.tiers.disk import DiskBlockIndex
from kvos.memory.tiers.host import HostBlockPool
from kvos.memory.tiers.swap import PreemptionRule
from kvos.memory.virtual.virtual_kv_manager import DEFAULT_LOOKAHEAD_TOKENS, VirtualKVCacheManager
from kvos.sampling_params import SamplingParams
from kvos.sim.migration import REBALANCE, MigrationConfig, Migrations
from kvos.sim.router import make_router
from kvos.sim.step_model import FrontEnd, StepTimeModel
from kvos.sim.worker import SIM_TOKEN_ID, CopyModel, LinkModel, SimWorker
from kvos.sim.workload import SimRequest, SimSession

MAX_EMPTY_STEPS = 1000
"""Consecutive steps that plan nothing while requests wait: the scheduler is stuck, not slow."""

FAST_POLICIES = frozenset({"fcfs", "priority"})
"""Policies for which a pure decode step with nobody waiting changes no queue state: their `on_step` does
nothing and `displace` needs a waiting head. (The fair policy counts every decoded token as service.)"""

SHARED_TOKEN_ID = -1
"""The sessions' shared prefix is made of it: an id no simulated prompt uses elsewhere (none reaches a model)."""

META = torch.device("meta")
"""The device of the virtual cache's books: no memory behind them."""

MIN_DECODE_RUN = 2
"""Shorter runs take the ordinary path: one step gains nothing from the bookkeeping."""


@dataclass
class DecodeRun:
    """Steps 1..k of a stretch of pure decodes, taken as one event; `ends[j-1]` is when step j ends."""

    start_s: float
    requests: list[Request]
    ends: list[float]
    seconds: list[float]
    context0: list[int]
    """Each request's computed tokens before the run."""
    boundaries: list[int] = field(default_factory=list)
    """The steps that take a new block, one entry per block, in order (kept for reporting instances only)."""


@dataclass(frozen=True)
class HostTierConfig:
    """The host tier's size, and how fast KV moves to and from it.

    Its books are the engine's own (`HostBlockPool` under the paged
    manager): write-back of cached blocks the pool reuses, prefix hits found
    there, swap-out and swap-in of preempted requests. Moves cost `copy`'s
    seconds per token on the worker's copy thread (`SimWorker`).
    `preemption_mode` is the engine's `--preemption-mode` less `auto`, which
    weighs a measured copy rate against a measured compute rate: on the
    machines profiled here it swaps every victim, so take "swap" for it.
    """

    capacity_tokens: int
    copy: CopyModel = field(default_factory=CopyModel)
    preemption_mode: Literal["swap", "recompute"] = "swap"

    def __post_init__(self) -> None:
        if self.capacity_tokens < 1:
            raise ValueError(f"the host tier's capacity_tokens must be >= 1, got {self.capacity_tokens}")
        if self.preemption_mode not in ("swap", "recompute"):
            raise ValueError(f"preemption_mode must be 'swap' or 'recompute', got {self.preemption_mode!r}")


@dataclass(frozen=True)
class DiskTierConfig:
    """The disk tier's size, and how fast KV moves to and from it.

    Its books are the engine's own (`DiskBlockIndex` under the paged
    manager): cached blocks the tier above reuses are written to disk
    (below the host tier, or below the pool without one), and a waiting
    request whose prefix continues on disk loads it first. Every file is
    found intact (no corrupt or missing blocks), and the directory starts
    empty. Moves cost `copy`'s seconds per token on the copy thread.
    """

    capacity_tokens: int
    copy: CopyModel = field(default_factory=CopyModel)

    def __post_init__(self) -> None:
        if self.capacity_tokens < 1:
            raise ValueError(f"the disk tier's capacity_tokens must be >= 1, got {self.capacity_tokens}")


@dataclass(frozen=True)
class VirtualCacheConfig:
    """The virtual KV cache (vAttention, `--kv-cache virtual`) in place of the paged pool.

    Its books are the engine's own (`VirtualKVCacheManager`) over a region
    without memory (`BooksRegion`): a row per running request, pages
    committed as requests grow, deferred reclamation, no prefix sharing. The
    page math needs the shape of a token's KV and the device's page size
    (4 KiB on a host, 2 MiB on a GPU). The background look-ahead mapper is
    modelled as always done before the next allocation.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    page_size: int
    lookahead_tokens: int = DEFAULT_LOOKAHEAD_TOKENS

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"the virtual cache's {name} must be >= 1, got {getattr(self, name)}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"the virtual cache's dtype must name a torch dtype, got {self.dtype!r}")
        if self.lookahead_tokens < 0:
            raise ValueError(f"lookahead_tokens must be >= 0, got {self.lookahead_tokens}")

    @classmethod
    def of_profile(cls, engine: dict, page_size: int | None = None) -> VirtualCacheConfig:
        """The cache a profile's engine (`Profile.engine`) ran, at its page size unless `page_size` is given."""
        return cls(**engine["kv_shape"], page_size=page_size or engine["kv_page_size"])

    def shape(self) -> KVShape:
        return KVShape(self.num_layers, self.num_kv_heads, self.head_dim, getattr(torch, self.dtype), META)


@dataclass(frozen=True)
class InstanceConfig:
    """One simulated engine: its scheduler config and its KV cache's size (what `EngineCore` would measure)."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv_capacity_tokens: int = 65536
    block_size: int = 16
    max_model_len: int = 8192
    enable_prefix_caching: bool = True
    front_end: FrontEnd = field(default_factory=FrontEnd)
    """The server's front end before the engine and back to the client; the default, zero, is a bare engine."""
    first_use_s: float = 0.0
    """What a step pays once more when its row count is new to the instance (`Profile.first_use_seconds`);
    the default, zero, is an engine that built every kernel before its first request."""
    host: HostTierConfig | None = None
    """A host KV tier below the pool (`--kv-offload-size`), or none."""
    disk: DiskTierConfig | None = None
    """A disk KV tier below the host tier or the pool (`--kv-disk-size`), or none."""
    virtual: VirtualCacheConfig | None = None
    """The virtual KV cache instead of the paged pool (`--kv-cache virtual`), or none. Its budget is
    `kv_capacity_tokens` tokens of KV; `block_size` is then the host tier's block."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_capacity_tokens < self.block_size:
            raise ValueError(
                f"kv_capacity_tokens must hold one block of {self.block_size}, got {self.kv_capacity_tokens}"
            )
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not self.first_use_s >= 0:
            raise ValueError(f"first_use_s must be >= 0, got {self.first_use_s}")
        if self.virtual is not None and self.disk is not None:
            raise ValueError(
                "a disk tier needs the paged cache: it keeps prefix-cache blocks by digest, and the virtual "
                "cache shares no prefix"
            )
        for name, tier in (("host", self.host), ("disk", self.disk)):
            if tier is not None and tier.capacity_tokens < self.block_size:
                raise ValueError(
                    f"the {name} tier's capacity_tokens must hold one block of {self.block_size}, "
                    f"got {tier.capacity_tokens}"
                )


@dataclass(frozen=True)
class FleetConfig:
    """Instances behind a router; with `prefill_instances`, DistServe's split as `kvos serve` runs it.

    Disaggregated, the first `prefill_instances` instances take the new
    requests; each request, once its first token is out, moves by live
    migration to the decode instance with the most freeness, or decodes
    where it is if none takes it (`kvos.sim.migration`). Load balancing
    (`migration`) then moves requests among the decode instances only.
    """

    instance: InstanceConfig = field(default_factory=InstanceConfig)
    num_instances: int = 1
    router: str = "round-robin"
    prefix_overload_steps: float = ClusterConfig.prefix_overload_steps
    """The prefix-aware router's overload threshold, as `kvos serve --prefix-overload-steps`."""
    migration: MigrationConfig | None = None
    """Live migration on imbalance (`--migrate-on-imbalance`), or none."""
    prefill_instances: int = 0
    """Instances that only compute prompts (`--prefill-instances`); the others decode. 0: all colocated."""
    link: LinkModel | None = None
    """What moving KV between two instances costs: needed by migration and by disaggregation."""

    def __post_init__(self) -> None:
        if self.num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {self.num_instances}")
        if self.prefill_instances and not 1 <= self.prefill_instances < self.num_instances:
            raise ValueError(
                f"a disaggregated fleet needs 1 to num_instances - 1 = {self.num_instances - 1} prefill "
                f"instances, got {self.prefill_instances}"
            )
        if (self.migration is not None or self.prefill_instances) and self.instance.virtual is not None:
            raise ValueError(
                "live migration and disaggregation move paged blocks; the virtual KV cache has no block export"
            )
        if (self.migration is not None or self.prefill_instances) and self.link is None:
            raise ValueError("live migration and disaggregation move KV between instances: give the fleet a link")
        make_router(self.router, 1, self.prefix_overload_steps)  # names the router if it is unknown


def _take_blocks(kv: PagedKVCacheManager, run: DecodeRun, num_steps: int) -> None:
    """The blocks the run's steps take, in the order they would take them: by step, then by place in the batch.
    Between block boundaries a decode's allocation takes nothing, so only the boundaries are called."""
    bs = kv.block_size
    needs: list[tuple[int, int]] = []
    for position, (request, computed) in enumerate(zip(run.requests, run.context0)):
        first = len(kv.block_table(request)) * bs - computed + 1
        needs.extend((j, position) for j in range(first, num_steps + 1, bs))
    needs.sort()
    for j, position in needs:
        request = run.requests[position]
        request.num_computed_tokens = run.context0[position] + j - 1
        if kv.allocate_slots(request, 1) is None:
            raise RuntimeError("a decode run ran out of KV blocks its plan counted on")
        kv.end_step()


def _grow_rows(kv: VirtualKVCacheManager, run: DecodeRun, num_steps: int) -> None:
    """Every allocation of the run's steps, in step and batch order: rows grow and look ahead as they would
    have. (Each call is cheap, and which row's look-ahead gets the last free pages depends on the order.)"""
    for j in range(num_steps):
        for request, computed in zip(run.requests, run.context0):
            request.num_computed_tokens = computed + j
            if kv.allocate_slots(request, 1) is None:
                raise RuntimeError("a decode run ran out of KV pages its plan counted on")
        kv.end_step()


def _steps_pages_cover(kv: VirtualKVCacheManager, running: list[Request], context0: list[int], num_steps: int) -> int:
    """How many of the next `num_steps` decode steps the virtual cache's budget surely covers.

    In a run nobody is admitted, freed or swapped, so a row's pages only
    grow, to at most its look-ahead target at the run's last step (the
    look-ahead maps from free budget only; a step's own growth reclaims
    idle rows' pages when the budget is short). While every row's pages at
    that point fit the budget, no allocation in the run can fail.
    """
    table, layout = kv.table, kv.layout
    rows = [(table.mapped[kv.row_of(r)], r.max_total_tokens) for r in running]
    most = kv.max_tokens_per_request
    ahead = kv.lookahead_tokens

    def pages_after(k: int) -> int:
        return sum(
            max(mapped, layout.pages_for(min(computed + k + ahead, limit, most)))
            for (mapped, limit), computed in zip(rows, context0)
        )

    budget = table.budget_pages // table.num_planes
    if pages_after(num_steps) <= budget:
        return num_steps
    low, high = 0, num_steps  # pages_after(low) fits (or low == 0), pages_after(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if pages_after(middle) <= budget else (low, middle)
    return low


def make_books(config: InstanceConfig) -> PagedKVCacheManager | VirtualKVCacheManager:
    """The engine's own KV books for one instance, sized as `config` says, with no memory behind them."""
    host, disk, bs = config.host, config.disk, config.block_size
    if config.virtual is not None:
        shape = config.virtual.shape()
        return VirtualKVCacheManager(
            budget_bytes=config.kv_capacity_tokens * shape.bytes_per_token,
            shape=shape,
            max_num_seqs=config.scheduler.max_num_seqs,
            max_model_len=config.max_model_len,
            lookahead_tokens=config.virtual.lookahead_tokens,
            host_bytes=host.capacity_tokens * shape.bytes_per_token if host is not None else None,
            host_block_size=bs,
            books_page_size=config.virtual.page_size,
        )
    return PagedKVCacheManager(
        num_blocks=config.kv_capacity_tokens // bs,
        block_size=bs,
        max_model_len=config.max_model_len,
        enable_prefix_caching=config.enable_prefix_caching,
        model_identity="kvos-sim",
        host=HostBlockPool(host.capacity_tokens // bs) if host is not None else None,
        disk=DiskBlockIndex(disk.capacity_tokens // bs) if disk is not None else None,
    )


class SimInstance(MigrationEndpoint):
    """One engine: the real scheduler and KV books, the simulated worker.

    With `reports`, it reports after every step as a cluster instance does:
    its load (`instance_load`) and the prefix blocks it stores and evicts
    (its KV events), which the cluster's routers choose from. It answers a
    live migration's calls as `EngineCore` does (`MigrationEndpoint`,
    between steps: `kvos.sim.migration`).
    """

    def __init__(
        self, config: InstanceConfig, step_model: StepTimeModel, decode_runs: bool = True, reports: bool = False
    ) -> None:
        host, disk = config.host, config.disk
        self.kv = make_books(config)
        preemption = PreemptionRule(host.preemption_mode) if host is not None else None
        self.kv_manager = self.kv
        self.scheduler = Scheduler(config.scheduler, self.kv, frozenset(), config.max_model_len, preemption)
        self.worker = SimWorker(
            step_model,
            host.copy if host is not None else None,
            self.kv.host_block_size if isinstance(self.kv, VirtualKVCacheManager) else config.block_size,
            disk.copy if disk is not None else None,
            config.first_use_s,
        )
        self._incoming: dict[str, Request] = {}
        self.calls: list[int] = []
        """Migration calls that came while it stepped: they run at the step's end (`kvos.sim.migration`)."""
        self.step_model = step_model
        # With a tier below the pool its evictions write blocks down, ops that go in the next plan: a run
        # would move them to the step after it, so every step is planned.
        # Inside a run a router's view of the virtual cache would need its pages step by step: with reports,
        # its steps are planned one by one.
        self.decode_runs = (
            decode_runs
            and config.scheduler.policy in FAST_POLICIES
            and host is None
            and disk is None
            and not (config.virtual is not None and reports)
        )
        self.reports = reports
        self.load = instance_load(self.scheduler, self.kv)
        """As of its last step (the cluster core's copy of its last report)."""
        self.routed_tokens = 0
        self.routed_requests = 0
        """Routed to it since that report."""
        self.cached: set[BlockHash] = set()
        """Digests its prefix cache holds, from its KV events (with `reports`)."""
        self.inbox: list[Request] = []
        """Arrivals since the last step began."""
        self.in_flight: tuple[StepPlan, StepOutput] | None = None
        self.run: DecodeRun | None = None
        """A decode run in flight instead of a step."""
        self.version = 0
        """Bumped when the instance's pending event moves (a run cut short): older heap entries are stale."""
        self.num_runs = 0
        self.waking = False
        """An arrival found it idle: its next step starts once every arrival of that instant is in."""
        self.num_steps = 0
        self.peak_used_blocks = 0
        self.peak_host_held_blocks = 0
        """Host-tier blocks pinned at once, at most: swapped-out KV, and host hits while the step loads them
        (blocks the tier only caches are not counted)."""
        self._num_empty_steps = 0

    def start_step(self, now: float) -> float | None:
        """Take the inbox, plan and run a step from `now`: when it ends, or None with nothing to do."""
        for request in self.inbox:
            self.scheduler.add(request)
        self.inbox.clear()
        if len(self.scheduler.requests) == self.num_detached:  # nothing, or only requests moving out
            return None
        # A request migrated in since the last plan: that plan gives the worker its table, so it is planned.
        if self.decode_runs and not self.scheduler.has_attached:
            run = self._plan_decode_run(now)
            if run is not None:
                self.run = run
                self.num_runs += 1
                return run.ends[-1]
        plan = self.scheduler.schedule()
        if plan.is_empty and not plan.moves_kv and (self.num_detached or self._incoming):
            # Requests wait for blocks that a migration holds (a request moving out, a reservation for one
            # moving in). The engine would spin on empty steps until the migration's next call frees or
            # uses them; here the instance idles, and that call wakes it (`Migrations.deliver`). A plan
            # that moves KV (a waiting request's prefetch from disk, say) runs, as the engine's would.
            return None
        if plan.is_empty:
            self._num_empty_steps += 1
            if self._num_empty_steps > MAX_EMPTY_STEPS:
                raise RuntimeError(f"the scheduler planned nothing for {MAX_EMPTY_STEPS} steps with requests waiting")
        else:
            self._num_empty_steps = 0
        self.peak_used_blocks = max(self.peak_used_blocks, self.kv.num_used_blocks)
        if self.kv.host is not None:
            self.peak_host_held_blocks = max(self.peak_host_held_blocks, self.kv.host.num_held_blocks)
        self.worker.clock_s = now
        self.in_flight = (plan, self.worker.execute(plan))
        self.num_steps += 1
        return self.worker.clock_s

    @property
    def kv_capacity_blocks(self) -> int:
        """What `num_used_blocks` counts up to: the pool's blocks, or the virtual cache's budget of pages."""
        kv = self.kv
        return kv.table.budget_pages if isinstance(kv, VirtualKVCacheManager) else kv.allocator.num_blocks

    # -- live migration: MigrationEndpoint's calls, plus what an idle simulated engine needs --

    @property
    def mover(self) -> SimWorker:
        return self.worker

    def _flush_if_idle(self) -> None:
        if not self.scheduler.has_unfinished():
            self.scheduler.schedule()

    @property
    def num_detached(self) -> int:
        """Requests suspended for a migration out, kept here, never scheduled: every other unfinished
        request is waiting, running or loading its KV."""
        s = self.scheduler
        return len(s.requests) - len(s.running) - len(s.waiting) - len(s.loading)

    # -- decode runs ----------------------------------------------------------------

    def _plan_decode_run(self, now: float) -> DecodeRun | None:
        """The longest stretch of steps from `now` in which nothing the scheduler decides can change, or None.

        Holds while: nobody waits (so nobody is admitted or displaces anyone),
        every running request computes exactly one token (its last sampled
        one) and none ends before the run's last step has passed (the sampled
        token is never a stop token: simulated requests ignore EOS), all fit
        the step's token budget, no request shares a written block (no n > 1
        fork), and the free blocks cover every block boundary in the run (no
        preemption). The run stops one step before the first finish, which
        then runs as an ordinary step.
        """
        scheduler = self.scheduler
        running = scheduler.running
        if len(scheduler.waiting) or not running or len(running) > scheduler.config.max_num_batched_tokens:
            return None
        max_len = scheduler.max_model_len
        eos = scheduler.eos_token_ids
        num_steps = 1 << 30
        context0 = []
        for request in running:
            computed = request.num_computed_tokens
            num_tokens = request.num_tokens
            params = request.params
            if num_tokens - computed != 1 or request.fork_of is not None or params.n != 1:
                return None
            if SIM_TOKEN_ID in params.stop_token_ids or (not params.ignore_eos and SIM_TOKEN_ID in eos):
                return None
            # Step j appends the j-th token; the request ends at the step where either limit is reached.
            ends_at = min(params.max_tokens - len(request.output_token_ids), max_len - num_tokens)
            num_steps = min(num_steps, ends_at - 1)
            context0.append(computed)
        if num_steps < MIN_DECODE_RUN:
            return None
        num_steps = min(num_steps, self._steps_memory_covers(running, context0, num_steps))
        if num_steps < MIN_DECODE_RUN:
            return None
        seconds = self.step_model.decode_steps_seconds(len(running), sum(context0), num_steps)
        if self.worker.first_use_s:
            # Only the first step can meet a new row count (the batch stays the same); a cut run keeps it.
            seconds[0] += self.worker.first_use(len(running))
        # The clock advanced one step at a time, as the worker's is: the same sums in the same order.
        ends = list(itertools.accumulate(seconds, initial=now))[1:]
        boundaries = sorted(self._boundaries(running, context0, num_steps)) if self.reports else []
        return DecodeRun(now, list(running), ends, seconds, context0, boundaries)

    def _boundaries(self, running: list[Request], context0: list[int], num_steps: int) -> list[int]:
        """The steps among the next `num_steps` decode steps that take a new block, one entry per block."""
        kv = self.kv
        bs = kv.block_size
        boundaries: list[int] = []
        for request, computed in zip(running, context0):
            # Step j writes position computed + j - 1; it needs a block when that position is past the table.
            first = len(kv.block_table(request)) * bs - computed + 1
            boundaries.extend(range(first, num_steps + 1, bs))
        return boundaries

    def _steps_memory_covers(self, running: list[Request], context0: list[int], num_steps: int) -> int:
        """How many of the next `num_steps` decode steps the free blocks cover (new blocks at block boundaries)."""
        if isinstance(self.kv, VirtualKVCacheManager):
            return _steps_pages_cover(self.kv, running, context0, num_steps)
        free = self.kv.num_free_blocks
        boundaries = self._boundaries(running, context0, num_steps)
        if len(boundaries) <= free:
            return num_steps
        boundaries.sort()
        return boundaries[free] - 1

    def take_work(self, now: float) -> float | None:
        """Work came at `now` (an arrival, a migration call): when the instance's next event must now be,
        or None if it stays where it is.

        In a decode run, the engine would take the work in at the first step
        boundary from now: the run stops there. Idle, it starts at this
        instant, but after every arrival of the same instant (the engine
        drains all queued requests before it steps). In a step, the step's
        end stands.
        """
        if self.run is not None:
            return self.cut_run(now)
        if not self.busy:
            self.waking = True
            return now
        return None

    def cut_run(self, arrival_s: float) -> float | None:
        """An arrival during the run: keep the steps up to the first boundary at or after it; the new end if moved."""
        run = self.run
        assert run is not None
        keep = bisect.bisect_left(run.ends, arrival_s) + 1
        if keep >= len(run.ends):
            return None
        del run.ends[keep:]
        del run.seconds[keep:]
        self.version += 1
        return run.ends[-1]

    def finish_run(self) -> DecodeRun:
        """Apply the run: the state `len(run.ends)` decode steps leave the scheduler and the KV books in."""
        run = self.run
        assert run is not None
        self.run = None
        num_steps = len(run.ends)
        kv, scheduler = self.kv, self.scheduler
        if isinstance(kv, VirtualKVCacheManager):
            _grow_rows(kv, run, num_steps)
        else:
            _take_blocks(kv, run, num_steps)
        tokens = [SIM_TOKEN_ID] * num_steps
        for request, computed in zip(run.requests, run.context0):
            request.num_computed_tokens = computed + num_steps
            request.output_token_ids.extend(tokens)
            kv.publish(request, computed + num_steps)
        scheduler.skip_decode_steps(num_steps)
        events = kv.drain_events()
        if self.reports:
            self._report(events)  # the run's last step's report (`view` stands in for the ones inside it)
        self.peak_used_blocks = max(self.peak_used_blocks, kv.num_used_blocks)
        self.num_steps += num_steps
        self._num_empty_steps = 0
        # One addition per step, in step order, as the worker adds them (reduce only keeps the loop in C).
        self.worker.busy_s = functools.reduce(operator.add, run.seconds, self.worker.busy_s)
        self.worker.clock_s = run.ends[-1]
        return run

    def finish_step(self) -> list[SequenceUpdate]:
        """Apply the step in flight, as `EngineCore.step` does after the worker returns."""
        if self.in_flight is None:  # a wake-up, not a step: nothing ran
            self.waking = False
            return []
        plan, output = self.in_flight
        self.in_flight = None
        updates = self.scheduler.update_from_output(plan, output)
        if not self.scheduler.has_unfinished():
            self.scheduler.schedule()  # EngineCore._flush_if_idle: hands ended ids to a worker that keeps none
        events = self.kv.drain_events()  # read or not, drained: unread they would pile up
        if self.reports:
            self._report(events)
        return updates

    def _report(self, events: list[KVEvent]) -> None:
        """What `EngineInstance.step` reports and `ClusterCore` applies: the load, then the KV events."""
        self.load = instance_load(self.scheduler, self.kv)
        self.routed_tokens = self.routed_requests = 0
        for event in events:
            if isinstance(event, BlockStored):
                self.cached.add(event.block_hash)
            else:
                self.cached.discard(event.block_hash)

    def view(self, index: int, digests: list[BlockHash], now: float) -> InstanceView:
        """What the cluster core shows a router of this instance at `now`, for a prompt of these block digests.

        Inside a decode run the books stay as they were when it began until it
        ends, so the reports of the steps that ended before `now` come from
        the run's plan: in a run the batch and the queue stay the same; only
        the free blocks change (one taken at each block boundary), and with
        them the cached blocks those takes evict. (The blocks the run fills
        are published at its end; no prompt can name them before, since a
        request's next turn is only sent once it has finished.)
        """
        load = self.load
        hits = leading_blocks(digests, self.cached)
        run = self.run
        done = bisect.bisect_left(run.ends, now) if run is not None and self.reports else 0
        if done:  # (without reports no router reads the load: the last report stands)
            assert run is not None
            # The report of the run's step `done`. The books are those the run began with (migration calls
            # between the last report and the run included), less the blocks its steps have taken since.
            kv = self.kv
            assert isinstance(kv, PagedKVCacheManager)  # with reports, runs are the paged pool's (`decode_runs`)
            taken = bisect.bisect_right(run.boundaries, done)
            load = InstanceLoad((kv.num_free_blocks - taken) * kv.block_size, 0, len(run.requests), 0)
            if hits and taken:
                gone = {b.block_hash for b in kv.allocator.peek_evicted(taken)}
                hits = next((i for i, digest in enumerate(digests[:hits]) if digest in gone), hits)
        return InstanceView(index, load.plus_routed(self.routed_tokens, self.routed_requests), hits)

    def reported_outputs(self, request: Request, now: float) -> int:
        """The request's output tokens as this instance's reports until `now` have told the router.

        Inside a decode run, the books hold what they held when it began;
        each of its steps that ended before `now` reported one more token.
        """
        run = self.run
        outputs = len(request.output_token_ids)
        if run is not None and any(r is request for r in run.requests):
            outputs += bisect.bisect_left(run.ends, now)
        return outputs

    @property
    def busy(self) -> bool:
        return self.in_flight is not None or self.waking or self.run is not None


@dataclass
class RequestTimes:
    """Per request (by index): when it arrived, got its first and last token, and how many tokens it got.

    The first token is the first the client sees: after the request's hidden
    tokens (`SimRequest.hidden_tokens`), as a streaming client measures TTFT.
    Flat arrays rather than an object per request, so a million requests fit in memory.
    """

    arrival_s: array = field(default_factory=lambda: array("d"))
    first_token_s: array = field(default_factory=lambda: array("d"))
    last_token_s: array = field(default_factory=lambda: array("d"))
    num_output_tokens: array = field(default_factory=lambda: array("l"))
    prompt_tokens: array = field(default_factory=lambda: array("l"))
    expected_tokens: array = field(default_factory=lambda: array("l"))
    hidden_tokens: array = field(default_factory=lambda: array("l"))
    rejected: list[int] = field(default_factory=list)
    abandoned: list[int] = field(default_factory=list)
    """Session turns never sent, because an earlier turn of theirs was refused (their arrival: that refusal)."""
    itl_s: array = field(default_factory=lambda: array("d"))
    """Every gap between consecutive tokens of any request, from its first token on (as the client sees them)."""


@dataclass
class SimResult:
    times: RequestTimes
    instances: list[SimInstance]
    wall_s: float
    num_events: int
    migrations: list[MigrationResult] = field(default_factory=list)
    """Every live migration tried, in the order they ended."""

    @property
    def end_s(self) -> float:
        return max((t for t in self.times.last_token_s if not math.isnan(t)), default=0.0)


class _Turns:
    """The sessions' turns as requests: their numbering, prompts, and when each next one is sent.

    Turn t of session j is request `first[j] + t`; its prompt is built when
    it is sent, from the turn before it as the engine left it (prompt plus
    the tokens it produced), so the history matches token for token and the
    prefix cache finds what it still holds. After the prefix every session
    shares (`SimSession.prefix_tokens`), the session's first request id is
    its next token, which keeps sessions from sharing more.
    """

    def __init__(self, sessions: Sequence[SimSession], base: int) -> None:
        self.sessions = sessions
        self.base = base
        self.specs: list[SimRequest] = []
        self.first: list[int] = []
        self.session_of: list[int] = []
        for j, session in enumerate(sessions):
            self.first.append(base + len(self.specs))
            for turn in session.turns:
                self.specs.append(
                    SimRequest(0.0, turn.prompt_tokens, turn.output_tokens, session.tenant, session.priority)
                )
                self.session_of.append(j)
        self._live: dict[int, Request] = {}
        """Per session: the Request of its latest turn sent, until the next one is built from it."""

    def first_sends(self) -> list[tuple[float, int]]:
        sends = [(session.start_s, first) for session, first in zip(self.sessions, self.first)]
        heapq.heapify(sends)
        return sends

    def prompt(self, k: int) -> list[int]:
        j = self.session_of[k - self.base]
        spec = self.specs[k - self.base]
        before = self._live.pop(j, None)
        if before is None:
            shared = self.sessions[j].prefix_tokens
            return [SHARED_TOKEN_ID] * shared + [k] + [0] * (spec.prompt_tokens - shared - 1)
        history = [*before.prompt_token_ids, *before.output_token_ids]
        assert len(history) < spec.prompt_tokens  # SimSession checks each turn outgrows its history
        return history + [0] * (spec.prompt_tokens - len(history))

    def sent(self, k: int, request: Request) -> None:
        self._live[self.session_of[k - self.base]] = request

    def finished(self, k: int, read_s: float, sends: list[tuple[float, int]]) -> None:
        """Turn k's reply was read at `read_s`: the session's next turn goes out a think time later."""
        j = self.session_of[k - self.base]
        nxt = k + 1
        if nxt - self.first[j] < len(self.sessions[j].turns):
            heapq.heappush(sends, (read_s + self.sessions[j].turns[nxt - self.first[j]].think_s, nxt))
        else:
            self._live.pop(j, None)

    def abandon(self, k: int, now: float, times: RequestTimes) -> None:
        """Turn k was refused: the session's later turns are never sent."""
        j = self.session_of[k - self.base]
        self._live.pop(j, None)
        for later in range(k + 1, self.first[j] + len(self.sessions[j].turns)):
            times.arrival_s[later] = now
            times.abandoned.append(later)


class Simulator:
    """Runs requests through a fleet of simulated instances."""

    def __init__(self, config: FleetConfig, step_model: StepTimeModel, decode_runs: bool = True) -> None:
        """`decode_runs=False` steps every instance one step at a time (the reference the fast path is tested on)."""
        self.config = config
        self.step_model = step_model
        self.decode_runs = decode_runs
        self._params: dict[int, SamplingParams] = {}

    def _sampling_params(self, max_tokens: int) -> SamplingParams:
        params = self._params.get(max_tokens)
        if params is None:
            params = self._params[max_tokens] = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        return params

    def run(self, requests: Sequence[SimRequest], sessions: Sequence[SimSession] = ()) -> SimResult:
        """Serve `requests` (sorted by arrival) and `sessions` to completion.

        Request k of the result is `requests[k]`; the sessions' turns follow,
        session by session, turn by turn. A turn is sent `think_s` after the
        client has read the previous turn's last token; its prompt is the
        previous prompt, the reply as the engine produced it, and new tokens
        up to the turn's `prompt_tokens`, so the engine finds the history in
        whatever tier still holds it. A turn the engine refuses ends its
        session: the later turns are never sent (`RequestTimes.abandoned`).

        Python's cyclic garbage collector is paused meanwhile: a fleet's books
        are millions of long-lived objects (a `Block` per KV block of every
        instance) that each full collection would walk again, and the
        simulation makes no reference cycles for it to find (requests, plans
        and outputs are freed by reference counting;
        `tests/sim/test_simulator.py` checks that a run leaves no cycles).
        """
        if any(b.arrival_s < a.arrival_s for a, b in zip(requests, requests[1:])):
            raise ValueError("requests must be sorted by arrival_s")
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._run(requests, sessions)
        finally:
            if collecting:
                gc.enable()

    def _run(self, requests: Sequence[SimRequest], sessions: Sequence[SimSession]) -> SimResult:
        config = self.config
        prefill = config.prefill_instances
        # New requests go to every instance, or (disaggregated) to the prefill instances, which come first.
        routable = range(prefill or config.num_instances)
        decode = range(prefill, config.num_instances) if prefill else range(0)
        router = make_router(config.router, len(routable), config.prefix_overload_steps)
        reports = router.reads_state or config.migration is not None or bool(prefill)
        instances = [
            SimInstance(config.instance, self.step_model, self.decode_runs, reports)
            for _ in range(config.num_instances)
        ]
        kv0 = instances[0].kv

        def views(arriving: Request, with_prefix: bool) -> list[InstanceView]:
            # The cluster core's digests of the prompt's full blocks: one chain, every instance's root.
            # The virtual cache shares no prefix, so it reports none (as a cluster instance of it does).
            digests = (
                kv0.block_hashes_of(arriving.all_token_ids, arriving.cache_salt)
                if with_prefix and isinstance(kv0, PagedKVCacheManager)
                else []
            )
            return [instances[j].view(j, digests, arriving.arrival_time) for j in routable]

        times = RequestTimes()
        nan = math.nan
        n = len(requests)
        turns = _Turns(sessions, n)
        total = n + len(turns.specs)
        times.arrival_s.extend(r.arrival_s for r in requests)
        times.arrival_s.extend([nan] * len(turns.specs))
        times.prompt_tokens.extend(r.prompt_tokens for r in itertools.chain(requests, turns.specs))
        times.expected_tokens.extend(r.output_tokens for r in itertools.chain(requests, turns.specs))
        times.hidden_tokens.extend(r.hidden_tokens for r in requests)
        times.hidden_tokens.extend([0] * len(turns.specs))
        times.first_token_s.extend([nan] * total)
        times.last_token_s.extend([nan] * total)
        times.num_output_tokens.extend([0] * total)
        max_len = config.instance.max_model_len
        ends: list[tuple[float, int, int]] = []
        """(when, instance, its version then): each instance's next step end, wake-up or run end."""
        sends = turns.first_sends()
        """(send time, request index) of the sessions' turns due, a heap: first turns, then each next one
        when the turn before it ends."""
        to_engine = config.instance.front_end.to_engine_s
        to_client = config.instance.front_end.to_client_s

        def follow(state: Request, source: int, destination: int) -> None:
            """A migration committed: the router and the request's session follow it to its new instance."""
            router.on_move(state, source, destination)
            k = int(state.req_id)
            if k >= n:
                turns.sent(k, state)

        migrations = None
        if config.link is not None and (config.migration is not None or prefill):
            balanced = decode or range(config.num_instances)
            migrations = Migrations(
                config.migration, config.link, instances, balanced, config.instance.block_size, follow
            )
        if config.migration is not None:
            ends.append((0.0, REBALANCE, 0))  # the cluster core checks at its first step, then every interval
        handed: set[int] = set()
        """Disaggregated: the requests whose hand-off to the decode tier was tried (once each)."""
        start_wall = time.perf_counter()
        num_events = 0
        i = 0
        while i < n or sends or ends:
            num_events += 1
            # The front end's delay is the same for every request, so they reach the engines in send order.
            k = -1
            if i < n and (not sends or requests[i].arrival_s <= sends[0][0]):
                if not ends or requests[i].arrival_s + to_engine <= ends[0][0]:
                    k = i
                    spec = requests[i]
                    sent = spec.arrival_s
                    i += 1
            elif sends and (not ends or sends[0][0] + to_engine <= ends[0][0]):
                sent, k = heapq.heappop(sends)
                spec = turns.specs[k - n]
                times.arrival_s[k] = sent
            if k >= 0:
                now = sent + to_engine
                total_tokens = spec.prompt_tokens + spec.output_tokens
                if total_tokens > max_len or total_tokens > kv0.max_tokens_per_request:
                    # Refused at the door (InvalidRequestError), before any routing: a failed request.
                    times.rejected.append(k)
                    if k >= n:
                        turns.abandon(k, now, times)
                    continue
                if k < n:
                    # A distinct first token gives every prompt its own prefix: no hits between unrelated requests.
                    prompt = [k] + [0] * (spec.prompt_tokens - 1)
                else:
                    prompt = turns.prompt(k)
                request = Request(
                    str(k),
                    prompt,
                    self._sampling_params(spec.output_tokens),
                    arrival_time=now,
                    priority=spec.priority,
                    tenant=spec.tenant,
                )
                index = router.route(request, views)
                instance = instances[index]
                instance.routed_tokens += request.num_tokens
                instance.routed_requests += 1
                instance.inbox.append(request)
                if k >= n:
                    turns.sent(k, request)
                when = instance.take_work(now)
                if when is not None:
                    heapq.heappush(ends, (when, index, instance.version))
                continue
            now, index, version = heapq.heappop(ends)
            if index < 0:
                assert migrations is not None
                if index == REBALANCE:
                    assert config.migration is not None
                    entries = migrations.check(now)
                    if i < n or sends or migrations.active or any(j.busy or j.scheduler.requests for j in instances):
                        entries.append((now + config.migration.interval_s, REBALANCE, 0))
                else:
                    entries = migrations.deliver(version, now)
                for entry in entries:
                    heapq.heappush(ends, entry)
                continue
            instance = instances[index]
            if version != instance.version:
                num_events -= 1  # superseded by a cut run's earlier end
                continue
            if instance.run is not None:
                self._record_run(instance.finish_run(), times)
            for update in instance.finish_step():
                k = int(update.req_id)
                if update.new_token_ids:
                    before = times.num_output_tokens[k]
                    if before > times.hidden_tokens[k]:
                        times.itl_s.append(now - times.last_token_s[k])
                    elif before + len(update.new_token_ids) > times.hidden_tokens[k]:
                        times.first_token_s[k] = now
                    times.last_token_s[k] = now
                    times.num_output_tokens[k] = before + len(update.new_token_ids)
                if update.finish_reason is not None:
                    router.on_finish(index)
                    if k >= n:
                        turns.finished(k, now + to_client, sends)
                elif index < prefill and k not in handed and update.new_token_ids:
                    # Its prompt is computed: hand it to the decode tier (`ClusterCore._hand_off`).
                    assert migrations is not None
                    handed.add(k)
                    request = instance.scheduler.requests[update.req_id]
                    for entry in migrations.hand_off(request, index, decode, now):
                        heapq.heappush(ends, entry)
            if instance.calls:
                assert migrations is not None
                for entry in migrations.run_calls(index, now):
                    heapq.heappush(ends, entry)
            end = instance.start_step(now)
            if end is not None:
                heapq.heappush(ends, (end, index, instance.version))
        if to_client:
            # Every token reaches the client that much later: TTFT and latency grow, the gaps stay.
            times.first_token_s = array("d", (t + to_client for t in times.first_token_s))
            times.last_token_s = array("d", (t + to_client for t in times.last_token_s))
        results = migrations.results if migrations is not None else []
        return SimResult(times, instances, time.perf_counter() - start_wall, num_events, results)

    @staticmethod
    def _record_run(run: DecodeRun, times: RequestTimes) -> None:
        """Every request of the run got one token at each step's end."""
        ends = run.ends
        num_steps = len(ends)
        gaps = list(map(operator.sub, ends[1:], ends))
        for request in run.requests:
            k = int(request.req_id)
            before = times.num_output_tokens[k]
            shown = times.hidden_tokens[k] - before  # the run's step whose token the client sees first
            if shown < 0:
                times.itl_s.append(ends[0] - times.last_token_s[k])
                times.itl_s.extend(gaps)
            elif shown < num_steps:
                times.first_token_s[k] = ends[shown]
                times.itl_s.extend(gaps[shown:])
            times.last_token_s[k] = ends[-1]
            times.num_output_tokens[k] = before + num_steps
