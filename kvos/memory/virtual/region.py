"""The one thing a virtual KV cache asks of memory: a fixed range with pages on demand.

A region is a range of virtual addresses reserved once and never moved, so
tensors viewed over it stay valid for as long as they exist. Physical pages
are committed under parts of it and released again; everything above the
backend (which rows hold which pages, the budget, reclamation) is the page
table's business, identical on CPU and GPU.

    region:  |page 0|page 1|page 2|page 3| ... |page N-1|
              commit([(1, 2)]) -> pages 1 and 2 backed by memory, the rest untouched

Commit and release take a list of runs (first page, number of pages), one per
plane of the layout, and are all-or-nothing: when one fails, what the call did
is undone and the region is exactly as before, so the page table, which
records a change only after the call returns, never disagrees with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

PageRun = tuple[int, int]
"""(first page, number of pages) of a region."""


class RegionError(RuntimeError):
    """A region operation failed. Commit and release leave the region as it was before the call."""


class DeviceOutOfMemory(RegionError):
    """The device has no memory for another page.

    A shortage, not a fault: the page table answers it by refusing the
    allocation (the scheduler then preempts), never by failing the step.
    """


class RegionBroken(RegionError):
    """Undoing a failed operation failed too, so the page table may no longer describe the region.

    Every page and handle is still accounted for (close() frees them), but the
    region refuses further commits and releases.
    """


class VirtualRegion(Protocol):
    """A reserved address range whose pages are backed only while committed.

    Reading or writing an uncommitted page is a bug: on the host it silently
    commits memory behind the page table's back, on a GPU it faults (there is
    no shared zero page).
    """

    page_size: int
    """Bytes per page: the unit of commit and release."""

    num_pages: int
    """Pages in the whole reserved range."""

    device: torch.device

    @property
    def num_physical_pages(self) -> int:
        """Pages of memory this region holds: committed ones plus any kept for reuse."""
        ...

    def as_bytes(self) -> torch.Tensor:
        """A uint8 tensor over the whole range (`[num_pages * page_size]`), touching nothing.

        The tensor (and every view of it) keeps the range reserved: it stays
        valid memory for as long as it exists, even after close().
        """
        ...

    def commit(self, runs: Sequence[PageRun]) -> None:
        """Back every page of `runs` with memory (zero-filled or not), or none and raise.

        Raises DeviceOutOfMemory when the device is short, RegionError for
        anything else; either way nothing changed.
        """
        ...

    def release(self, runs: Sequence[PageRun]) -> None:
        """Give the memory under every page of `runs` back (their contents are lost), or none and raise."""
        ...

    def trim(self) -> int:
        """Return pages kept for reuse to the device; how many."""
        ...

    def make_room(self) -> None:
        """Ask this process's other users of the device to give back memory they cache but do not use."""
        ...

    def close(self) -> None:
        """Release every page and the address range, once no view of it can be used. Safe to call twice."""
        ...


def check_runs(runs: Sequence[PageRun], num_pages: int) -> list[int]:
    """The pages of `runs`, each checked to lie inside a region of `num_pages` and to appear once.

    Raised, not asserted: under `python -O` a bad index would map or unmap
    memory that is not ours.
    """
    pages: list[int] = []
    for first, count in runs:
        if not (0 <= first and count >= 0 and first + count <= num_pages):
            raise IndexError(f"pages [{first}, {first + count}) outside region of {num_pages}")
        pages.extend(range(first, first + count))
    if len(set(pages)) != len(pages):
        raise ValueError(f"runs {list(runs)} overlap")
    return pages


def region_page_size(device: torch.device) -> int:
    """The page size a region on `device` will have, needed to lay out buffers before reserving."""
    if device.type == "cuda":
        from kvos.memory.virtual.cuda_backend import cuda_page_size

        return cuda_page_size(device)
    if device.type == "cpu":
        from kvos.memory.virtual.host_backend import host_page_size

        return host_page_size()
    raise ValueError(f"the virtual KV cache supports cpu and cuda devices, got {device}")


def open_region(num_bytes: int, device: torch.device) -> VirtualRegion:
    """Reserve `num_bytes` of address space: host memory for CPU caches, the CUDA driver for GPU ones."""
    if device.type == "cuda":
        from kvos.memory.virtual.cuda_backend import CudaRegion

        return CudaRegion(num_bytes, device)
    if device.type == "cpu":
        from kvos.memory.virtual.host_backend import HostRegion

        return HostRegion(num_bytes)
    raise ValueError(f"the virtual KV cache supports cpu and cuda devices, got {device}")
