"""Books of the disk tier: which block digests have a file on disk, in LRU order, and whether it takes more.

    host tier (or primary pool)                  disk tier (this class's books; the worker owns the files)
    cached block about to be reused --SaveToDisk-->  DIR/<digest hex>.kv   (evicted LRU-first: a drop)
    fresh block for a request      <--LoadFromDisk-- checked (header, size, CRC-32) before it is findable

Every block on disk is cache: held by nobody, findable by digest, and the
same in any process and after a restart, because a digest names its KV for
one model, dtype, block size and layout (`kvos.memory.block_hash`). The
books start from the files the worker found when it opened the directory
(`kvos.worker.disk_store.DiskKVStore`), oldest first.

A key becomes findable when its save is planned. The worker runs disk saves
before anything that reads the disk in the same step, and a load that finds
no file or a bad one is reported, dropped from these books and counted; the
tokens are recomputed. So a file that failed to arrive costs a recompute,
never wrong KV. After the first failed write the tier stops taking blocks
(`accepting`): a full or read-only disk is said once, not once per block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from kvos.memory.block_hash import BlockHash


class DiskBlockIndex:
    """The digests on disk, least recently used first, within a capacity of `num_blocks` files."""

    def __init__(self, num_blocks: int, present: Iterable[BlockHash] = ()) -> None:
        if num_blocks < 1:
            raise ValueError(f"the disk KV tier needs room for at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._lru: OrderedDict[BlockHash, None] = OrderedDict((key, None) for key in present)
        if len(self._lru) > num_blocks:
            raise ValueError(f"{len(self._lru)} blocks on disk exceed the tier's {num_blocks}")
        self._pinned: set[BlockHash] = set()
        self.accepting = True
        """False after a write failed: the tier serves what it holds and takes nothing new."""

    @property
    def num_stored_blocks(self) -> int:
        return len(self._lru)

    def __contains__(self, key: BlockHash) -> bool:
        return key in self._lru

    def touch(self, key: BlockHash) -> None:
        """Mark `key` as just used (it moves to the back of the eviction order)."""
        if key in self._lru:
            self._lru.move_to_end(key)

    def pin(self, key: BlockHash) -> None:
        """Keep `key` from eviction until `unpin_all` (a load or save of it is planned this step)."""
        self._pinned.add(key)

    def unpin_all(self) -> None:
        self._pinned.clear()

    def add(self, key: BlockHash) -> list[BlockHash] | None:
        """Take `key` (pinned until the step ends); returns the keys evicted to make room, or None,
        changing nothing, when the tier takes no blocks or everything is pinned."""
        if not self.accepting or key in self._lru:
            return None
        evicted: list[BlockHash] = []
        if len(self._lru) >= self.num_blocks:
            victim = next((k for k in self._lru if k not in self._pinned), None)
            if victim is None:
                return None
            del self._lru[victim]
            evicted.append(victim)
        self._lru[key] = None
        self.pin(key)
        return evicted

    def discard(self, key: BlockHash) -> None:
        """Forget `key` (its file is bad, missing, or its write failed)."""
        self._lru.pop(key, None)
