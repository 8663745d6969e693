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
"""

from __future__ import annotations

from kvos.core.plan import CopyKV, TableUpdate
from kvos.core.request import Request
from kvos.memory.block_allocator import BlockAllocator, KVEvent
from kvos.memory.block_hash import BlockHash, block_hash, root_hash, salted_root
from kvos.memory.kv_manager import KVAllocation


class PagedKVCacheManager:
    """Allocates blocks to requests; shares full blocks by prefix digest; copies on write."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        enable_prefix_caching: bool = True,
        model_identity: str = "",
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
        self._num_queried_tokens = 0
        self._num_hit_tokens = 0

    # -- accounting -----------------------------------------------------------------

    @property
    def num_used_blocks(self) -> int:
        return self.allocator.num_used_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free_blocks

    def prefix_cache_stats(self) -> tuple[int, int]:
        return self._num_queried_tokens, self._num_hit_tokens

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

    def block_hashes(self, request: Request) -> list[BlockHash]:
        """Chained digests of the request's full blocks, extended incrementally."""
        hashes = self._block_hashes.setdefault(request.req_id, [])
        bs = self.block_size
        for i in range(len(hashes), request.num_tokens // bs):
            parent = hashes[i - 1] if i else salted_root(self._root, request.cache_salt)
            hashes.append(block_hash(parent, request.token_slice(i * bs, (i + 1) * bs)))
        return hashes

    def lookup_prefix(self, request: Request) -> int:
        if not self.enable_prefix_caching:
            return 0
        num_hit_blocks = 0
        # Leave at least one token to compute so the step yields logits.
        max_blocks = (request.num_tokens - 1) // self.block_size
        for digest in self.block_hashes(request)[:max_blocks]:
            if self._lookup(digest) is None:
                break
            num_hit_blocks += 1
        return num_hit_blocks * self.block_size

    def _lookup(self, digest: BlockHash) -> int | None:
        block_id = self.allocator.lookup(digest)
        return block_id if block_id is not None else self._pending.get(digest)

    # -- allocation -----------------------------------------------------------------

    def allocate_slots(self, request: Request, num_new_tokens: int, num_cached_tokens: int = 0) -> KVAllocation | None:
        is_new = request.req_id not in self._block_tables
        table = self._block_tables.get(request.req_id, [])
        cached_ids = self._cached_block_ids(request, num_cached_tokens) if is_new else []
        num_computed = num_cached_tokens if is_new else request.num_computed_tokens
        total = num_computed + num_new_tokens
        num_needed = max(-(-total // self.block_size) - len(table) - len(cached_ids), 0)
        # A fork shares the last partial block; writing into it needs a private copy.
        needs_copy = self._shared_tail(table, num_computed)
        # Cached blocks that sit on the free list are not free capacity for this request.
        num_idle_cached = sum(1 for b in cached_ids if self.allocator.blocks[b].ref_count == 0)
        if num_needed + needs_copy > self.allocator.num_free_blocks - num_idle_cached:
            return None
        if is_new:
            self._block_tables[request.req_id] = table
            self._num_queried_tokens += request.num_tokens
            self._num_hit_tokens += num_cached_tokens
        for block_id in cached_ids:
            self.allocator.take_cached(block_id)
        first_changed = 0 if is_new else len(table)
        table.extend(cached_ids)
        copies = []
        if needs_copy:
            index = num_computed // self.block_size
            copies.append(self._copy_on_write(table, index))
            first_changed = index
        for _ in range(num_needed):
            table.append(self.allocator.allocate())
        self._mark_pending(request, table, total)
        if first_changed == len(table):
            return KVAllocation()
        return KVAllocation(TableUpdate(first_changed, tuple(table[first_changed:])), copies)

    def _cached_block_ids(self, request: Request, num_cached_tokens: int) -> list[int]:
        if num_cached_tokens % self.block_size:
            raise ValueError(f"cached tokens ({num_cached_tokens}) must be whole blocks of {self.block_size}")
        hashes = self.block_hashes(request)[: num_cached_tokens // self.block_size]
        block_ids = []
        for digest in hashes:
            block_id = self._lookup(digest)
            if block_id is None:
                raise RuntimeError("prefix hit vanished between lookup_prefix and allocate_slots")
            block_ids.append(block_id)
        return block_ids

    def _shared_tail(self, table: list[int], num_computed: int) -> bool:
        if num_computed % self.block_size == 0 or not table:
            return False
        return self.allocator.blocks[table[num_computed // self.block_size]].ref_count > 1

    def _copy_on_write(self, table: list[int], index: int) -> CopyKV:
        old = table[index]
        new = self.allocator.allocate()
        self.allocator.release(old)
        table[index] = new
        return CopyKV(old * self.block_size, new * self.block_size, self.block_size)

    def _mark_pending(self, request: Request, table: list[int], num_tokens: int) -> None:
        """Blocks this step fills become findable by requests planned into the same step."""
        if not self.enable_prefix_caching:
            return
        hashes = self.block_hashes(request)
        for i in range(min(num_tokens // self.block_size, len(hashes))):
            block_id, digest = table[i], hashes[i]
            if self.allocator.blocks[block_id].block_hash is None and digest not in self._pending:
                self._pending[digest] = block_id
                self._pending_digest[block_id] = digest

    def end_step(self) -> None:
        """The planned step is over (published or failed): pending blocks are findable no more."""
        self._pending.clear()
        self._pending_digest.clear()

    def publish(self, request: Request, num_computed_tokens: int) -> None:
        """Make the request's full, computed blocks findable by prefix digest."""
        if not self.enable_prefix_caching:
            return
        table = self._block_tables.get(request.req_id)
        if table is None:
            return
        hashes = self.block_hashes(request)
        for i in range(min(num_computed_tokens // self.block_size, len(hashes), len(table))):
            parent = hashes[i - 1] if i else salted_root(self._root, request.cache_salt)
            self.allocator.mark_cached(table[i], hashes[i], parent)

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
        return KVAllocation(TableUpdate(0, tuple(self._block_tables[child.req_id])), allocation.copies)

    def free(self, request: Request) -> None:
        table = self._block_tables.pop(request.req_id, None)
        self._block_hashes.pop(request.req_id, None)
        if table is None:
            return
        for block_id in table:
            digest = self._pending_digest.pop(block_id, None)
            if digest is not None:
                del self._pending[digest]
        # Tail blocks first, so the LRU evicts a prefix's end before its start.
        for block_id in reversed(table):
            self.allocator.release(block_id)

    def block_table(self, request: Request) -> list[int]:
        return list(self._block_tables.get(request.req_id, ()))
