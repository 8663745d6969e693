"""PagedAttention-style KV cache: per-request block tables over a shared pool.

    request A  block table [7, 2, 9]        pool of blocks (each block_size tokens)
    request B  block table [7, 2, 4]        +---+---+---+---+---+---+---+---+---+---+
                                            | 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 | 9 |
    A and B share blocks 7 and 2 (a common   +---+---+---+---+---+---+---+---+---+---+
    prompt prefix, ref_count 2 each).

A token at position p of a request lives in slot
`block_table[p // block_size] * block_size + p % block_size` of the flat
per-layer K/V tensors `[num_blocks * block_size, num_kv_heads, head_dim]`.
"""

from __future__ import annotations

import torch

from kvos.engine.request import Request
from kvos.memory.block_allocator import BlockAllocator, BlockHash


class PagedKVCacheManager:
    """Allocates blocks to requests; shares full blocks by prefix hash; copies on write."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        max_model_len: int,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.capacity_tokens = num_blocks * block_size
        self.max_tokens_per_request = min(max_model_len, self.capacity_tokens)
        self.enable_prefix_caching = enable_prefix_caching
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        self._device = torch.device(device)
        self._block_tables: dict[str, list[int]] = {}
        # Hashes of the request's full blocks, in order: hash i covers tokens [0, (i+1)*block_size).
        self._block_hashes: dict[str, list[BlockHash]] = {}
        self._offsets = torch.arange(block_size, device=self._device)
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

    def check_fits(self, num_tokens: int) -> None:
        """Refuse a request that could never fit, even alone in an empty cache."""
        if num_tokens > self.max_tokens_per_request:
            raise ValueError(
                f"request needs {num_tokens} tokens of KV cache (prompt + max_tokens) but at most "
                f"{self.max_tokens_per_request} fit (KV capacity {self.capacity_tokens} tokens)"
            )

    # -- prefix cache ---------------------------------------------------------------

    def _full_block_hashes(self, request: Request) -> list[BlockHash]:
        """Chained hashes of the request's full blocks, extended incrementally."""
        hashes = self._block_hashes.setdefault(request.req_id, [])
        token_ids = request.all_token_ids
        bs = self.block_size
        for i in range(len(hashes), len(token_ids) // bs):
            parent = hashes[i - 1] if i else None
            hashes.append(hash((parent, tuple(token_ids[i * bs : (i + 1) * bs]))))
        return hashes

    def lookup_prefix(self, request: Request) -> int:
        if not self.enable_prefix_caching:
            return 0
        num_hit_blocks = 0
        # Leave at least one token to compute so the step yields logits.
        max_blocks = (request.num_tokens - 1) // self.block_size
        for block_hash in self._full_block_hashes(request)[:max_blocks]:
            if self.allocator.lookup(block_hash) is None:
                break
            num_hit_blocks += 1
        return num_hit_blocks * self.block_size

    # -- allocation -----------------------------------------------------------------

    def allocate_slots(self, request: Request, num_new_tokens: int, num_cached_tokens: int = 0) -> bool:
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
            return False
        if is_new:
            self._block_tables[request.req_id] = table
            self._num_queried_tokens += request.num_tokens
            self._num_hit_tokens += num_cached_tokens
        for block_id in cached_ids:
            self.allocator.take_cached(block_id)
        table.extend(cached_ids)
        if needs_copy:
            self._copy_on_write(table, num_computed // self.block_size)
        for _ in range(num_needed):
            table.append(self.allocator.allocate())
        self._publish_full_blocks(request, table, total)
        return True

    def _cached_block_ids(self, request: Request, num_cached_tokens: int) -> list[int]:
        assert num_cached_tokens % self.block_size == 0
        hashes = self._full_block_hashes(request)[: num_cached_tokens // self.block_size]
        block_ids = []
        for block_hash in hashes:
            block_id = self.allocator.lookup(block_hash)
            assert block_id is not None, "prefix hit vanished between lookup and allocate"
            block_ids.append(block_id)
        return block_ids

    def _shared_tail(self, table: list[int], num_computed: int) -> bool:
        if num_computed % self.block_size == 0 or not table:
            return False
        return self.allocator.blocks[table[num_computed // self.block_size]].ref_count > 1

    def _copy_on_write(self, table: list[int], index: int) -> None:
        old = table[index]
        new = self.allocator.allocate()
        src = slice(old * self.block_size, (old + 1) * self.block_size)
        dst = slice(new * self.block_size, (new + 1) * self.block_size)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]
        self.allocator.release(old)
        table[index] = new

    def _publish_full_blocks(self, request: Request, table: list[int], num_tokens: int) -> None:
        """Make blocks that will be full after this step findable by prefix hash.

        Publishing before the step runs is safe: within one forward pass every
        layer writes its KV before it reads any.
        """
        if not self.enable_prefix_caching:
            return
        hashes = self._full_block_hashes(request)
        for i in range(min(num_tokens // self.block_size, len(hashes))):
            self.allocator.mark_cached(table[i], hashes[i])

    def fork(self, parent: Request, child: Request) -> bool:
        table = self._block_tables[parent.req_id]
        for block_id in table:
            self.allocator.share(block_id)
        self._block_tables[child.req_id] = list(table)
        return True

    def free(self, request: Request) -> None:
        table = self._block_tables.pop(request.req_id, None)
        self._block_hashes.pop(request.req_id, None)
        if table is None:
            return
        # Tail blocks first, so the LRU evicts a prefix's end before its start.
        for block_id in reversed(table):
            self.allocator.release(block_id)

    def kv_indices(self, request: Request, num_tokens: int) -> torch.Tensor:
        table = self._block_tables[request.req_id]
        num_blocks = -(-num_tokens // self.block_size)
        blocks = torch.tensor(table[:num_blocks], dtype=torch.long, device=self._device)
        slots = (blocks[:, None] * self.block_size + self._offsets).flatten()
        return slots[:num_tokens]

    def block_table(self, request: Request) -> list[int]:
        return list(self._block_tables.get(request.req_id, ()))
