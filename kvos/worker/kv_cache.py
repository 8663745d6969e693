"""The KV memory itself: per-layer K and V tensors, owned by the worker.

The KV managers (`kvos.memory`) decide which slots each request holds; the
buffers here are what those slots index. Each layer's K and V are viewed as
`[num_slots, num_kv_heads, head_dim]`, so attention addresses a token by one
flat slot whatever the manager: a paged pool's `block * block_size + offset`,
or a virtual row's `row * row_tokens + position`. Copies the managers ask for
(`CopyKV`) run here, before the step's forward pass, and so do moves to and
from the host tier (`SaveToHost`, `LoadFromHost`), whose memory is a
`HostKVPool` of the same per-layer shape in host RAM.

Both buffers have `close()` (safe to call twice): it drops the buffer's
tensors, after which `copy` and `kv_caches` must not be used. For the virtual
buffer that is also what lets the region's device memory go: the region gives
its pages back only when it is closed by the manager and no view of it is
left (a view keeps the reservation alive through its storage).
"""

from __future__ import annotations

from typing import Protocol

import torch

from kvos.core.plan import CopyKV, LoadFromHost, SaveToHost
from kvos.memory.factory import host_tier
from kvos.memory.kv_manager import KVCacheManager
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.memory.shape import KVShape
from kvos.memory.virtual.layout import KVLayout
from kvos.memory.virtual.region import VirtualRegion
from kvos.worker import kv_copy

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


class KVBuffer(Protocol):
    kv_caches: KVCaches
    """Per layer (K, V), each `[num_slots, num_kv_heads, head_dim]`."""

    copies_end_with_step: bool
    """True when the books may unmap pages between steps (the virtual cache: a swapped-out row's
    pages at `end_step`, idle rows' pages under pressure), so no move between tiers may outlive the
    step that issued it; it still overlaps that step's forward pass."""

    def copy(self, ops: list[CopyKV]) -> None:
        """Run the plan's copies in order, in every layer."""
        ...

    def close(self) -> None:
        """Drop the KV tensors. Safe to call twice."""
        ...


def _copy(kv_caches: KVCaches, ops: list[CopyKV]) -> None:
    for op in ops:
        src = slice(op.src_slot, op.src_slot + op.num_slots)
        dst = slice(op.dst_slot, op.dst_slot + op.num_slots)
        for k_cache, v_cache in kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]


class PagedKVBuffer:
    """One pool of `num_slots` token slots per layer.

    Left uninitialised (`torch.empty`): on the host, large allocations are
    fresh anonymous pages that the kernel backs only when first written, so
    the KV budget is a ceiling, not memory taken at start-up. Attention reads
    only slots a request has written (padding repeats a written slot and is
    masked), so no uninitialised value is ever used.
    """

    copies_end_with_step = False

    def __init__(self, num_slots: int, shape: KVShape) -> None:
        size = (num_slots, shape.num_kv_heads, shape.head_dim)
        self.kv_caches: KVCaches = [
            (
                torch.empty(size, dtype=shape.dtype, device=shape.device),
                torch.empty(size, dtype=shape.dtype, device=shape.device),
            )
            for _ in range(shape.num_layers)
        ]

    def copy(self, ops: list[CopyKV]) -> None:
        _copy(self.kv_caches, ops)

    def close(self) -> None:
        """Drop the pool's tensors; torch's allocator gets them back once nothing else holds them."""
        self.kv_caches = []


class VirtualKVBuffer:
    """Per-layer views over a virtual region whose pages the manager maps on demand.

    Only slots under committed pages may be touched: the manager commits a
    request's pages before the plan that uses them reaches the worker. On a
    GPU an unmapped page has no zero page behind it, so a read of one is an
    illegal address that ends the process's CUDA context: never apply a
    whole-tensor operation (`.contiguous()`, `.clone()`, printing, reductions)
    to `kv_caches`; address runs of slots only (docs/virtual_kv_cache.md).

    The buffer holds the region, and each view keeps the region's reservation
    alive, so no tensor handed out here can outlive the memory under it.
    """

    copies_end_with_step = True

    def __init__(self, layout: KVLayout, region: VirtualRegion) -> None:
        self.layout = layout
        self._region: VirtualRegion | None = region
        self.kv_caches: KVCaches = layout.layer_views(region.as_bytes())

    def __repr__(self) -> str:
        # Never the tensors: printing one would read every page, mapped or not.
        state = "closed" if self._region is None else f"{len(self.kv_caches)} layers"
        return f"VirtualKVBuffer({self.layout.kind}, {self.layout.num_rows} rows x {self.layout.row_tokens}, {state})"

    def copy(self, ops: list[CopyKV]) -> None:
        """Run the copies; each source and destination must be a run of slots inside one row."""
        self._check_open()
        for op in ops:
            self._check_slots(op.src_slot, op.num_slots)
            self._check_slots(op.dst_slot, op.num_slots)
        _copy(self.kv_caches, ops)

    def contiguous_kv(self, layer: int, rows: slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-copy (K, V) views `[num_rows, length, kv_heads, head_dim]` of rows `rows`.

        Only read rows whose first `length` tokens are allocated: other pages
        may be unmapped.
        """
        self._check_open()
        if not 0 <= length <= self.layout.row_tokens:
            raise IndexError(f"length {length} outside a row of {self.layout.row_tokens} tokens")
        k_flat, v_flat = self.kv_caches[layer]
        shape = (self.layout.num_rows, self.layout.row_tokens)
        return k_flat.unflatten(0, shape)[rows, :length], v_flat.unflatten(0, shape)[rows, :length]

    def close(self) -> None:
        """Drop the views and the region; the region's memory goes once the manager has closed it too.

        Safe to call twice. Views taken from `kv_caches` before this stay
        valid memory (they keep the reservation) until they are dropped.
        """
        self.kv_caches = []
        self._region = None

    def _check_open(self) -> None:
        if self._region is None:
            raise RuntimeError("the KV buffer is closed")

    def _check_slots(self, first_slot: int, num_slots: int) -> None:
        # Raised, not asserted: a copy across a row's end would read or write
        # another row's pages, which on a GPU may be unmapped.
        row_tokens = self.layout.row_tokens
        position = first_slot % row_tokens
        if first_slot < 0 or num_slots < 0 or first_slot // row_tokens >= self.layout.num_rows:
            raise IndexError(f"slots [{first_slot}, {first_slot + num_slots}) outside the KV buffer")
        if position + num_slots > row_tokens:
            raise IndexError(f"slots [{first_slot}, {first_slot + num_slots}) cross the end of a row")


class UnwrittenHostBlock(RuntimeError):
    """A load read a host block whose save had failed (the books learn of it from the save's report)."""


class HostKVPool:
    """The host tier's memory: per layer K and V for `num_blocks` blocks of `block_size` tokens, in host RAM.

    Allocated with `torch.empty`, so the kernel backs pages only as blocks
    are first written (an 8 GiB tier costs nothing until used). Pinned when
    the primary pool is on CUDA, so copies can run at the link's speed.
    `save` and `load` run on the worker's copy thread (`kvos.worker.copy_engine`),
    inside a side CUDA stream when the pool is on a GPU.
    """

    def __init__(self, num_blocks: int, block_size: int, shape: KVShape) -> None:
        self.block_size = block_size
        size = (num_blocks * block_size, shape.num_kv_heads, shape.head_dim)
        pin = shape.device.type == "cuda"
        self.kv_caches: KVCaches = [
            (
                torch.empty(size, dtype=shape.dtype, pin_memory=pin),
                torch.empty(size, dtype=shape.dtype, pin_memory=pin),
            )
            for _ in range(shape.num_layers)
        ]
        self.unwritten: set[int] = set()
        """Blocks whose last save raised part-way: the books think they hold KV they may not. Only the copy
        thread touches it (every save and load runs there in plan order, or with it drained), so no lock."""
        if not pin:
            # Built (first use on this machine) and loaded now, not on the copy thread by the first move,
            # which a step may be waiting for.
            kv_copy.load()

    def save(self, primary: KVCaches, ops: list[SaveToHost]) -> None:
        """Primary blocks -> host blocks, one run per op, in every layer.

        If it raises, every target block counts as unwritten (`unwritten`) until
        a later save or disk read fills it: the books already point at them."""
        runs = [(op.block_id, op.host_block_id, op.num_blocks) for op in ops]
        try:
            self._move(primary, self.kv_caches, runs)
        except BaseException:
            for op in ops:
                self.unwritten.update(op.host_blocks)
            raise
        for op in ops:
            self.mark_written(op.host_blocks)

    def load(self, primary: KVCaches, ops: list[LoadFromHost]) -> None:
        """Host blocks -> primary blocks, one run per op, in every layer; raises UnwrittenHostBlock,
        copying nothing, if a source block's save failed."""
        bad = [b for op in ops if not self.readable(op) for b in op.host_blocks if b in self.unwritten]
        if bad:
            raise UnwrittenHostBlock(f"host block {min(bad)}'s save failed; it holds no usable KV")
        runs = [(op.host_block_id, op.block_id, op.num_blocks) for op in ops]
        self._move(self.kv_caches, primary, runs)

    def readable(self, op: LoadFromHost) -> bool:
        """Whether every source block of `op` holds the KV its last save wrote."""
        return not self.unwritten or self.unwritten.isdisjoint(op.host_blocks)

    def mark_written(self, host_blocks: range) -> None:
        """The blocks were filled whole (a save, a checked disk read): readable again."""
        if self.unwritten:
            self.unwritten.difference_update(host_blocks)

    def _move(self, src: KVCaches, dst: KVCaches, runs: list[tuple[int, int, int]]) -> None:
        """Copy block runs (source block, destination block, blocks) in every layer's K and V.

        On CPU, one call of kvos's `copy_blocks` kernel does it all by memcpy: as torch copies a block
        took 0.2-0.4 ms on the copy thread (two dispatches per layer per run of 6 KB blocks, plus OpenMP
        wake-ups; `benchmarks/kv_moves.py`). On CUDA each run is a slice copy queued on the copy stream.
        """
        if not runs:
            return
        if src[0][0].device.type == "cpu" and dst[0][0].device.type == "cpu":
            kv_copy.copy_blocks([t for kv in src for t in kv], [t for kv in dst for t in kv], runs, self.block_size)
            return
        bs = self.block_size
        for first, target, count in runs:
            source, destination = slice(first * bs, (first + count) * bs), slice(target * bs, (target + count) * bs)
            for (k, v), (dst_k, dst_v) in zip(src, dst):
                dst_k[destination].copy_(k[source])
                dst_v[destination].copy_(v[source])


def make_host_pool(manager: KVCacheManager, shape: KVShape) -> HostKVPool | None:
    """The memory behind `manager`'s host tier, if it has one.

    Its blocks are the manager's host blocks: the paged cache's blocks, or
    runs of `host_block_size` slots of the virtual cache's rows (the per-layer
    views index slots on their first dimension in both layouts, so a block's
    slots are one slice there as here).
    """
    host = host_tier(manager)
    if host is None:
        return None
    books, block_tokens = host
    return HostKVPool(books.num_blocks, block_tokens, shape)


def make_kv_buffer(manager: KVCacheManager, shape: KVShape) -> KVBuffer:
    """The buffer whose slots `manager`'s tables address."""
    from kvos.memory.virtual import VirtualKVCacheManager

    if isinstance(manager, VirtualKVCacheManager):
        return VirtualKVBuffer(manager.layout, manager.region)
    if isinstance(manager, PagedKVCacheManager):
        return PagedKVBuffer(manager.allocator.num_blocks * manager.block_size, shape)
    raise TypeError(f"no KV buffer for {type(manager).__name__}")
