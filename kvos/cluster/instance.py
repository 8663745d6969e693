"""One engine instance: an `EngineCore` inside a Ray actor, stepped by the router.

    router (driver process)                      instance (Ray actor process)
    -----------------------                      ----------------------------
    add.remote(Request)         -------------->  EngineCore.add_request
    abort.remote(req_id)        -------------->  EngineCore.abort_request
    step.remote()               -------------->  EngineCore.step()
                                <--------------  StepReport(updates, stats, load, KV events)

Only the core's plain data crosses (as with `core/core_process.py`): the
front end (detokenizer, stop strings, n > 1 grouping) stays with the router,
which is what lets a request resume elsewhere from the tokens its client has
already been sent. Ray runs an actor's calls one at a time in the order one
caller submitted them, so an add, an abort and a step never race inside the
instance and need no lock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kvos.config import EngineConfig
from kvos.core.engine_core import EngineCore, check_logit_bias
from kvos.core.migration import KVChunk
from kvos.core.plan import SequenceUpdate
from kvos.core.request import Request
from kvos.core.scheduler import Scheduler
from kvos.engine.stats import EngineStats
from kvos.memory.block_allocator import KVEvent
from kvos.memory.block_hash import BlockHash
from kvos.memory.kv_manager import KVCacheManager
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.model.loader import load_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceLoad:
    """What the least-load router reads (Llumnix's inputs): KV left, the queue head's demand, the batch."""

    free_tokens: int
    """Free KV, in tokens."""
    head_demand_tokens: int
    """KV the head of the waiting queue needs to be admitted (its prompt and outputs so far)."""
    num_running: int
    num_waiting: int

    @property
    def freeness(self) -> float:
        """Decode steps the running batch can take before KV runs out, once the queue head is admitted.

        Llumnix's freeness: free memory after the waiting head's demand,
        divided by what one decode step of the batch consumes (one token per
        running request). Negative when the head does not fit.
        """
        return (self.free_tokens - self.head_demand_tokens) / max(1, self.num_running)

    def plus_routed(self, tokens: int, requests: int) -> InstanceLoad:
        """This load with `requests` more routed here since it was reported (`tokens` of KV among them):
        they hold no memory yet, but will, and they will run."""
        return InstanceLoad(
            self.free_tokens - tokens, self.head_demand_tokens, self.num_running + requests, self.num_waiting
        )


def instance_load(scheduler: Scheduler, kv: KVCacheManager) -> InstanceLoad:
    """An engine's load as it reports it after a step, from its scheduler and its KV books.

    A simulated instance (`kvos.sim`) reports with this function too, so the
    simulated routers read what the cluster's read."""
    head = scheduler.waiting.peek()
    return InstanceLoad(
        kv.num_free_blocks * kv.block_size,
        0 if head is None else head.num_tokens,
        scheduler.num_seqs,  # those loading their KV to run count as running
        len(scheduler.waiting),
    )


@dataclass(frozen=True)
class InstanceInfo:
    """Fixed facts about an instance, asked once it is up (and again after a restart)."""

    max_model_len: int
    vocab_size: int
    max_tokens_per_request: int
    capacity_tokens: int
    block_size: int
    kv_root: BlockHash | None
    """The root of the KV identity chain (paged cache with prefix caching), for prefix-aware routing."""
    load: InstanceLoad
    stats: EngineStats


@dataclass(frozen=True)
class StepReport:
    """What one `step` call answers: the core's updates and the instance's state after it."""

    updates: list[SequenceUpdate]
    running: list[str]
    """Every request the instance holds, so the router can abort any it no longer owns there."""
    load: InstanceLoad
    stats: EngineStats
    kv_events: list[KVEvent]


def instance_config(config: EngineConfig, instance_id: int) -> EngineConfig:
    """`config` for the cluster's instance `instance_id`: its own disk tier directory, `instance-<id>` inside the
    one asked for. A disk tier's directory belongs to one engine (its lock refuses a second), and a whole
    server restarted numbers its instances from 0 again, so each finds its own files warm."""
    path = config.cache.kv_disk_path
    if path is None:
        return config
    return replace(config, cache=replace(config.cache, kv_disk_path=str(Path(path) / f"instance-{instance_id}")))


class EngineInstance:
    """The body of the Ray actor (`ray.remote(EngineInstance)`); plain Python, testable without Ray."""

    def __init__(self, config: EngineConfig, eos_token_ids: frozenset[int], num_threads: int) -> None:
        torch.set_num_threads(num_threads)
        self.core = EngineCore(config, load_model(config.model), eos_token_ids)
        kv = self.core.kv_manager
        prefix_events = isinstance(kv, PagedKVCacheManager) and config.cache.enable_prefix_caching
        self._kv_root = kv.root_digest if prefix_events and isinstance(kv, PagedKVCacheManager) else None
        self._rejected: list[SequenceUpdate] = []

    def info(self) -> InstanceInfo:
        core = self.core
        kv = core.kv_manager
        return InstanceInfo(
            core.max_model_len,
            core.vocab_size,
            kv.max_tokens_per_request,
            kv.capacity_tokens,
            kv.block_size,
            self._kv_root,
            self._load(),
            core.stats(),
        )

    def add(self, request: Request) -> None:
        """Queue a request; a refusal (checked by the router already) comes back as a failed update."""
        try:
            check_logit_bias(request, self.core.vocab_size)
            self.core.add_request(request)
        except ValueError as exc:
            self._rejected.append(SequenceUpdate(request.req_id, [], [], 0, "abort", None, str(exc)))

    def abort(self, req_id: str) -> None:
        self.core.abort_request(req_id)

    def release_session(self, key: str) -> None:
        self.core.release_session(key)

    def close(self) -> None:
        """Stop cleanly: with a disk tier, the KV still cached above it is written there (`EngineCore.close`)."""
        self.core.close()

    def step(self) -> StepReport:
        """One engine step (nothing to do: none), and the state after it."""
        updates, self._rejected = self._rejected, []
        if self.core.has_unfinished_requests():
            updates += self.core.step()
        return StepReport(
            updates,
            list(self.core.scheduler.requests),
            self._load(),
            self.core.stats(),
            self.core.take_kv_events(),
        )

    # -- live migration (kvos/cluster/migration.py): the engine core's hooks, one call each --

    def migration_snapshot(self, req_id: str, first_block: int) -> KVChunk | None:
        return self.core.migration_snapshot(req_id, first_block)

    def migration_suspend(self, req_id: str, first_block: int) -> tuple[Request, KVChunk] | None:
        return self.core.migration_suspend(req_id, first_block)

    def migration_resume_here(self, req_id: str) -> None:
        self.core.migration_resume_here(req_id)

    def migration_release(self, req_id: str) -> None:
        self.core.migration_release(req_id)

    def migration_reserve(self, request: Request, num_tokens: int) -> bool:
        return self.core.migration_reserve(request, num_tokens)

    def migration_import(self, req_id: str, chunk: KVChunk) -> bool:
        return self.core.migration_import(req_id, chunk)

    def migration_commit(self, state: Request, chunk: KVChunk) -> bool:
        return self.core.migration_commit(state, chunk)

    def migration_cancel(self, req_id: str) -> None:
        self.core.migration_cancel(req_id)

    def _load(self) -> InstanceLoad:
        return instance_load(self.core.scheduler, self.core.kv_manager)
