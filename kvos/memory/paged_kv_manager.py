"""PagedAttention-style KV cache books: per-request block tables over a shared pool.

    request A  block table [7, 2, 9]        pool of blocks (each block_size tokens)
    request B  block table [7, 2, 4]        +---+---+---+---+---+---+---+---+---+---+
                                            | 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 | 9 |
    A and B share blocks 7 and 2 (a common   +---+---+---+---+---+---+---+---+---+---+
    prompt prefix, ref_count 2 each).

A token at position p of a request lives in slot
`block_table[p // block_size] * block_size + p % block_size` of the flat
per-layer K/V tensors `[num_blocks * block_size, num_kv_heads, head_dim]`,
which the worker owns (`kvos.worker.kv_cache`). This class only keeps the
tables, the free list and the prefix index.

Publication: a full block enters the prefix index (and emits a
`BlockStored` event) only in `publish`, after the step that wrote it has
succeeded. Within the step being planned, blocks it will write are
findable as *pending*: a request admitted in the same step may read them,
because every layer writes the whole batch's KV before any request reads it.
If the step fails, every request in it fails too, and `end_step` forgets
the pending entries, so nothing half-written is ever found later.

Host tier (optional, `kvos.memory.tiers.host`): blocks move between the pool
and a larger, slower pool in host memory, by plan operations the worker
runs before the forward pass (`SaveToHost`, `LoadFromHost`):

    write-back   a cached block the allocator is about to reuse is saved to
                 the host tier first, unless the tier already holds its digest
    lookup       a prefix lookup walks the digest chain through both tiers;
                 a host hit becomes a fresh block here plus a load (the host
                 copy stays, as cache)
    swap         a preempted request's computed blocks (its partial tail
                 included) go to host blocks it holds, and come back on
                 resume; the host copy is kept while it runs again, so the
                 next swap-out writes only the blocks that changed

Holds (sessions, `kvos.engine.sessions`): when a request of a session ends,
its published blocks are kept under the session's key (one reference each)
instead of returning to the free list, so the conversation's next call finds
them whatever else ran meanwhile. A hold is only a pin: releasing it (the
session is deleted or expires, or the scheduler needs the memory for a live
request, oldest hold first) leaves the blocks as ordinary prefix cache,
which the LRU evicts, writing them back to the host tier when there is one.

Disk tier (optional, `kvos.memory.tiers.disk`), below the host tier (or below
the pool when there is no host tier): a cached block the tier above is about
to reuse is written to a file named by its digest (`SaveToDisk`), unless the
disk holds it already. A waiting request whose prefix continues on disk first
`prefetch`es it: its blocks are read into fresh blocks of the tier above
(`LoadFromDisk`, on the worker's copy thread) while the request waits, and
only those the worker reports as checked become findable; the request is
admitted once every read is reported, and finds them as ordinary hits. A
read's target stays held until its report, even when the request that asked
for it ends first, so a late read never lands in a block someone else reuses.
A failed step forgets what it planned to publish in the host and disk tiers
(`end_step(failed=True)`), as it does in the pool.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from kvos.core.plan import (
    CopyKV,
    LoadFromDisk,
    LoadFromHost,
    SaveToDisk,
    SaveToHost,
    TableUpdate,
    TierName,
    coalesce_loads,
    coalesce_saves,
)
from kvos.core.request import Request
from kvos.memory.block_allocator import BlockAllocator, KVEvent
from kvos.memory.block_hash import BlockHash, chain_hashes, root_hash, salted_root
from kvos.memory.kv_manager import NO_CHANGE, KVAllocation, TierOps
from kvos.memory.tiers.disk import DiskBlockIndex
from kvos.memory.tiers.host import (
    HostBlockPool,
    HostCopy,
    TierCounters,
    forget_unwritten,
    release_copy,
    resumed_copy,
)

logger = logging.getLogger(__name__)

PRIMARY: TierName = "primary"
HOST: TierName = "host"
DISK = "disk"


@dataclass
class _DiskRead:
    """A disk load planned and not yet reported: where it lands, its digest's parent, who asked."""

    tier: TierName
    block_id: int
    parent: BlockHash
    req_id: str | None
    """The prefetching request; None once it has ended (the read's report then releases the target)."""


@dataclass(frozen=True)
class _Prefetched:
    """A block held for a waiting request by its prefetch: a hit of its prefix, or a disk load's target."""

    tier: TierName
    block_id: int
    from_disk: bool


class PagedKVCacheManager:
    """Allocates blocks to requests; shares full blocks by prefix digest; copies on write."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        enable_prefix_caching: bool = True,
        model_identity: str = "",
        host: HostBlockPool | None = None,
        disk: DiskBlockIndex | None = None,
    ) -> None:
        self.block_size = block_size
        self.table_block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.capacity_tokens = num_blocks * block_size
        self.max_tokens_per_request = min(max_model_len, self.capacity_tokens)
        self.enable_prefix_caching = enable_prefix_caching
        self._root = root_hash(model_identity, block_size)
        self._block_tables: dict[str, list[int]] = {}
        # Digests of the request's full blocks, in order: digest i covers tokens [0, (i+1)*block_size).
        self._block_hashes: dict[str, list[BlockHash]] = {}
        # Full blocks the step being planned will write: digest -> block id, and back.
        self._pending: dict[BlockHash, int] = {}
        self._pending_digest: dict[int, BlockHash] = {}
        # Per request, so `publish` and `_mark_pending` walk only what is new: blocks below the cursor are
        # published (a held block keeps its digest), except the listed ones, whose digest another block held
        # when they were published; they are retried each call, in order, as a full walk would.
        self._publish_cursor: dict[str, int] = {}
        self._unpublished: dict[str, list[int]] = {}
        self._num_queried_tokens = 0
        self.host = host
        """The host tier's books, or None when there is no host tier."""
        self._host_copies: dict[str, HostCopy] = {}
        # Host blocks that loads planned this step read: no save may overwrite them before the step runs.
        self._step_host_pins: list[int] = []
        # Write-backs forced by the allocation being planned; they travel with its KVAllocation.
        self._demotions: list[SaveToHost] = []
        self.counters = TierCounters()
        # Session holds: key -> the blocks it pins, oldest hold first.
        self._holds: OrderedDict[str, list[int]] = OrderedDict()
        self.disk = disk
        """The disk tier's books, or None when there is no disk tier."""
        self._tier_ops = TierOps()
        # Disk loads planned and not yet reported by the worker (they may take several steps).
        self._disk_inflight: dict[BlockHash, _DiskRead] = {}
        self._step_disk_loads: list[BlockHash] = []
        self._prefetched: dict[str, list[_Prefetched]] = {}
        # What this step made findable in the tiers below, forgotten if the step fails.
        # Host blocks indexed this step -> the pool block their save reads (it still holds the KV at step start).
        self._step_host_indexed: dict[int, int] = {}
        self._step_disk_added: list[BlockHash] = []

    # -- accounting -----------------------------------------------------------------

    @property
    def num_used_blocks(self) -> int:
        return self.allocator.num_used_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free_blocks

    def prefix_cache_stats(self) -> tuple[int, int]:
        counters = self.counters
        return (
            self._num_queried_tokens,
            counters.primary_hit_tokens + counters.host_hit_tokens + counters.disk_hit_tokens,
        )

    @property
    def num_host_copies(self) -> int:
        """Requests holding KV in the host tier (swapped out, or kept after a swap-in)."""
        return len(self._host_copies)

    def drain_events(self) -> list[KVEvent]:
        return self.allocator.drain_events()

    def check_fits(self, num_tokens: int) -> None:
        """Refuse a request that could never fit, even alone in an empty cache."""
        if num_tokens > self.max_tokens_per_request:
            raise ValueError(
                f"request needs {num_tokens} tokens of KV cache (prompt + max_tokens) but at most "
                f"{self.max_tokens_per_request} fit (KV capacity {self.capacity_tokens} tokens)"
            )

    # -- prefix cache ---------------------------------------------------------------

    @property
    def root_digest(self) -> BlockHash:
        """The root of this cache's digest chain: a router hashing prompts with it names the same blocks."""
        return self._root

    def block_hashes(self, request: Request) -> list[BlockHash]:
        """Chained digests of the request's full blocks, extended incrementally."""
        hashes = self._block_hashes.setdefault(request.req_id, [])
        bs = self.block_size
        done = len(hashes)
        num_full = request.num_tokens // bs
        if done >= num_full:  # the usual case once a step has run: nothing new to digest
            return hashes
        parent = hashes[-1] if done else salted_root(self._root, request.cache_salt)
        hashes.extend(chain_hashes(parent, request.token_slice(done * bs, num_full * bs), bs))
        return hashes

    def block_hashes_of(self, token_ids: list[int], cache_salt: str | None = None) -> list[BlockHash]:
        """The digests (disk file names included) of the full blocks of a token sequence."""
        return chain_hashes(salted_root(self._root, cache_salt), token_ids, self.block_size)

    def lookup_prefix(self, request: Request) -> int:
        """Prefix hits in every tier: the digest chain is followed through the pool and the host tier."""
        return len(self._prefix_hits(request, (request.num_tokens - 1) // self.block_size)) * self.block_size

    def tier_hits(self, request: Request) -> dict[str, int]:
        """Tokens of the request's prefix found in each tier, the fastest preferred (disk included)."""
        found = {PRIMARY: 0, HOST: 0, DISK: 0}
        for tier, _ in self._prefix_hits(request, (request.num_tokens - 1) // self.block_size, with_disk=True):
            found[tier] += self.block_size
        return found

    def _prefix_hits(self, request: Request, max_blocks: int, with_disk: bool = False) -> list[tuple[str, int]]:
        """(tier, block id in that tier) of each leading block found, the pool preferred; a disk
        block (with `with_disk`) has id -1: it must be loaded before anyone can use it."""
        if not self.enable_prefix_caching:
            return []
        hits: list[tuple[str, int]] = []
        for digest in self.block_hashes(request)[:max_blocks]:
            block_id = self._lookup(digest)
            if block_id is not None:
                hits.append((PRIMARY, block_id))
                continue
            host_block_id = self.host.lookup(digest) if self.host is not None else None
            if host_block_id is not None:
                hits.append((HOST, host_block_id))
            elif with_disk and self.disk is not None and digest in self.disk and digest not in self._disk_inflight:
                hits.append((DISK, -1))
            else:
                break
        return hits

    def _lookup(self, digest: BlockHash) -> int | None:
        block_id = self.allocator.lookup(digest)
        return block_id if block_id is not None else self._pending.get(digest)

    # -- allocation -----------------------------------------------------------------

    def allocate_slots(self, request: Request, num_new_tokens: int, num_cached_tokens: int = 0) -> KVAllocation | None:
        table = self._block_tables.get(request.req_id)
        if table is not None:
            return self._extend(request, table, num_new_tokens)
        if request.req_id in self._host_copies:
            return self._swap_in(request, num_new_tokens, num_cached_tokens)
        table = []
        hits = self._cached_blocks(request, num_cached_tokens)
        primary_hits = [b for tier, b in hits if tier == PRIMARY]
        total = num_cached_tokens + num_new_tokens
        # Host hits need fresh blocks here like new tokens do.
        num_needed = max(-(-total // self.block_size) - len(primary_hits), 0)
        # Cached blocks that sit on the free list are not free capacity for this request.
        num_idle_cached = sum(1 for b in primary_hits if self.allocator.blocks[b].ref_count == 0)
        if num_needed > self.allocator.num_free_blocks - num_idle_cached:
            return None
        self._block_tables[request.req_id] = table
        self._num_queried_tokens += request.num_tokens
        for block_id in primary_hits:
            self.allocator.take_cached(block_id)
        loads = self._take_hits(hits, table, self._prefetched.get(request.req_id, []))
        self._release_prefetched(request.req_id)
        num_needed -= len(hits) - len(primary_hits)
        self._allocate_blocks(table, num_needed)
        self._mark_pending(request, table, total)
        saves, self._demotions = self._demotions, []
        if not table:
            return KVAllocation(saves=coalesce_saves(saves))
        return KVAllocation(TableUpdate(0, tuple(table)), [], coalesce_saves(saves), loads)

    def _extend(self, request: Request, table: list[int], num_new_tokens: int) -> KVAllocation | None:
        """`allocate_slots` for a request that holds a table: room for its next tokens, its shared tail copied."""
        num_computed = request.num_computed_tokens
        total = num_computed + num_new_tokens
        num_needed = max(-(-total // self.block_size) - len(table), 0)
        # A fork shares the last partial block; writing into it needs a private copy.
        needs_copy = self._shared_tail(table, num_computed)
        if num_needed + needs_copy > self.allocator.num_free_blocks:
            return None
        first_changed = len(table)
        copies = []
        if needs_copy:
            index = num_computed // self.block_size
            copies.append(self._copy_on_write(table, index))
            first_changed = index
        if num_needed:
            self._allocate_blocks(table, num_needed)
        self._mark_pending(request, table, total)
        saves, self._demotions = self._demotions, []
        if first_changed == len(table):
            return KVAllocation(saves=coalesce_saves(saves)) if saves else NO_CHANGE
        return KVAllocation(TableUpdate(first_changed, tuple(table[first_changed:])), copies, coalesce_saves(saves))

    def _take_hits(
        self, hits: list[tuple[str, int]], table: list[int], prefetched: list[_Prefetched]
    ) -> list[LoadFromHost]:
        """Append the prefix hits to `table` in order; each host hit gets a fresh block and a load.

        Hits on blocks this request's prefetch read from disk were counted as disk hits already."""
        from_disk = {(p.tier, p.block_id) for p in prefetched if p.from_disk}
        host_ids = [b for tier, b in hits if tier == HOST]
        assert self.host is not None or not host_ids
        for host_block_id in host_ids:  # pinned before any allocation here can evict them from the host tier
            self.host.hold(host_block_id)  # type: ignore[union-attr]
            self._step_host_pins.append(host_block_id)
        loads = []
        for tier, block_id in hits:
            counted = (tier, block_id) not in from_disk
            if tier == PRIMARY:
                table.append(block_id)
                self.counters.primary_hit_tokens += self.block_size * counted
            else:
                new = self._allocate_block()
                table.append(new)
                loads.append(LoadFromHost(block_id, new))
                self.counters.host_hit_tokens += self.block_size * counted
                self.counters.blocks_promoted += 1
        return coalesce_loads(loads)

    def _cached_blocks(self, request: Request, num_cached_tokens: int) -> list[tuple[str, int]]:
        if num_cached_tokens % self.block_size:
            raise ValueError(f"cached tokens ({num_cached_tokens}) must be whole blocks of {self.block_size}")
        num_blocks = num_cached_tokens // self.block_size
        hits = self._prefix_hits(request, num_blocks)
        if len(hits) < num_blocks:
            raise RuntimeError("prefix hit vanished between lookup_prefix and allocate_slots")
        return hits

    def _allocate_blocks(self, table: list[int], num: int) -> None:
        """Append `num` fresh blocks to `table`, as `num` calls of `_allocate_block` would."""
        if self.host is None and self.disk is None:  # nothing to write back: take them in one go
            table.extend(self.allocator.allocate_many(num))
        else:
            for _ in range(num):
                table.append(self._allocate_block())

    def _allocate_block(self) -> int:
        """Take a block; if it holds cached KV the tiers below lack, write it back first: to the host
        tier, or to the disk tier when there is no host tier or it has no room."""
        evicted = self.allocator.next_evicted()
        digest = evicted.block_hash if evicted is not None else None
        if evicted is not None and digest is not None:
            if self.host is not None and self.host.lookup(digest) is None and self.host.num_free_blocks > 0:
                host_block_id = self._allocate_host_block()
                self._host_index(host_block_id, digest, evicted.block_id)
                self.host.release(host_block_id)  # nobody holds it: the tier keeps it as cache
                self._demotions.append(SaveToHost(evicted.block_id, host_block_id))
                self.counters.blocks_demoted += 1
            elif self.host is None or self.host.lookup(digest) is None:
                self._save_to_disk(PRIMARY, evicted.block_id, digest)
        return self.allocator.allocate()

    def _allocate_host_block(self) -> int:
        """Take a host block; if it holds cached KV the disk tier lacks, write that to disk first.

        A block indexed during this step does not hold its KV until the step's
        host saves run, after the disk saves: its disk save reads the pool
        block that its host save reads."""
        assert self.host is not None
        evicted = self.host.next_evicted()
        if evicted is not None and evicted.block_hash is not None:
            source = self._step_host_indexed.get(evicted.host_block_id)
            if source is None:
                self._save_to_disk(HOST, evicted.host_block_id, evicted.block_hash)
            else:
                self._save_to_disk(PRIMARY, source, evicted.block_hash)
        return self.host.allocate()

    def _host_index(self, host_block_id: int, digest: BlockHash, source_block_id: int) -> None:
        """Index a host block whose save (from pool block `source_block_id`) is planned this step."""
        assert self.host is not None
        self.host.index(host_block_id, digest)
        if self.host.blocks[host_block_id].block_hash == digest:
            self._step_host_indexed[host_block_id] = source_block_id

    def _save_to_disk(self, tier: TierName, block_id: int, digest: BlockHash) -> None:
        """Plan a write of a cached block's KV to the disk tier (if it takes it and lacks it)."""
        if self.disk is None or digest in self.disk:
            return
        evicted = self.disk.add(digest)
        if evicted is None:
            return
        self._tier_ops.disk_drops.extend(evicted)
        self._tier_ops.disk_saves.append(SaveToDisk(tier, block_id, digest))
        self._step_disk_added.append(digest)
        self.counters.blocks_to_disk += 1

    def _shared_tail(self, table: list[int], num_computed: int) -> bool:
        if num_computed % self.block_size == 0 or not table:
            return False
        return self.allocator.blocks[table[num_computed // self.block_size]].ref_count > 1

    def _copy_on_write(self, table: list[int], index: int) -> CopyKV:
        old = table[index]
        new = self._allocate_block()
        self.allocator.release(old)
        table[index] = new
        return CopyKV(old * self.block_size, new * self.block_size, self.block_size)

    def _mark_pending(self, request: Request, table: list[int], num_tokens: int) -> None:
        """Blocks this step fills become findable by requests planned into the same step."""
        if not self.enable_prefix_caching:
            return
        req_id = request.req_id
        start = self._publish_cursor.get(req_id, 0)
        retry = self._unpublished.get(req_id, ())
        num_full = num_tokens // self.block_size
        if num_full <= start and not retry:
            return  # the step fills no block (a decode inside one)
        hashes = self.block_hashes(request)
        limit = min(num_full, len(hashes))
        blocks = self.allocator.blocks
        for i in [*retry, *range(start, limit)]:
            if i >= limit:
                break
            block_id, digest = table[i], hashes[i]
            if blocks[block_id].block_hash is None and digest not in self._pending:
                self._pending[digest] = block_id
                self._pending_digest[block_id] = digest

    def end_step(self, failed: bool = False) -> None:
        """The planned step is over: pending blocks are findable no more. If it `failed`, the
        worker may not have run its saves, so what they were to make findable below is forgotten."""
        self._pending.clear()
        self._pending_digest.clear()
        assert self.host is not None or not self._step_host_pins
        for host_block_id in self._step_host_pins:
            self.host.release(host_block_id)  # type: ignore[union-attr]
        self._step_host_pins.clear()
        if failed:
            for host_block_id in self._step_host_indexed:
                self.host.unindex(host_block_id)  # type: ignore[union-attr]
            for key in self._step_disk_added:
                self.disk.discard(key)  # type: ignore[union-attr]
            self.counters.blocks_to_disk -= len(self._step_disk_added)
            for key in self._step_disk_loads:  # the worker voids them: no report will come
                read = self._disk_inflight.pop(key)
                if read.req_id is None:
                    self._release_block(read.tier, read.block_id)
                # else the target stays held by its prefetch, findable by nobody, until the request goes
        self._step_disk_loads.clear()
        self._step_host_indexed.clear()
        self._step_disk_added.clear()
        if self.disk is not None:
            self.disk.unpin_all()

    def take_tier_ops(self) -> TierOps:
        """The disk traffic (and prefetch-forced host saves) planned since the last call, for the plan."""
        ops, self._tier_ops = self._tier_ops, TierOps()
        ops.saves = coalesce_saves(ops.saves)
        return ops

    # -- disk tier --------------------------------------------------------------------

    def prefetch(self, request: Request) -> bool:
        """Plan loads of the waiting request's prefix blocks that only the disk tier holds.

        Returns True while the request must wait: its loads were planned now or
        are not all reported yet. It holds the loads' targets and the prefix's
        other hits (so no allocation evicts them), and finds them as hits once
        admitted. A request prefetches once per admission.
        """
        if request.req_id in self._prefetched:
            return any(read.req_id == request.req_id for read in self._disk_inflight.values())
        if self.disk is None or request.req_id in self._host_copies:
            return False
        hits = self._prefix_hits(request, (request.num_tokens - 1) // self.block_size, with_disk=True)
        num_on_disk = sum(tier == DISK for tier, _ in hits)
        if not num_on_disk:
            return False
        target: TierName = HOST if self.host is not None else PRIMARY
        held: list[_Prefetched] = []
        for tier, block_id in hits:
            if tier == PRIMARY:
                self.allocator.take_cached(block_id)
                held.append(_Prefetched(PRIMARY, block_id, False))
            elif tier == HOST:
                self.host.hold(block_id)  # type: ignore[union-attr]
                held.append(_Prefetched(HOST, block_id, False))
        self._prefetched[request.req_id] = held
        room = self.host.num_free_blocks if self.host is not None else self.allocator.num_free_blocks
        if room == 0:  # nowhere to load into: admit it with what the faster tiers hold
            self._release_prefetched(request.req_id)
            return False
        hashes = self.block_hashes(request)
        for i, (tier, _) in enumerate(hits):
            # Pinned before any target is taken: taking one may write an evicted block to disk, and the disk
            # tier, if full, would drop its oldest unpinned file, perhaps one of these (read back "missing").
            if tier == DISK:
                self.disk.pin(hashes[i])
        for i, (tier, _) in enumerate(hits):
            if tier != DISK:
                continue
            if room == 0:
                break
            room -= 1
            key = hashes[i]
            block_id = self._allocate_host_block() if target == HOST else self._allocate_block()
            self.disk.touch(key)
            parent = hashes[i - 1] if i else salted_root(self._root, request.cache_salt)
            self._disk_inflight[key] = _DiskRead(target, block_id, parent, request.req_id)
            self._step_disk_loads.append(key)
            self._tier_ops.disk_loads.append(LoadFromDisk(key, target, block_id))
            held.append(_Prefetched(target, block_id, True))
        self._tier_ops.saves.extend(self._demotions)
        self._demotions = []
        return True

    def apply_disk_report(
        self, loaded: list[BlockHash], load_failed: dict[BlockHash, str], save_failed: dict[BlockHash, str]
    ) -> None:
        """The worker ran disk operations (of this step or earlier ones): make checked loads findable,
        forget the rest."""
        for key in loaded:
            read = self._disk_inflight.pop(key)
            if read.tier == HOST:
                assert self.host is not None
                self.host.index(read.block_id, key)
            else:
                self.allocator.mark_cached(read.block_id, key, read.parent)
            if read.req_id is None:  # its request ended: the block stays as cache, held by nobody
                self._release_block(read.tier, read.block_id)
            self.counters.blocks_from_disk += 1
            self.counters.disk_hit_tokens += self.block_size
        for key, reason in load_failed.items():
            read = self._disk_inflight.pop(key)
            if read.req_id is None:
                self._release_block(read.tier, read.block_id)
            self.disk.discard(key)  # type: ignore[union-attr]
            if reason == "missing":
                self.counters.disk_missing += 1
            else:
                self.counters.disk_corrupted += 1
                logger.warning("disk KV block %s failed its checks (%s): discarded, recomputing", key.hex(), reason)
        if not save_failed:
            return
        assert self.disk is not None
        for key in save_failed:
            self.disk.discard(key)
        self.counters.disk_write_failures += len(save_failed)
        self.counters.blocks_to_disk -= len(save_failed)
        if self.disk.accepting:
            self.disk.accepting = False
            logger.error(
                "the disk KV tier stopped taking blocks: a write failed (%s); it keeps serving what it holds",
                next(iter(save_failed.values())),
            )

    def lose_host_blocks(self, host_block_ids: list[int]) -> list[str]:
        assert self.host is not None
        return forget_unwritten(self._host_copies, self.host, host_block_ids)

    def flush_to_disk(self) -> TierOps:
        """Plan writes of every cached block the disk tier lacks (at a clean shutdown), pool first."""
        if self.disk is not None:
            for digest, block_id in self.allocator.cached_blocks():
                self._save_to_disk(PRIMARY, block_id, digest)
            if self.host is not None:
                for digest, host_block_id in self.host.cached_blocks():
                    source = self._step_host_indexed.get(host_block_id)
                    if source is None:
                        self._save_to_disk(HOST, host_block_id, digest)
                    else:
                        self._save_to_disk(PRIMARY, source, digest)
        return self.take_tier_ops()

    def release_prefetches(self, keep: Request | None) -> bool:
        """Let go of what waiting requests other than `keep` prefetched; they prefetch again at the head."""
        others = [req_id for req_id in self._prefetched if keep is None or req_id != keep.req_id]
        for req_id in others:
            self._release_prefetched(req_id)
        return bool(others)

    def _release_prefetched(self, req_id: str) -> None:
        """Let go of what the request's prefetch holds; a target still being read is let go by its report."""
        held = self._prefetched.pop(req_id, [])
        reading = set()
        for read in self._disk_inflight.values():
            if read.req_id == req_id:
                read.req_id = None
                reading.add((read.tier, read.block_id))
        for block in held:
            if (block.tier, block.block_id) not in reading:
                self._release_block(block.tier, block.block_id)

    def _release_block(self, tier: TierName, block_id: int) -> None:
        if tier == PRIMARY:
            self.allocator.release(block_id)
        else:
            self.host.release(block_id)  # type: ignore[union-attr]

    def publish(self, request: Request, num_computed_tokens: int) -> None:
        """Make the request's full, computed blocks findable by prefix digest."""
        if not self.enable_prefix_caching:
            return
        table = self._block_tables.get(request.req_id)
        if table is None:
            return
        req_id = request.req_id
        start = self._publish_cursor.get(req_id, 0)
        num_full = num_computed_tokens // self.block_size
        if num_full <= start and req_id not in self._unpublished:
            return  # most decode steps: no block filled, none to retry (and nothing to digest)
        hashes = self.block_hashes(request)
        limit = min(num_full, len(hashes), len(table))
        # A block whose digest another block holds (first writer wins) can take it only once that block is gone:
        # while it lives, marking changes nothing. Checked here, since a prompt computed twice in one step
        # (neither copy could find the other) would otherwise be marked again at each of its decode steps.
        held = self.allocator.cached
        retry = self._unpublished.get(req_id, [])
        if limit <= start and all(i >= limit or hashes[i] in held for i in retry):
            return
        self._unpublished.pop(req_id, None)
        blocks = self.allocator.blocks
        lost: list[int] = []
        for i in [*retry, *range(start, limit)]:
            if i < limit and hashes[i] not in held:
                parent = hashes[i - 1] if i else salted_root(self._root, request.cache_salt)
                self.allocator.mark_cached(table[i], hashes[i], parent)
            if blocks[table[i]].block_hash is None:  # another block holds its digest (first writer wins)
                lost.append(i)
        self._publish_cursor[req_id] = max(start, limit)
        if lost:
            self._unpublished[req_id] = lost

    def fork(self, parent: Request, child: Request, num_tokens: int, num_new_tokens: int) -> KVAllocation | None:
        """Share the parent's blocks under its first `num_tokens` tokens, then make room for more."""
        if child.req_id in self._block_tables:
            raise RuntimeError(f"{child.req_id} already holds KV blocks")
        shared = self._block_tables[parent.req_id][: -(-num_tokens // self.block_size)]
        for block_id in shared:
            self.allocator.share(block_id)
        self._block_tables[child.req_id] = list(shared)
        child.num_computed_tokens = num_tokens
        allocation = self.allocate_slots(child, num_new_tokens)
        if allocation is None:
            self.free(child)
            child.num_computed_tokens = 0
            return None
        return KVAllocation(
            TableUpdate(0, tuple(self._block_tables[child.req_id])), allocation.copies, allocation.saves
        )

    # -- holds (sessions) -----------------------------------------------------------

    @property
    def num_held_blocks(self) -> int:
        """Blocks pinned by holds (a block pinned by two holds counts twice)."""
        return sum(len(blocks) for blocks in self._holds.values())

    def held_keys(self) -> list[str]:
        """Keys holding KV, oldest hold first (the order they give way in)."""
        return list(self._holds)

    def hold(self, key: str, request: Request) -> None:
        """Pin the request's leading published blocks under `key`, replacing what `key` held before.

        Called as the request ends, before `free`. A request that computed no
        published block (aborted while waiting, say) leaves the old hold as it
        was: it is still the conversation's latest KV.
        """
        blocks = []
        for block_id in self._block_tables.get(request.req_id, ()):
            if self.allocator.blocks[block_id].block_hash is None:
                break
            blocks.append(block_id)
        if not blocks:
            return
        for block_id in blocks:  # taken before the old hold goes, so shared blocks never touch the free list
            self.allocator.share(block_id)
        self.release_hold(key)
        self._holds[key] = blocks

    def release_hold(self, key: str) -> bool:
        """Unpin what `key` holds (its blocks stay findable as prefix cache); False if it held nothing."""
        blocks = self._holds.pop(key, None)
        if blocks is None:
            return False
        for block_id in reversed(blocks):  # tail first, so the LRU evicts a prefix's end before its start
            self.allocator.release(block_id)
        return True

    def release_oldest_hold(self) -> bool:
        """Unpin the oldest hold to make room for a live request; False when nothing is held."""
        if not self._holds:
            return False
        return self.release_hold(next(iter(self._holds)))

    # -- swap -----------------------------------------------------------------------

    def swap_out(self, request: Request) -> list[SaveToHost] | None:
        """Move the request's computed KV to host blocks it holds, and free its blocks here.

        Returns the saves to run (before anything this step overwrites the
        freed blocks), or None, changing nothing, when the host tier lacks the
        room. Blocks the request's host copy already holds in full are not
        written again; full blocks whose digest the tier already holds are
        shared, not copied.
        """
        table = self._block_tables.get(request.req_id)
        if self.host is None or table is None:
            return None
        host = self.host
        num_tokens = request.num_computed_tokens
        bs = self.block_size
        copy = self._host_copies.get(request.req_id, HostCopy([], 0))
        hashes = self.block_hashes(request) if self.enable_prefix_caching else []
        # Per block: reuse our own copy, share the tier's copy of its digest, or take a new host block.
        shared: dict[int, int] = {}
        num_new = 0
        for i in range(len(copy.host_block_ids), -(-num_tokens // bs)):
            found = host.lookup(hashes[i]) if i < len(hashes) and (i + 1) * bs <= num_tokens else None
            if found is not None:
                shared[i] = found
            else:
                num_new += 1
        num_idle_shared = sum(1 for b in set(shared.values()) if host.blocks[b].ref_count == 0)
        if num_new > host.num_free_blocks - num_idle_shared:
            return None
        for host_block_id in shared.values():
            host.hold(host_block_id)
        saves = []
        for i in range(-(-num_tokens // bs)):
            if i < len(copy.host_block_ids):
                if (i + 1) * bs <= copy.num_tokens:
                    continue  # full and unchanged since the last swap-in
                host_block_id = copy.host_block_ids[i]  # the old partial tail, rewritten in place
            elif i in shared:
                copy.host_block_ids.append(shared[i])
                continue
            else:
                host_block_id = self._allocate_host_block()
                copy.host_block_ids.append(host_block_id)
            saves.append(SaveToHost(table[i], host_block_id))
            if i < len(hashes) and (i + 1) * bs <= num_tokens:
                self._host_index(host_block_id, hashes[i], table[i])
        copy.num_tokens = num_tokens
        self._host_copies[request.req_id] = copy
        self.counters.blocks_swapped_out += len(saves)
        self._free_primary(request)
        return coalesce_saves(saves)

    def _swap_in(self, request: Request, num_new_tokens: int, num_cached_tokens: int) -> KVAllocation | None:
        """Fresh blocks for a swapped-out request, loaded from its host copy, plus room for new tokens."""
        copy = resumed_copy(self._host_copies, request.req_id, num_cached_tokens)
        num_copied = -(-copy.num_tokens // self.block_size)
        total = num_cached_tokens + num_new_tokens
        num_needed = max(-(-total // self.block_size), num_copied)
        if num_needed > self.allocator.num_free_blocks:
            return None
        table = [self._allocate_block() for _ in range(num_needed)]
        self._block_tables[request.req_id] = table
        loads = coalesce_loads([LoadFromHost(h, b) for h, b in zip(copy.host_block_ids, table)])
        self.counters.blocks_swapped_in += num_copied
        self._mark_pending(request, table, total)
        saves, self._demotions = self._demotions, []
        return KVAllocation(TableUpdate(0, tuple(table)), [], coalesce_saves(saves), loads)

    def free(self, request: Request) -> None:
        """Give back the request's blocks here and in the host tier (cached host blocks stay as cache)."""
        self._release_prefetched(request.req_id)
        self._free_primary(request)
        release_copy(self._host_copies, request.req_id, self.host)

    def _free_primary(self, request: Request) -> None:
        table = self._block_tables.pop(request.req_id, None)
        self._block_hashes.pop(request.req_id, None)
        self._publish_cursor.pop(request.req_id, None)
        self._unpublished.pop(request.req_id, None)
        if table is None:
            return
        for block_id in table:
            digest = self._pending_digest.pop(block_id, None)
            if digest is not None:
                del self._pending[digest]
        # Tail blocks first, so the LRU evicts a prefix's end before its start.
        for block_id in reversed(table):
            self.allocator.release(block_id)

    def reserve(self, request: Request, num_tokens: int) -> TierOps | None:
        """Make the request's table hold `num_tokens` tokens with fresh blocks, for KV copied in from elsewhere.

        A live migration's destination calls this before the first block
        arrives, and again with the final length. No prefix lookup and no
        pending marks: the blocks are filled by copies, not by a step; they
        become findable once a step of the resumed request publishes them.
        Returns the moves down the tiers of the cached blocks it evicts
        (write-backs to the host tier, and what those or the pool's evictions
        send on to disk), which the caller runs at once, before anything is
        copied in: left for the next step's plan, they would read blocks the
        copies had already overwritten. None, changing nothing, when memory
        is short.
        """
        table = self._block_tables.get(request.req_id, [])
        num_needed = max(-(-num_tokens // self.block_size) - len(table), 0)
        if num_needed > self.allocator.num_free_blocks:
            return None
        self._block_tables[request.req_id] = table
        for _ in range(num_needed):
            table.append(self._allocate_block())
        ops = self.take_tier_ops()  # between steps, only this reservation's
        ops.saves = coalesce_saves([*ops.saves, *self._demotions])
        self._demotions = []
        # They run before the next step, so a failure of that step has nothing of them to undo.
        self._step_host_indexed.clear()
        self._step_disk_added.clear()
        if self.disk is not None:
            self.disk.unpin_all()
        return ops

    def block_table(self, request: Request) -> list[int]:
        return list(self._block_tables.get(request.req_id, ()))
