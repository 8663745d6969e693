"""The event loop: arrivals and step completions of many instances on one virtual clock.

    arrivals (sorted) ----router----> instance.inbox
                                          |  (delivered between steps, as AsyncLLMEngine drains commands)
    heap of step ends  <--- instance.start_step(now):  Scheduler.schedule() -> StepPlan
                                                      SimWorker.execute(plan) -> StepOutput, + step time
    pop the earliest   ---> instance.finish_step():    Scheduler.update_from_output(plan, output)

An arrival that finds its instance idle schedules a wake-up at the same
instant, which sorts after every arrival of that instant, so simultaneous
arrivals share the first step as they do in the engine. Each instance is
kvos's own `Scheduler` over a `PagedKVCacheManager`; the
order of calls is `EngineCore.step`'s (including its flush of ended
requests when nothing is left), so the plans are the ones the engine would
make given the same arrivals and step times.
"""

from __future__ import annotations

import heapq
import math
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvos.config import SchedulerConfig
from kvos.core.plan import SequenceUpdate, StepOutput, StepPlan
from kvos.core.request import Request
from kvos.core.scheduler import Scheduler
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.sampling_params import SamplingParams
from kvos.sim.router import make_router
from kvos.sim.step_model import StepTimeModel
from kvos.sim.worker import SimWorker
from kvos.sim.workload import SimRequest

MAX_EMPTY_STEPS = 1000
"""Consecutive steps that plan nothing while requests wait: the scheduler is stuck, not slow."""


@dataclass(frozen=True)
class InstanceConfig:
    """One simulated engine: its scheduler config and its KV cache's size (what `EngineCore` would measure)."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv_capacity_tokens: int = 65536
    block_size: int = 16
    max_model_len: int = 8192
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_capacity_tokens < self.block_size:
            raise ValueError(
                f"kv_capacity_tokens must hold one block of {self.block_size}, got {self.kv_capacity_tokens}"
            )
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(frozen=True)
class FleetConfig:
    """Instances behind a router."""

    instance: InstanceConfig = field(default_factory=InstanceConfig)
    num_instances: int = 1
    router: str = "round_robin"

    def __post_init__(self) -> None:
        if self.num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {self.num_instances}")
        make_router(self.router, 1)  # names the router if it is unknown


class SimInstance:
    """One engine: the real scheduler and KV books, the simulated worker."""

    def __init__(self, config: InstanceConfig, step_model: StepTimeModel) -> None:
        self.kv = PagedKVCacheManager(
            num_blocks=config.kv_capacity_tokens // config.block_size,
            block_size=config.block_size,
            max_model_len=config.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching,
            model_identity="kvos-sim",
        )
        self.scheduler = Scheduler(config.scheduler, self.kv, frozenset(), config.max_model_len)
        self.worker = SimWorker(step_model)
        self.inbox: list[Request] = []
        self.in_flight: tuple[StepPlan, StepOutput] | None = None
        self.waking = False
        """An arrival found it idle: its next step starts once every arrival of that instant is in."""
        self.num_steps = 0
        self.peak_used_blocks = 0
        self._num_empty_steps = 0

    def start_step(self, now: float) -> float | None:
        """Take the inbox, plan and run a step from `now`: when it ends, or None with nothing to do."""
        for request in self.inbox:
            self.scheduler.add(request)
        self.inbox.clear()
        if not self.scheduler.has_unfinished():
            return None
        plan = self.scheduler.schedule()
        if plan.is_empty:
            self._num_empty_steps += 1
            if self._num_empty_steps > MAX_EMPTY_STEPS:
                raise RuntimeError(f"the scheduler planned nothing for {MAX_EMPTY_STEPS} steps with requests waiting")
        else:
            self._num_empty_steps = 0
        self.peak_used_blocks = max(self.peak_used_blocks, self.kv.num_used_blocks)
        self.worker.clock_s = now
        self.in_flight = (plan, self.worker.execute(plan))
        self.num_steps += 1
        return self.worker.clock_s

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
        self.kv.drain_events()  # nobody subscribes; unread they would pile up
        return updates

    @property
    def busy(self) -> bool:
        return self.in_flight is not None or self.waking


@dataclass
class RequestTimes:
    """Per request (by index): when it arrived, got its first and last token, and how many tokens it got.

    Flat arrays rather than an object per request, so a million requests fit in memory.
    """

    arrival_s: array = field(default_factory=lambda: array("d"))
    first_token_s: array = field(default_factory=lambda: array("d"))
    last_token_s: array = field(default_factory=lambda: array("d"))
    num_output_tokens: array = field(default_factory=lambda: array("l"))
    prompt_tokens: array = field(default_factory=lambda: array("l"))
    expected_tokens: array = field(default_factory=lambda: array("l"))
    rejected: list[int] = field(default_factory=list)
    itl_s: array = field(default_factory=lambda: array("d"))
    """Every gap between consecutive tokens of any request."""


@dataclass
class SimResult:
    times: RequestTimes
    instances: list[SimInstance]
    wall_s: float
    num_events: int

    @property
    def end_s(self) -> float:
        return max((t for t in self.times.last_token_s if not math.isnan(t)), default=0.0)


class Simulator:
    """Runs requests through a fleet of simulated instances."""

    def __init__(self, config: FleetConfig, step_model: StepTimeModel) -> None:
        self.config = config
        self.step_model = step_model
        self._params: dict[int, SamplingParams] = {}

    def _sampling_params(self, max_tokens: int) -> SamplingParams:
        params = self._params.get(max_tokens)
        if params is None:
            params = self._params[max_tokens] = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        return params

    def run(self, requests: Sequence[SimRequest]) -> SimResult:
        """Serve `requests` (sorted by arrival) to completion."""
        if any(b.arrival_s < a.arrival_s for a, b in zip(requests, requests[1:])):
            raise ValueError("requests must be sorted by arrival_s")
        config = self.config
        instances = [SimInstance(config.instance, self.step_model) for _ in range(config.num_instances)]
        router = make_router(config.router, config.num_instances)
        times = RequestTimes()
        nan = math.nan
        n = len(requests)
        times.arrival_s.extend(r.arrival_s for r in requests)
        times.prompt_tokens.extend(r.prompt_tokens for r in requests)
        times.expected_tokens.extend(r.output_tokens for r in requests)
        times.first_token_s.extend([nan] * n)
        times.last_token_s.extend([nan] * n)
        times.num_output_tokens.extend([0] * n)
        max_len = config.instance.max_model_len
        ends: list[tuple[float, int]] = []
        start_wall = time.perf_counter()
        num_events = 0
        i = 0
        while i < n or ends:
            num_events += 1
            if i < n and (not ends or requests[i].arrival_s <= ends[0][0]):
                spec = requests[i]
                now = spec.arrival_s
                index = router.route(spec)
                instance = instances[index]
                total = spec.prompt_tokens + spec.output_tokens
                if total > max_len or total > instance.kv.max_tokens_per_request:
                    # The engine refuses it at the door (InvalidRequestError): a failed request.
                    times.rejected.append(i)
                    router.on_finish(index)
                    i += 1
                    continue
                # A distinct first token gives every prompt its own prefix: no hits between unrelated requests.
                prompt = [i] + [0] * (spec.prompt_tokens - 1)
                request = Request(
                    str(i),
                    prompt,
                    self._sampling_params(spec.output_tokens),
                    arrival_time=now,
                    priority=spec.priority,
                    tenant=spec.tenant,
                )
                instance.inbox.append(request)
                i += 1
                if not instance.busy:
                    # Start at this instant, but after every arrival of the same instant: the engine
                    # drains all queued requests before it steps.
                    instance.waking = True
                    heapq.heappush(ends, (now, index))
                continue
            else:
                now, index = heapq.heappop(ends)
                instance = instances[index]
                for update in instance.finish_step():
                    k = int(update.req_id)
                    if update.new_token_ids:
                        last = times.last_token_s[k]
                        if times.num_output_tokens[k] == 0:
                            times.first_token_s[k] = now
                        else:
                            times.itl_s.append(now - last)
                        times.last_token_s[k] = now
                        times.num_output_tokens[k] += len(update.new_token_ids)
                    if update.finish_reason is not None:
                        router.on_finish(index)
            end = instance.start_step(now)
            if end is not None:
                heapq.heappush(ends, (end, index))
        return SimResult(times, instances, time.perf_counter() - start_wall, num_events)
