r"""vAttention-style KV cache: each request's KV is contiguous in virtual memory.

    one region, reserved once (megacache layout, every layer inside a token):
    row 0 |tok 0|tok 1|tok 2| ...                              | <- request A
    row 1 |tok 0|tok 1| ...                                    | <- idle: pages kept for the next tenant
    row 2 |tok 0|tok 1|tok 2|tok 3| ...                        | <- request B
           \___ committed pages ___/\___ reserved, no memory ___/

A request takes a row when admitted; as it grows, the pages under its next
tokens are committed, a page at a time. Attention sees plain tensors: token p
of the request in row r is flat slot `r * row_tokens + p`, so a request's KV
is one strided run that stock kernels read as a view, without a block table.

What this backend does not do is share KV between requests: `lookup_prefix`
always answers 0, and `fork` gives the child its own row and asks for a copy
of the parent's KV (a `CopyKV` in the plan; see docs/virtual_kv_cache.md).

Who owns what: this manager keeps the books (rows, the page table, the
budget) and, like an OS kernel, maps and unmaps the region's pages. The
worker views the same region as per-layer K/V tensors
(`kvos.worker.kv_cache.VirtualKVBuffer`) and does every read, write and copy.
The memory itself belongs to those views as much as to the manager: the
region gives its pages and address range back only once it is closed (or
dropped) and no view of it is left, so a tensor can never outlive it.
In a table, a request's one block is its row: `table_block_size` is a row's
length in tokens.

Host tier (optional, `kvos.memory.tiers.host`): a preempted request's row can
be swapped out instead of dropped. Its computed tokens are one run, cut into
host blocks of `host_block_size` tokens (rows start on a block boundary, so
primary "block" b is flat slots `[b * host_block_size, ...)`), copied to host
blocks the request holds by a few coalesced `SaveToHost` ops; the row goes
back as a free does, once the step has copied it out (`SlotPageTable.drain`).
On resume, `allocate_slots` with the swapped tokens as cached takes a row and
plans `LoadFromHost` ops into it. As in the paged cache the host copy is kept
while the request runs again, so the next swap-out writes only the blocks
added since. With a host tier, rows grow in whole host blocks, so a copy of a
request's last, partial block never touches an uncommitted page. There is no
prefix cache here, hence no write-back of evicted cache and no disk tier.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import torch

from kvos.core.plan import CopyKV, LoadFromHost, SaveToHost, TableUpdate, coalesce_loads, coalesce_saves
from kvos.core.request import Request
from kvos.memory.block_allocator import KVEvent
from kvos.memory.kv_manager import NO_CHANGE, KVAllocation, TierOps
from kvos.memory.shape import KVShape
from kvos.memory.tiers.host import (
    HostBlockPool,
    HostCopy,
    TierCounters,
    forget_unwritten,
    release_copy,
    resumed_copy,
)
from kvos.memory.virtual.books_region import BooksRegion
from kvos.memory.virtual.layout import KVLayout, LayoutKind
from kvos.memory.virtual.page_mapper import InlineMapper, PageMapper
from kvos.memory.virtual.page_table import SlotPageTable
from kvos.memory.virtual.region import DeviceOutOfMemory, VirtualRegion, open_region, region_page_size

logger = logging.getLogger(__name__)

DEFAULT_LOOKAHEAD_TOKENS = 8
"""Tokens past the current step that the background mapper keeps mapped for each request."""


class VirtualKVCacheManager:
    """Rows of contiguous virtual KV; physical pages committed on demand within a budget.

    `max_num_seqs` rows of `max_model_len` tokens are reserved up front (address
    space only). The budget caps committed memory, exactly as it caps the
    paged pool: `capacity_tokens = budget_bytes // bytes_per_token`.
    """

    def __init__(
        self,
        budget_bytes: int,
        shape: KVShape,
        max_num_seqs: int,
        max_model_len: int,
        layout: LayoutKind = "megacache",
        lookahead_tokens: int = DEFAULT_LOOKAHEAD_TOKENS,
        host_bytes: int | None = None,
        host_block_size: int = 16,
        books_page_size: int | None = None,
    ) -> None:
        """`host_bytes` adds a host tier of that size (None: none), in blocks of `host_block_size`
        tokens, or of their gcd with the row length where that does not divide it.

        `books_page_size` keeps the books only, for a cache of pages of that
        many bytes: a `BooksRegion` (no memory, no address range) and
        look-ahead mapped inline. The simulator runs the manager this way.
        None: a real region on the shape's device.
        """
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be > 0, got {budget_bytes}")
        if lookahead_tokens < 0:
            raise ValueError(f"lookahead_tokens must be >= 0, got {lookahead_tokens}")
        self.device = torch.device(shape.device)
        self.layout = KVLayout(
            kind=layout,
            num_layers=shape.num_layers,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            dtype=shape.dtype,
            num_rows=max_num_seqs,
            max_context=max_model_len,
            page_size=books_page_size or region_page_size(self.device),
        )
        if budget_bytes // self.layout.page_size < self.layout.num_planes:
            raise ValueError(
                f"the KV memory budget holds {budget_bytes // self.layout.page_size} pages, fewer than the "
                f"{self.layout.num_planes} a single token needs; raise kv_cache_memory_bytes"
            )
        self.region: VirtualRegion = (
            BooksRegion(self.layout.num_bytes, books_page_size)
            if books_page_size
            else open_region(self.layout.num_bytes, self.device)
        )
        if self.region.page_size != self.layout.page_size:
            self.region.close()
            raise RuntimeError(f"region pages of {self.region.page_size} bytes, layout expects {self.layout.page_size}")
        # Plain functions over the region, not bound methods: the table must not
        # hold the manager, so a dropped manager is freed at once, not by the GC.
        self.table = SlotPageTable(
            num_rows=max_num_seqs,
            row_pages=self.layout.row_pages,
            num_planes=self.layout.num_planes,
            budget_pages=budget_bytes // self.layout.page_size,
            commit=partial(_commit_rows, self.region, self.layout),
            release=partial(_release_rows, self.region, self.layout),
            make_room=self.region.make_room,
        )
        self.table_block_size = self.layout.row_tokens
        self.block_size = max(1, self.layout.page_size // self.layout.plane_token_bytes)
        self.capacity_tokens = budget_bytes // self.layout.bytes_per_token
        self.host: HostBlockPool | None = None
        """The host tier's books, or None when there is no host tier."""
        self.host_block_size = math.gcd(self.layout.row_tokens, host_block_size)
        """Tokens per host block: a divisor of the row length, so every row starts on a block boundary."""
        if host_bytes is not None:
            block_bytes = self.host_block_size * self.layout.bytes_per_token
            if host_bytes < block_bytes:
                self.region.close()
                raise ValueError(f"kv_offload_bytes of {host_bytes} is below one host block ({block_bytes} bytes)")
            self.host = HostBlockPool(host_bytes // block_bytes)
        self._host_copies: dict[str, HostCopy] = {}
        self.counters = TierCounters()
        max_tokens = self.layout.tokens_in(self.table.max_row_pages)
        if self.host is not None:  # rows grow in whole host blocks (see `_pages_for`)
            max_tokens -= max_tokens % self.host_block_size
        self.max_tokens_per_request = min(max_model_len, max_tokens)
        self.lookahead_tokens = lookahead_tokens
        self._mapper: PageMapper | InlineMapper | None = None
        if lookahead_tokens:
            self._mapper = InlineMapper(self.table) if books_page_size else PageMapper(self.table)
        self._rows: dict[str, int] = {}
        self._num_tokens: dict[str, int] = {}
        self._num_queried_tokens = 0
        # A simulated fleet builds a thousand of these books: only a real cache is worth a line at INFO.
        logger.log(
            logging.DEBUG if books_page_size else logging.INFO,
            "virtual KV cache (%s): %d rows x %d tokens reserved (%.1f GiB of address space), "
            "%d-byte pages, budget %d pages",
            layout,
            max_num_seqs,
            self.layout.row_tokens,
            self.layout.num_bytes / 2**30,
            self.layout.page_size,
            self.table.budget_pages,
        )

    # -- accounting -----------------------------------------------------------------

    @property
    def num_used_blocks(self) -> int:
        """Pages committed under rows with a live request (look-ahead included)."""
        with self.table.lock:
            return self.table.num_live_pages

    @property
    def num_free_blocks(self) -> int:
        """Pages a request could still get: uncommitted budget plus deferred (reclaimable) pages."""
        with self.table.lock:
            return self.table.budget_pages - self.table.num_live_pages

    @property
    def num_committed_pages(self) -> int:
        with self.table.lock:
            return self.table.num_committed_pages

    @property
    def num_deferred_pages(self) -> int:
        """Pages kept mapped under idle rows for their next tenant."""
        with self.table.lock:
            return self.table.num_deferred_pages

    @property
    def committed_bytes(self) -> int:
        """Device memory this cache holds: mapped pages plus, on CUDA, unmapped handles kept for reuse.

        The same as `physical_bytes`; the mapped pages alone are `num_committed_pages`.
        """
        return self.physical_bytes

    @property
    def physical_bytes(self) -> int:
        """Bytes of pages held, mapped or spare: what the device really gives this cache."""
        return self.region.num_physical_pages * self.layout.page_size

    @property
    def num_out_of_memory(self) -> int:
        """Allocations refused because the device (not the budget) was out of memory."""
        return self.table.num_out_of_memory

    @property
    def num_mapper_failures(self) -> int:
        """Look-ahead jobs that raised (each logged); the mapper keeps serving."""
        return 0 if self._mapper is None else self._mapper.num_failed_jobs

    @property
    def last_mapper_error(self) -> BaseException | None:
        return None if self._mapper is None else self._mapper.last_error

    @property
    def used_bytes(self) -> int:
        """Bytes of KV that live requests' allocated tokens really occupy."""
        return sum(self._num_tokens.values()) * self.layout.bytes_per_token

    @property
    def num_host_copies(self) -> int:
        """Requests holding KV in the host tier (swapped out, or kept after a swap-in)."""
        return len(self._host_copies)

    def prefix_cache_stats(self) -> tuple[int, int]:
        return self._num_queried_tokens, 0

    def drain_events(self) -> list[KVEvent]:
        """Nothing is ever cached for sharing, so nothing is stored or removed."""
        return []

    def check_fits(self, num_tokens: int) -> None:
        """Refuse a request that could never fit, even alone in an empty cache."""
        if num_tokens > self.max_tokens_per_request:
            raise ValueError(
                f"request needs {num_tokens} tokens of KV cache (prompt + max_tokens) but at most "
                f"{self.max_tokens_per_request} fit in one slot (max_model_len {self.layout.max_context}, "
                f"KV capacity {self.capacity_tokens} tokens)"
            )

    # -- the KVCacheManager protocol ----------------------------------------------------

    def lookup_prefix(self, request: Request) -> int:
        """No prefix sharing: rows are private, so nothing is ever already cached."""
        return 0

    def allocate_slots(self, request: Request, num_new_tokens: int, num_cached_tokens: int = 0) -> KVAllocation | None:
        req_id = request.req_id
        if req_id not in self._rows and req_id in self._host_copies:
            return self._swap_in(request, num_new_tokens, num_cached_tokens)
        if num_cached_tokens:
            raise ValueError("the virtual KV cache never reports prefix hits")
        with self.table.lock:
            row = self._rows.get(req_id)
            total = (0 if row is None else request.num_computed_tokens) + num_new_tokens
            if total > self.max_tokens_per_request:
                return None
            num_pages = self._pages_for(total)
            is_new = row is None
            if row is None:
                row = self.table.pick_row(num_pages)
                if row is None or not self.table.assign(row, req_id, num_pages):
                    return None
                self._rows[req_id] = row
                self._num_queried_tokens += request.num_tokens
            elif not self.table.grow(row, num_pages):
                return None
            self._num_tokens[req_id] = total
        self._look_ahead(request, row, total)
        return KVAllocation(TableUpdate(0, (row,))) if is_new else NO_CHANGE

    def fork(self, parent: Request, child: Request, num_tokens: int, num_new_tokens: int) -> KVAllocation | None:
        """Give `child` its own row and ask for a copy of `parent`'s first `num_tokens` tokens of KV.

        Rows are never shared, so this costs the pages and a copy of the
        prompt; None (nothing changed) when no row or memory is free.
        """
        total = num_tokens + num_new_tokens
        with self.table.lock:
            if child.req_id in self._rows:
                raise RuntimeError(f"{child.req_id} already holds a row")
            num_pages = self._pages_for(total)
            row = self.table.pick_row(num_pages)
            if row is None or not self.table.assign(row, child.req_id, num_pages):
                return None
            self._rows[child.req_id] = row
            self._num_tokens[child.req_id] = total
            source = self._rows[parent.req_id]
        self._look_ahead(child, row, total)
        row_tokens = self.layout.row_tokens
        return KVAllocation(TableUpdate(0, (row,)), [CopyKV(source * row_tokens, row * row_tokens, num_tokens)])

    def publish(self, request: Request, num_computed_tokens: int) -> None:
        """Rows are private: nothing becomes findable."""

    def end_step(self, failed: bool = False) -> None:
        """The step has run its copies: rows swapped out in it become free rows.

        Rows are private, so nothing else is pending; a failed step leaves the
        same books (the scheduler frees the host copies its swap-outs planned).
        """
        with self.table.lock:
            if not self.table.draining:
                return
            self.table.end_drain()
            if self.region.num_physical_pages > self.table.budget_pages:
                self.region.trim()  # spare handles (CUDA) the step's overshoot left go back too

    def block_table(self, request: Request) -> list[int]:
        row = self._rows.get(request.req_id)
        return [] if row is None else [row]

    def free(self, request: Request) -> None:
        """Vacate the request's row (its pages stay mapped for the row's next tenant) and give back
        its host blocks."""
        with self.table.lock:
            row = self._rows.pop(request.req_id, None)
            self._num_tokens.pop(request.req_id, None)
            if row is not None:
                self.table.vacate(row)
        release_copy(self._host_copies, request.req_id, self.host)

    # -- the host tier (the SwappingKVCacheManager protocol) ------------------------------

    def swap_out(self, request: Request) -> list[SaveToHost] | None:
        """Copy the request's computed tokens to host blocks it holds, and give its row back.

        Returns the saves to run, or None, changing nothing, when there is no
        host tier or it lacks the room. Blocks the request's host copy holds in
        full since its last swap-in are not written again. The row's pages
        stay mapped, out of the budget, until this step's saves have read them
        (`end_step`).
        """
        row = self._rows.get(request.req_id)
        if self.host is None or row is None:
            return None
        host = self.host
        bs = self.host_block_size
        num_tokens = request.num_computed_tokens
        copy = self._host_copies.get(request.req_id, HostCopy([], 0))
        num_blocks = -(-num_tokens // bs)
        if num_blocks - len(copy.host_block_ids) > host.num_free_blocks:
            return None
        first_block = row * self.layout.row_tokens // bs
        saves = []
        for i in range(num_blocks):
            if i < len(copy.host_block_ids):
                if (i + 1) * bs <= copy.num_tokens:
                    continue  # full and unchanged since the last swap-in
                host_block_id = copy.host_block_ids[i]  # the old partial tail, rewritten in place
            else:
                host_block_id = host.allocate()
                copy.host_block_ids.append(host_block_id)
            saves.append(SaveToHost(first_block + i, host_block_id))
        copy.num_tokens = num_tokens
        self._host_copies[request.req_id] = copy
        self.counters.blocks_swapped_out += len(saves)
        with self.table.lock:
            del self._rows[request.req_id]
            self._num_tokens.pop(request.req_id, None)
            self.table.drain(row)
        return coalesce_saves(saves)

    def _swap_in(self, request: Request, num_new_tokens: int, num_cached_tokens: int) -> KVAllocation | None:
        """A row for a swapped-out request, loaded from its host copy, plus room for new tokens."""
        copy = resumed_copy(self._host_copies, request.req_id, num_cached_tokens)
        total = num_cached_tokens + num_new_tokens
        if total > self.max_tokens_per_request:
            return None
        with self.table.lock:
            num_pages = self._pages_for(total)
            row = self.table.pick_row(num_pages)
            if row is None or not self.table.assign(row, request.req_id, num_pages):
                return None
            self._rows[request.req_id] = row
            self._num_tokens[request.req_id] = total
        self._look_ahead(request, row, total)
        first_block = row * self.layout.row_tokens // self.host_block_size
        num_blocks = -(-copy.num_tokens // self.host_block_size)
        loads = [LoadFromHost(h, first_block + i) for i, h in enumerate(copy.host_block_ids[:num_blocks])]
        self.counters.blocks_swapped_in += num_blocks
        return KVAllocation(TableUpdate(0, (row,)), loads=coalesce_loads(loads))

    def prefetch(self, request: Request) -> bool:
        """No disk tier, so nothing is ever read ahead: the request is admitted as usual."""
        return False

    def release_prefetches(self, keep: Request | None) -> bool:
        """Nothing is ever prefetched here."""
        return False

    def take_tier_ops(self) -> TierOps:
        """Only swaps move KV between tiers here, and they travel with the preemption and the allocation."""
        return TierOps()

    def apply_disk_report(
        self, loaded: list[bytes], load_failed: dict[bytes, str], save_failed: dict[bytes, str]
    ) -> None:
        """No disk tier: the worker has nothing to report."""

    def lose_host_blocks(self, host_block_ids: list[int]) -> list[str]:
        assert self.host is not None
        return forget_unwritten(self._host_copies, self.host, host_block_ids)

    def kv_start(self, request: Request) -> int:
        """Flat slot of the request's token 0; its token p is at `kv_start + p`."""
        return self._rows[request.req_id] * self.layout.row_tokens

    def row_of(self, request: Request) -> int:
        return self._rows[request.req_id]

    # -- memory management --------------------------------------------------------------

    def release_idle_pages(self) -> int:
        """Give every deferred page back to the device now (e.g. when the engine goes idle); returns pages unmapped.

        Unmapped pages keep their handles in the region's spare pool while
        the engine runs (the next commit reuses them); this also trims that
        pool, so afterwards `physical_bytes` is what live requests hold.
        """
        with self.table.lock:
            freed = self.table.reclaim_all_idle()
            self.region.trim()
            return freed

    def commit_all_rows(self) -> None:
        """Commit every row to its full length now, as servers before PagedAttention did.

        This is the static max-length reservation that benchmarks compare
        against: afterwards no request ever maps a page. Raises ValueError
        when the budget cannot hold every row.
        """
        with self.table.lock:
            needed = self.layout.num_rows * self.layout.row_pages * self.layout.num_planes
            if needed > self.table.budget_pages:
                raise ValueError(
                    f"a static reservation of {self.layout.num_rows} rows x {self.layout.row_tokens} tokens needs "
                    f"{needed * self.layout.page_size} bytes; kv_cache_memory_bytes allows "
                    f"{self.table.budget_pages * self.layout.page_size}"
                )
            for row in range(self.layout.num_rows):
                if not self.table.ensure(row, self.layout.row_pages):
                    raise DeviceOutOfMemory(
                        f"the device ran out of memory committing row {row} of a static reservation"
                    )

    def wait_for_mapper(self) -> None:
        """Block until the background mapper has done all it was asked (tests, benchmarks)."""
        if self._mapper is not None:
            self._mapper.drain()

    def close(self) -> None:
        """Stop the mapper thread, then close the region. Safe to call twice.

        The region's pages, handles and address range go back to the device
        as soon as no view of it is left: at once if the worker's buffer is
        closed (or dropped) too, else when it is. Commits after this raise.
        """
        if self._mapper is not None:
            self._mapper.close()
        self.region.close()

    def _pages_for(self, num_tokens: int) -> int:
        """Pages (per plane) a row commits for `num_tokens` tokens: with a host tier, up to the end of the
        last host block, since swaps copy whole blocks."""
        if self.host is not None:
            num_tokens = -(-num_tokens // self.host_block_size) * self.host_block_size
        return self.layout.pages_for(num_tokens)

    def _look_ahead(self, request: Request, row: int, num_tokens: int) -> None:
        if self._mapper is None:
            return
        target = min(num_tokens + self.lookahead_tokens, request.max_total_tokens, self.max_tokens_per_request)
        num_pages = self.layout.pages_for(target)
        if num_pages > self.table.mapped[row]:
            self._mapper.submit(row, request.req_id, num_pages)


def _commit_rows(region: VirtualRegion, layout: KVLayout, row: int, first: int, count: int) -> None:
    """Commit row pages `[first, first + count)` in every plane, all or none."""
    region.commit(layout.page_runs(row, first, count))


def _release_rows(region: VirtualRegion, layout: KVLayout, row: int, first: int, count: int) -> None:
    region.release(layout.page_runs(row, first, count))
