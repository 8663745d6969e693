"""The one thing a virtual KV cache asks of memory: a fixed range with pages on demand.

A region is a range of virtual addresses reserved once and never moved, so
tensors viewed over it stay valid for the life of the engine. Physical pages
are committed under parts of it and released again; everything above the
backend (which rows hold which pages, the budget, reclamation) is the page
table's business, identical on CPU and GPU.

    region:  |page 0|page 1|page 2|page 3| ... |page N-1|
              commit(1, 2) -> pages 1 and 2 backed by memory, the rest untouched
"""

from __future__ import annotations

from typing import Protocol

import torch


class VirtualRegion(Protocol):
    """A reserved address range whose pages are backed only while committed.

    Reading or writing an uncommitted page is a bug: on the host it silently
    commits memory behind the page table's back, on a GPU it faults.
    """

    page_size: int
    """Bytes per page: the unit of commit and release."""

    num_pages: int
    """Pages in the whole reserved range."""

    device: torch.device

    def as_bytes(self) -> torch.Tensor:
        """A uint8 tensor over the whole range (`[num_pages * page_size]`), touching nothing."""
        ...

    def commit(self, first_page: int, num_pages: int) -> None:
        """Back pages `[first_page, first_page + num_pages)` with memory (zero-filled or not)."""
        ...

    def release(self, first_page: int, num_pages: int) -> None:
        """Give the memory under those pages back; their contents are lost."""
        ...

    def close(self) -> None:
        """Release every page and the address range. Safe to call twice."""
        ...


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
