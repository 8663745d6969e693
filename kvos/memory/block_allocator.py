"""Physical KV blocks: reference counts, a free list, the prefix-cache index, and events.

A block with zero references is free, but if it is full and hashed it still
holds valid KV for its prefix: it stays findable by hash until the allocator
needs it for something else. Free blocks are reused in LRU order, so the
oldest cached prefixes are evicted first and only ever when free.

Every block that becomes findable (stored) or stops being findable (removed)
is reported as a `KVEvent`: a prefix-aware router and a write-back tier
subscribe to these instead of reading the pool.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from kvos.memory.block_hash import BlockHash


@dataclass(slots=True)
class Block:
    """Slotted: an engine (or a simulated fleet of them) holds one per block of its pool, thousands each."""

    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None


class BlockStored(NamedTuple):
    """A full block was computed and published: its KV is findable under `block_hash`.

    The events are named tuples, not frozen dataclasses: a pool makes one per block it publishes and
    one per cached block it reuses, and a simulated fleet millions, built in about half the time."""

    block_hash: BlockHash
    parent_hash: BlockHash
    block_id: int


class BlockRemoved(NamedTuple):
    """A cached block was evicted (reused for other KV): `block_hash` is no longer here."""

    block_hash: BlockHash
    block_id: int


KVEvent = BlockStored | BlockRemoved


class BlockAllocator:
    """Hands out fixed-size blocks by id; knows nothing about requests."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (least recently freed first).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self._events: list[KVEvent] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_idle_cached_blocks(self) -> int:
        """Free blocks still findable by digest (the prefix cache nobody holds)."""
        return sum(1 for b in self._free if self.blocks[b].block_hash is not None)

    def next_evicted(self) -> Block | None:
        """The block `allocate` would take next (None when nothing is free): a write-back tier saves
        its KV first if it is cached."""
        if not self._free:
            return None
        return self.blocks[next(iter(self._free))]

    def peek_evicted(self, num: int) -> list[Block]:
        """The blocks `allocate_many(num)` would take, in order, without taking them."""
        return [self.blocks[b] for b in itertools.islice(self._free, num)]

    def allocate(self) -> int:
        """Take the least recently freed block, evicting its cached prefix if any."""
        return self.allocate_many(1)[0]

    def allocate_many(self, num: int) -> list[int]:
        """The `num` least recently freed blocks, in that order, each evicting its cached prefix if any
        (one call for callers with no write-back to plan between blocks)."""
        free = self._free
        if num > len(free):
            raise RuntimeError("not enough free KV blocks (callers check num_free_blocks first)")
        blocks, cached, events = self.blocks, self._cached, self._events
        taken = []
        for _ in range(num):
            block_id, _ = free.popitem(last=False)
            block = blocks[block_id]
            if block.block_hash is not None:
                del cached[block.block_hash]
                events.append(BlockRemoved(block.block_hash, block_id))
                block.block_hash = None
            block.ref_count = 1
            taken.append(block_id)
        return taken

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._cached.get(block_hash)

    @property
    def cached(self) -> Mapping[BlockHash, int]:
        """Digest -> block id of every findable block, read-only: for checks made per block per step."""
        return self._cached

    def cached_blocks(self) -> list[tuple[BlockHash, int]]:
        """(digest, block id) of every block findable by digest, held or idle."""
        return list(self._cached.items())

    def take_cached(self, block_id: int) -> None:
        """Add a reference to a cached block, pulling it off the free list if idle."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def share(self, block_id: int) -> None:
        """Add a reference to a block in use (copy-on-write fork)."""
        block = self.blocks[block_id]
        if block.ref_count <= 0:
            raise RuntimeError(f"sharing free block {block_id}")
        block.ref_count += 1

    def release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count <= 0:
            raise RuntimeError(f"double free of block {block_id}")
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None

    def mark_cached(self, block_id: int, block_hash: BlockHash, parent_hash: BlockHash) -> None:
        """Publish a full, computed block under its prefix hash (first writer wins)."""
        block = self.blocks[block_id]
        if block.block_hash is not None or block_hash in self._cached:
            return
        block.block_hash = block_hash
        self._cached[block_hash] = block_id
        self._events.append(BlockStored(block_hash, parent_hash, block_id))

    def drain_events(self) -> list[KVEvent]:
        """The events since the last call, oldest first."""
        events, self._events = self._events, []
        return events
