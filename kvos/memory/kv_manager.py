"""The contract every KV cache manager honours (paged and virtual alike).

A manager keeps books only: which blocks (or pages) each request holds, what
is free, what is cached under which identity. It owns no tensors and copies
nothing: where KV must move (copy-on-write, a fork into another row) it says
so as `CopyKV` operations (and, with a host tier, `SaveToHost` and
`LoadFromHost`), which travel in the step's plan to the worker that owns
the memory.

The scheduler decides how many tokens each request computes in a step; the
manager only answers whether the memory for them exists. `allocate_slots`
returning None is the signal to preempt, and leaves nothing half-allocated.

Addressing: a request's token p lives at flat slot
`table[p // table_block_size] * table_block_size + p % table_block_size`,
where `table` is the block table the manager hands out (see `kvos.core.plan`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from kvos.core.plan import CopyKV, LoadFromDisk, LoadFromHost, SaveToDisk, SaveToHost, TableUpdate
from kvos.core.request import Request
from kvos.memory.block_allocator import KVEvent


@dataclass(frozen=True)
class KVAllocation:
    """What changed for one request: its table (if at all) and the memory operations to run first."""

    table_update: TableUpdate | None = None
    copies: list[CopyKV] = field(default_factory=list)
    saves: list[SaveToHost] = field(default_factory=list)
    """Write-backs of cached blocks this allocation reuses (host tier only)."""
    loads: list[LoadFromHost] = field(default_factory=list)
    """Host-tier prefix hits and swapped-out KV coming back (host tier only)."""


NO_CHANGE = KVAllocation()
"""The allocation of a request whose table and memory stay as they are (most decode steps). Shared:
callers read its lists and never write them."""


@dataclass
class TierOps:
    """Memory operations a manager planned outside any one request's allocation (the scheduler adds
    them to the step's plan): disk traffic, and host saves forced by a prefetch."""

    saves: list[SaveToHost] = field(default_factory=list)
    disk_drops: list[bytes] = field(default_factory=list)
    disk_saves: list[SaveToDisk] = field(default_factory=list)
    disk_loads: list[LoadFromDisk] = field(default_factory=list)


class KVCacheManager(Protocol):
    """Narrow API between the scheduler and KV memory's books."""

    block_size: int
    """Allocation granularity, in tokens."""

    table_block_size: int
    """Tokens per entry of the block tables this manager hands out."""

    capacity_tokens: int
    """How many tokens fit in the cache at once (all requests together)."""

    max_tokens_per_request: int
    """The longest sequence one request may ever hold."""

    def lookup_prefix(self, request: Request) -> int:
        """Tokens of `request` already in the cache (prefix hits), without taking them.

        Always leaves at least one token to compute, so the step yields logits.
        """
        ...

    def allocate_slots(self, request: Request, num_new_tokens: int, num_cached_tokens: int = 0) -> KVAllocation | None:
        """Make room for `num_new_tokens` more tokens after the computed ones.

        On a request's first allocation `num_cached_tokens` (from
        `lookup_prefix`) are taken from the prefix cache as already computed.
        Returns None, changing nothing, when memory is short.
        """
        ...

    def fork(self, parent: Request, child: Request, num_tokens: int, num_new_tokens: int) -> KVAllocation | None:
        """Give `child` the KV of `parent`'s first `num_tokens` tokens, plus room for `num_new_tokens`.

        Shared copy-on-write where the manager can share, copied otherwise.
        Returns None, changing nothing, when memory is short.
        """
        ...

    def publish(self, request: Request, num_computed_tokens: int) -> None:
        """The step that computed the request's first `num_computed_tokens` tokens succeeded.

        Only now do its full blocks become findable by other requests: a
        failed step leaves nothing half-written in the prefix cache.
        """
        ...

    def end_step(self, failed: bool = False) -> None:
        """The step planned last has ended (its requests published, or, with `failed`, the worker raised)."""
        ...

    def free(self, request: Request) -> None:
        """Give back everything `request` holds. Safe to call twice."""
        ...

    def check_fits(self, num_tokens: int) -> None:
        """Raise ValueError (naming the length and the capacity) if a request of
        `num_tokens` could never fit, even alone in an empty cache."""
        ...

    def block_table(self, request: Request) -> list[int]:
        """The request's current block table (empty when it holds nothing)."""
        ...

    def drain_events(self) -> list[KVEvent]:
        """Blocks stored in and removed from the prefix cache since the last call."""
        ...

    @property
    def num_used_blocks(self) -> int:
        """Blocks (or pages) held by live requests; zero once all have ended."""
        ...

    @property
    def num_free_blocks(self) -> int: ...

    def prefix_cache_stats(self) -> tuple[int, int]:
        """(queried tokens, hit tokens) since start, for the hit rate."""
        ...


@runtime_checkable
class SwappingKVCacheManager(KVCacheManager, Protocol):
    """A manager with tiers below the pool: preemption may move a request's KV to the host tier
    instead of dropping it, and waiting requests may prefetch their prefix from disk.

    A swapped-out request resumes through the usual `allocate_slots` with
    `num_cached_tokens` = the tokens it had computed; the manager loads them back.
    """

    def swap_out(self, request: Request) -> list[SaveToHost] | None:
        """Save the request's computed KV to the host tier and free its primary blocks.

        Returns the saves to run, or None, changing nothing, when the host tier
        cannot take it (then the caller frees and recomputes as usual).
        """
        ...

    def prefetch(self, request: Request) -> bool:
        """Plan loads of the waiting request's prefix from a slower tier (disk); True: it waits this step."""
        ...

    def release_prefetches(self, keep: Request | None) -> bool:
        """Let go of what waiting requests other than `keep` prefetched (a live request needs the memory);
        False when none held anything. Blocks still being read stay held until the worker reports them."""
        ...

    def take_tier_ops(self) -> TierOps:
        """Memory operations planned outside allocations since the last call (for this step's plan)."""
        ...

    def apply_disk_report(
        self, loaded: list[bytes], load_failed: dict[bytes, str], save_failed: dict[bytes, str]
    ) -> None:
        """What the worker's disk operations did: checked loads become findable, failures are forgotten."""
        ...

    def lose_host_blocks(self, host_block_ids: list[int]) -> list[str]:
        """A host save failed to write these blocks: forget their digests and the host copies that include
        them; returns the requests whose copy is gone (they must compute their KV again)."""
        ...


@runtime_checkable
class HoldingKVCacheManager(KVCacheManager, Protocol):
    """A manager that can keep a finished request's KV pinned under a key (a session's hold).

    Holds never starve live requests: the scheduler releases them, oldest
    first, before it preempts anyone.
    """

    def hold(self, key: str, request: Request) -> None:
        """Pin the ending request's computed, published KV under `key`, replacing `key`'s old hold."""
        ...

    def release_hold(self, key: str) -> bool:
        """Unpin what `key` holds; False if it held nothing."""
        ...

    def release_oldest_hold(self) -> bool:
        """Unpin the oldest hold; False when nothing is held."""
        ...
