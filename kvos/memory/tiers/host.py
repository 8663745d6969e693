"""Books of the host tier: a pool of KV blocks in host memory, by id, with a digest index and an LRU.

    primary pool (what attention reads)          host tier (this class's books; the worker owns the tensor)
    +----+----+----+----+                         +----+----+----+----+----+----+
    | 7  | 2  | 9  | .. |  --SaveToHost-->        | h0 | h1 | h2 | h3 | h4 | .. |
    +----+----+----+----+  <--LoadFromHost--      +----+----+----+----+----+----+
                                                   held: ref_count > 0 (a swapped request's blocks)
                                                   cached: ref 0, findable by digest, evicted LRU-first
                                                   free: ref 0, no digest

A host block has two kinds of holders: requests that swapped out (each
reference pins the block), and the digest index, which keeps a block's KV
findable by prefix lookups after its last holder let go. A block nobody
holds sits on the free list in least-recently-used order; a cached one there
stays findable until the pool needs the space. Like the primary allocator,
this class keeps books only: no tensors, no copies.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kvos.memory.block_hash import BlockHash


@dataclass
class HostBlock:
    host_block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None


class HostBlockPool:
    """Hands out host blocks by id; keeps the digest index and the LRU; knows nothing about requests."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the host KV tier needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [HostBlock(i) for i in range(num_blocks)]
        # Blocks nobody holds, least recently used first.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take (free ones and idle cached ones)."""
        return len(self._free)

    @property
    def num_held_blocks(self) -> int:
        """Blocks pinned by requests (swapped-out KV); zero once every request has ended."""
        return self.num_blocks - len(self._free)

    @property
    def num_idle_cached_blocks(self) -> int:
        """Blocks nobody holds that the tier keeps as cache (findable by digest until evicted)."""
        return sum(1 for b in self._free if self.blocks[b].block_hash is not None)

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._cached.get(block_hash)

    def next_evicted(self) -> HostBlock | None:
        """The block `allocate` would take next (None when none is free): the disk tier saves its KV
        first if it is cached."""
        if not self._free:
            return None
        return self.blocks[next(iter(self._free))]

    def cached_blocks(self) -> list[tuple[BlockHash, int]]:
        """(digest, host block id) of every block findable by digest."""
        return list(self._cached.items())

    def allocate(self) -> int:
        """Take the least recently used unheld block (dropping its digest, if cached), with one reference."""
        if not self._free:
            raise RuntimeError("no free host block (callers check num_free_blocks first)")
        host_block_id, _ = self._free.popitem(last=False)
        block = self.blocks[host_block_id]
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return host_block_id

    def hold(self, host_block_id: int) -> None:
        """Add a reference (pulling the block off the free list if nobody held it)."""
        block = self.blocks[host_block_id]
        if block.ref_count == 0:
            del self._free[host_block_id]
        block.ref_count += 1

    def release(self, host_block_id: int) -> None:
        """Drop a reference; the last one puts the block on the free list as most recently used."""
        block = self.blocks[host_block_id]
        if block.ref_count <= 0:
            raise RuntimeError(f"double free of host block {host_block_id}")
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[host_block_id] = None

    def index(self, host_block_id: int, block_hash: BlockHash) -> None:
        """Make a held block's KV findable under `block_hash` (first writer wins)."""
        block = self.blocks[host_block_id]
        if block.block_hash is not None or block_hash in self._cached:
            return
        block.block_hash = block_hash
        self._cached[block_hash] = host_block_id

    def unindex(self, host_block_id: int) -> None:
        """Forget the block's digest: its KV is about to be overwritten in place."""
        block = self.blocks[host_block_id]
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None


@dataclass
class TierCounters:
    """What moved between the tiers since start, in blocks (hits in tokens)."""

    primary_hit_tokens: int = 0
    host_hit_tokens: int = 0
    blocks_demoted: int = 0
    """Cached blocks written back to the host tier as the primary pool reused them."""
    blocks_promoted: int = 0
    """Host-tier prefix hits loaded into the primary pool."""
    blocks_swapped_out: int = 0
    blocks_swapped_in: int = 0
    disk_hit_tokens: int = 0
    """Prompt tokens whose KV came up from the disk tier (checked) for the request that needed them."""
    blocks_to_disk: int = 0
    """Cached blocks written to the disk tier as the tier above reused them (or at a clean shutdown)."""
    blocks_from_disk: int = 0
    """Blocks read back from the disk tier that passed their checks."""
    disk_corrupted: int = 0
    """Disk blocks discarded on read: bad header, size or checksum (the tokens were recomputed)."""
    disk_missing: int = 0
    """Disk blocks whose file was gone on read (a write that had failed, or removed by hand)."""
    disk_write_failures: int = 0


@dataclass
class HostCopy:
    """A request's KV in the host tier: block i holds its tokens [i * block_size, ...), the first
    `num_tokens` of them valid. Kept after a swap-in, so the next swap-out writes only what changed."""

    host_block_ids: list[int]
    num_tokens: int


def resumed_copy(copies: dict[str, HostCopy], req_id: str, num_cached_tokens: int) -> HostCopy:
    """The host copy a swapped-out request resumes from; it must hold exactly the tokens it resumes with."""
    copy = copies[req_id]
    if num_cached_tokens != copy.num_tokens:
        raise RuntimeError(f"{req_id} resumes with {num_cached_tokens} tokens but {copy.num_tokens} were swapped out")
    return copy


def release_copy(copies: dict[str, HostCopy], req_id: str, pool: HostBlockPool | None) -> None:
    """Forget the request's host copy, if any, giving its blocks back (cached ones stay findable)."""
    copy = copies.pop(req_id, None)
    if copy is not None and pool is not None:
        for host_block_id in copy.host_block_ids:
            pool.release(host_block_id)


def forget_unwritten(copies: dict[str, HostCopy], pool: HostBlockPool, host_block_ids: list[int]) -> list[str]:
    """A save failed to write these blocks: drop their digests and every host copy that includes one
    (giving its blocks back); the ids of the requests whose copy was dropped.

    A block given out again since may already hold good KV; forgetting it then costs a hit, never a
    wrong token."""
    lost = set(host_block_ids)
    for host_block_id in lost:
        pool.unindex(host_block_id)
    dropped = [req_id for req_id, copy in copies.items() if not lost.isdisjoint(copy.host_block_ids)]
    for req_id in dropped:
        release_copy(copies, req_id, pool)
    return dropped
