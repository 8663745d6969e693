"""Which slot each request holds and how many pages sit under each slot.

The page table is the exact map of committed memory: `mapped[row]` pages (per
plane) are committed at the start of every row, nothing else is. All policy
lives here, so the host and CUDA regions share it:

- best fit: a new request takes the idle row whose already-mapped pages cover
  its need most tightly, else the idle row with the most pages mapped;
- deferred reclamation: a finished request's pages stay mapped for the row's
  next tenant; they are unmapped, tail first, only when a commit would exceed
  the budget;
- look-ahead: pages for the next few steps may be committed early (by the
  background mapper) but only from free budget, never by reclaiming;
- out of device memory: a commit the budget allows can still find the device
  full (torch's cache or another process holds it). That is a shortage like
  any other: after one retry, the allocation is refused and the scheduler
  preempts, exactly as when the budget is short;
- draining: a row whose tenant was swapped out to the host tier keeps its
  pages until the step that copies them out has run (`end_drain`). Its
  pages no longer count against the budget, so the preemption makes room
  in the same step, but nothing may unmap or reuse them before the copy:
  for that one step, committed memory may exceed the budget by the swapped
  rows' pages, and `end_drain` brings it back under.

Commit and release are all-or-nothing (see region.py) and the table records
a change only after the call returns, so a failure of either leaves table
and memory in step.

A lock guards the table because the background mapper commits pages while
the engine thread allocates and frees; callers hold `lock` around each
compound operation.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kvos.memory.virtual.region import DeviceOutOfMemory

logger = logging.getLogger(__name__)

CommitFn = Callable[[int, int, int], None]
"""(row, first row page, number of row pages) -> None; commits or releases them in every plane."""


class SlotPageTable:
    """Rows, their tenants and their mapped pages, under one physical page budget."""

    def __init__(
        self,
        num_rows: int,
        row_pages: int,
        num_planes: int,
        budget_pages: int,
        commit: CommitFn,
        release: CommitFn,
        make_room: Callable[[], None] | None = None,
    ) -> None:
        if budget_pages < num_planes:
            raise ValueError(
                f"the KV memory budget holds {budget_pages} pages, fewer than the {num_planes} "
                "a single token needs; raise kv_cache_memory_bytes"
            )
        self.num_rows = num_rows
        self.row_pages = row_pages
        self.num_planes = num_planes
        self.budget_pages = budget_pages
        self._commit = commit
        self._release = release
        self._make_room = make_room
        """Asked, before the retry, to free device memory held outside the table (torch's cache)."""
        self.lock = threading.RLock()
        self.tenant: list[str | None] = [None] * num_rows
        self.mapped: list[int] = [0] * num_rows
        self.needed: list[int] = [0] * num_rows
        """Pages the tenant's allocated tokens occupy; mapped beyond it is look-ahead."""
        self.draining: set[int] = set()
        """Rows vacated by a swap-out this step: no tenant, pages pinned until `end_drain`."""
        self._num_mapped = 0
        self.num_reclaimed_pages = 0
        self.num_out_of_memory = 0
        """Allocations refused because the device, not the budget, ran out of memory."""

    # -- accounting (physical pages, all planes) --------------------------------------------

    @property
    def num_committed_pages(self) -> int:
        return self._num_mapped * self.num_planes

    @property
    def num_live_pages(self) -> int:
        """Pages under rows that have a tenant (including their look-ahead)."""
        return sum(m for m, t in zip(self.mapped, self.tenant, strict=True) if t is not None) * self.num_planes

    @property
    def num_deferred_pages(self) -> int:
        """Pages kept mapped under idle rows for their next tenant."""
        return self.num_committed_pages - self.num_live_pages

    @property
    def num_draining_pages(self) -> int:
        """Pages under rows whose swap-out copy has not run yet (outside the budget until then)."""
        return sum(self.mapped[row] for row in self.draining) * self.num_planes

    @property
    def max_row_pages(self) -> int:
        """Most pages (per plane) one row can ever be given within the budget."""
        return min(self.row_pages, self.budget_pages // self.num_planes)

    # -- policy -------------------------------------------------------------------------------

    def pick_row(self, num_pages: int) -> int | None:
        """Best-fit idle row for a request that needs `num_pages` pages now; None if all are taken."""
        idle = [row for row in range(self.num_rows) if self.tenant[row] is None and row not in self.draining]
        if not idle:
            return None
        covering = [row for row in idle if self.mapped[row] >= num_pages]
        if covering:
            return min(covering, key=lambda row: (self.mapped[row], row))
        return max(idle, key=lambda row: (self.mapped[row], -row))

    def assign(self, row: int, req_id: str, num_pages: int) -> bool:
        """Give idle `row` to `req_id` with `num_pages` mapped; False (nothing changed) if short."""
        if self.tenant[row] is not None:
            raise RuntimeError(f"row {row} already held by {self.tenant[row]}")
        if not self.ensure(row, num_pages):
            return False
        self.tenant[row] = req_id
        self.needed[row] = num_pages
        return True

    def grow(self, row: int, num_pages: int) -> bool:
        """Make the tenant's first `num_pages` pages mapped; False (nothing changed) if short."""
        if self.tenant[row] is None:
            raise RuntimeError(f"row {row} has no tenant")
        if not self.ensure(row, num_pages):
            return False
        self.needed[row] = max(self.needed[row], num_pages)
        return True

    def vacate(self, row: int) -> None:
        """The tenant is done; its pages stay mapped (deferred reclamation)."""
        self.tenant[row] = None
        self.needed[row] = 0

    def drain(self, row: int) -> None:
        """The tenant was swapped out: its pages leave the budget but stay mapped, and the row stays
        out of use, until `end_drain` (the step's copy to the host tier reads them first)."""
        if self.tenant[row] is None:
            raise RuntimeError(f"row {row} has no tenant")
        self.vacate(row)
        self.draining.add(row)

    def end_drain(self) -> int:
        """The step that copied the draining rows out has ended: they become idle rows (pages kept for
        the next tenant) and, if committed memory is over the budget, idle pages are unmapped until it
        is not. Returns how many (physical) pages were unmapped."""
        if not self.draining:
            return 0
        self.draining.clear()
        overflow = self.num_committed_pages - self.budget_pages
        if overflow <= 0:
            return 0
        reclaimed = self._take(self._reclaimable(keep=-1), -(-overflow // self.num_planes))
        return reclaimed * self.num_planes

    def look_ahead(self, row: int, req_id: str, num_pages: int) -> int:
        """Map pages early from free budget only; returns how many were mapped.

        Skips rows whose tenant changed since the request was queued.
        """
        if self.tenant[row] != req_id:
            return 0
        target = min(num_pages, self.row_pages)
        free = (self.budget_pages - self.num_committed_pages) // self.num_planes
        extra = min(target - self.mapped[row], free)
        if extra <= 0:
            return 0
        try:
            self._map(row, extra)
        except DeviceOutOfMemory:
            return 0  # look-ahead is a bet; the step maps what it needs itself
        return extra

    def ensure(self, row: int, num_pages: int) -> bool:
        """Map `row` up to `num_pages` pages, reclaiming idle pages if the budget demands it."""
        if not 0 <= num_pages <= self.row_pages:
            raise IndexError(f"{num_pages} pages outside a row of {self.row_pages}")
        extra = num_pages - self.mapped[row]
        if extra <= 0:
            return True
        shortage = self.num_committed_pages - self.num_draining_pages + extra * self.num_planes - self.budget_pages
        if shortage > 0 and not self._reclaim(-(-shortage // self.num_planes), keep=row):
            return False
        return self._map_or_refuse(row, extra)

    def reclaim_all_idle(self) -> int:
        """Unmap every page of idle rows (not draining ones); returns how many (physical) pages were freed."""
        freed = 0
        for row in range(self.num_rows):
            if self.tenant[row] is None and row not in self.draining and self.mapped[row]:
                freed += self.mapped[row] * self.num_planes
                self._unmap(row, self.mapped[row])
        return freed

    def _map_or_refuse(self, row: int, count: int) -> bool:
        """Map `count` more pages of `row`; a device out of memory is a refusal after one retry.

        The budget allowed these pages, so the memory is held outside the
        table. Before the retry, deferred and look-ahead pages are reclaimed:
        their handles stay with the region, which maps them again without
        asking the device; if they cannot cover the need, the rest of the
        process is asked to make room too.
        """
        try:
            self._map(row, count)
            return True
        except DeviceOutOfMemory:
            pass
        if self._reclaim_up_to(count, keep=row) < count and self._make_room is not None:
            self._make_room()
        try:
            self._map(row, count)
            return True
        except DeviceOutOfMemory as exc:
            self.num_out_of_memory += 1
            logger.info("KV page commit refused, the device is out of memory: %s", exc)
            return False

    def _reclaimable(self, keep: int) -> list[tuple[int, int]]:
        """(pages, row) that may be unmapped, in order: idle rows, most pages first; then look-ahead tails."""
        idle = [
            (self.mapped[r], r)
            for r in range(self.num_rows)
            if r != keep and self.tenant[r] is None and r not in self.draining
        ]
        spare = [
            (self.mapped[r] - self.needed[r], r)
            for r in range(self.num_rows)
            if r != keep and self.tenant[r] is not None and self.mapped[r] > self.needed[r]
        ]
        return sorted(idle, reverse=True) + sorted(spare, reverse=True)

    def _reclaim(self, num_row_pages: int, keep: int) -> bool:
        """Unmap `num_row_pages` (per plane) of deferred or look-ahead pages, or nothing at all."""
        candidates = self._reclaimable(keep)
        if sum(n for n, _ in candidates) < num_row_pages:
            return False
        self._take(candidates, num_row_pages)
        return True

    def _reclaim_up_to(self, num_row_pages: int, keep: int) -> int:
        """Unmap as many as `num_row_pages` (per plane) of deferred or look-ahead pages; how many were."""
        return self._take(self._reclaimable(keep), num_row_pages)

    def _take(self, candidates: list[tuple[int, int]], num_row_pages: int) -> int:
        remaining = num_row_pages
        for available, row in candidates:
            if remaining <= 0:
                break
            take = min(available, remaining)
            if take > 0:
                self._unmap(row, take)
                remaining -= take
        return num_row_pages - remaining

    def _map(self, row: int, count: int) -> None:
        self._commit(row, self.mapped[row], count)
        self.mapped[row] += count
        self._num_mapped += count

    def _unmap(self, row: int, count: int) -> None:
        """Release the last `count` mapped pages of `row`."""
        self._release(row, self.mapped[row] - count, count)
        self.mapped[row] -= count
        self._num_mapped -= count
        self.num_reclaimed_pages += count * self.num_planes
