"""An engine's half of a live migration: the `migration_*` calls, on its scheduler and KV books.

`kvos.cluster.migration` drives the protocol between two instances; each
call lands here, between two steps of the engine that receives it. The books
(which request runs, which blocks hold its KV) are the same whoever moves
the bytes, so this is written once for the real engine (`EngineCore`, whose
worker copies tensors) and for the simulator (`kvos.sim.SimInstance`, whose
worker only counts what a link would carry).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from kvos.core.plan import StepOutput
from kvos.core.request import Request, RequestStatus
from kvos.core.scheduler import Scheduler
from kvos.memory.kv_manager import KVCacheManager, TierOps
from kvos.memory.paged_kv_manager import PagedKVCacheManager


@dataclass(frozen=True)
class KVChunk:
    """Some of a request's KV blocks, copied out by one worker to be copied in by another.

    `data` is `[layers, 2, num_blocks * block_size, kv_heads, head_dim]`
    (`Worker.read_blocks`); between Ray actors it travels through the object
    store (shared memory on one machine). The simulator's chunks carry no
    bytes (`data` None): a link model prices their `num_blocks`.
    """

    first_block: int
    num_blocks: int
    data: torch.Tensor | None
    num_computed_tokens: int
    """The request's computed tokens when the chunk was taken."""


class BlockMover(Protocol):
    """What the endpoint needs of a worker: copy blocks out, in, and move evicted ones down the tiers now."""

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor | None: ...

    def write_blocks(self, block_ids: Sequence[int], data: Any) -> None: ...

    def write_down(self, ops: TierOps) -> StepOutput: ...


class MigrationEndpoint(ABC):
    """The source's half, then the destination's, for an engine with a scheduler, KV books and a mover."""

    scheduler: Scheduler
    kv_manager: KVCacheManager
    _incoming: dict[str, Request]
    """Requests migrating in: blocks reserved under their id, not yet scheduled."""

    @property
    @abstractmethod
    def mover(self) -> BlockMover:
        """The worker that moves this engine's blocks."""

    @abstractmethod
    def _flush_if_idle(self) -> None:
        """With nothing left to run, hand the worker the ended requests now (a released request among them)."""

    # -- the source -------------------------------------------------------------------

    def migration_snapshot(self, req_id: str, first_block: int) -> KVChunk | None:
        """The running request's full computed blocks from `first_block` on, while it keeps running.

        None when it is not running here (ended, waiting, preempted): the migration gives up.
        """
        request = self.scheduler.requests.get(req_id)
        if request is None or request.status != RequestStatus.RUNNING or not self._migratable():
            return None
        return self._chunk(request, first_block, request.num_computed_tokens // self.kv_manager.block_size)

    def migration_suspend(self, req_id: str, first_block: int) -> tuple[Request, KVChunk] | None:
        """Stop the request (its KV stays here until `migration_release`) and hand over the rest of its KV.

        Returns its state (token ids, progress) and every block from
        `first_block` on, the partial last one included; None when it is not
        running here.
        """
        if not self._migratable():
            return None
        request = self.scheduler.detach(req_id)
        if request is None:
            return None
        num_blocks = -(-request.num_computed_tokens // self.kv_manager.block_size)
        state = replace(
            request,
            prompt_token_ids=list(request.prompt_token_ids),
            output_token_ids=list(request.output_token_ids),
        )
        return state, self._chunk(request, first_block, num_blocks)

    def migration_resume_here(self, req_id: str) -> None:
        """The migration failed after `migration_suspend`: the request goes on here where it stopped."""
        self.scheduler.reattach(req_id)

    def migration_release(self, req_id: str) -> None:
        """The destination committed: free the request's KV here."""
        self.scheduler.release_detached(req_id)
        self._flush_if_idle()

    # -- the destination --------------------------------------------------------------

    def migration_reserve(self, request: Request, num_tokens: int) -> bool:
        """Reserve blocks for `num_tokens` of an incoming request's KV; False, holding nothing, if short."""
        if not self._migratable() or request.req_id in self.scheduler.requests:
            return False
        kv = self.kv_manager
        assert isinstance(kv, PagedKVCacheManager)
        incoming = self._incoming.setdefault(request.req_id, request)
        ops = kv.reserve(incoming, num_tokens)
        if ops is None:
            if not kv.block_table(incoming):
                del self._incoming[request.req_id]
            return False
        written = self.mover.write_down(ops)
        if written.disk_save_failed:  # those blocks are simply not on disk; the tier stops taking more
            kv.apply_disk_report([], {}, written.disk_save_failed)
        if written.host_save_failed:
            self.scheduler.lose_host_blocks(written.host_save_failed)
        return True

    def migration_import(self, req_id: str, chunk: KVChunk) -> bool:
        """Copy a staged chunk into the reserved blocks; False if nothing is reserved for `req_id`."""
        incoming = self._incoming.get(req_id)
        if incoming is None:
            return False
        table = self.kv_manager.block_table(incoming)
        if chunk.first_block + chunk.num_blocks > len(table):
            return False
        self.mover.write_blocks(table[chunk.first_block : chunk.first_block + chunk.num_blocks], chunk.data)
        return True

    def migration_commit(self, state: Request, chunk: KVChunk) -> bool:
        """Take the last chunk and resume the request here; False (reservation released) if it cannot."""
        if not self.migration_reserve(state, state.num_computed_tokens) or not self.migration_import(
            state.req_id, chunk
        ):
            self.migration_cancel(state.req_id)
            return False
        # The books hold the blocks under the request's id; the scheduler tracks the state that came with the KV.
        del self._incoming[state.req_id]
        self.scheduler.attach(state)
        return True

    def migration_cancel(self, req_id: str) -> None:
        """Give back an incoming request's reservation (the migration was abandoned)."""
        incoming = self._incoming.pop(req_id, None)
        if incoming is not None:
            self.kv_manager.free(incoming)

    def _migratable(self) -> bool:
        """Only the paged books can export and import blocks (the virtual cache has no block export)."""
        return isinstance(self.kv_manager, PagedKVCacheManager)

    def _chunk(self, request: Request, first_block: int, end_block: int) -> KVChunk:
        table = self.kv_manager.block_table(request)[first_block:end_block]
        return KVChunk(first_block, len(table), self.mover.read_blocks(table), request.num_computed_tokens)
