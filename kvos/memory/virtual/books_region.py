"""A region that keeps only the books: which pages are committed, and no memory under any of them.

The simulator (`kvos.sim`) runs the real `VirtualKVCacheManager` on this, so
its page table, budget, best-fit rows and deferred reclamation decide as the
engine's do, for a cache of any size and page size (a GPU's 2 MiB pages on
a machine without one), while nothing is reserved or mapped. Its device is `meta`:
`as_bytes` is a tensor without storage, so a worker that tried to read or
write the cache would fail loudly rather than touch memory that is not there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvos.memory.virtual.region import PageRun, RegionError, check_runs


class BooksRegion:
    """A `VirtualRegion` of `num_bytes` in pages of `page_size` bytes, each committed or not, none backed."""

    def __init__(self, num_bytes: int, page_size: int) -> None:
        if num_bytes <= 0:
            raise ValueError(f"num_bytes must be > 0, got {num_bytes}")
        if page_size <= 0:
            raise ValueError(f"page_size must be > 0, got {page_size}")
        self.page_size = page_size
        self.num_pages = -(-num_bytes // page_size)
        self.device = torch.device("meta")
        self._committed: set[int] = set()
        self._closed = False

    @property
    def num_physical_pages(self) -> int:
        """Pages committed now; nothing is kept for reuse, as on the host."""
        return len(self._committed)

    def as_bytes(self) -> torch.Tensor:
        return torch.empty(self.num_pages * self.page_size, dtype=torch.uint8, device=self.device)

    def commit(self, runs: Sequence[PageRun]) -> None:
        """Mark every page of `runs` committed; a page committed twice is the page table's bug, raised."""
        pages = self._check(runs)
        twice = self._committed.intersection(pages)
        if twice:
            raise RegionError(f"pages {sorted(twice)[:8]} are already committed")
        self._committed.update(pages)

    def release(self, runs: Sequence[PageRun]) -> None:
        pages = self._check(runs)
        missing = set(pages) - self._committed
        if missing:
            raise RegionError(f"pages {sorted(missing)[:8]} are not committed")
        self._committed.difference_update(pages)

    def trim(self) -> int:
        return 0

    def make_room(self) -> None:
        """Nobody else uses a region without memory."""

    def close(self) -> None:
        self._committed.clear()
        self._closed = True

    def _check(self, runs: Sequence[PageRun]) -> list[int]:
        if self._closed:
            raise RegionError("region is closed")
        return check_runs(runs, self.num_pages)
