"""Host (CPU) virtual region: anonymous mmap reserved up front, pages committed with madvise.

`MAP_NORESERVE` makes the reservation free: the kernel hands out address space
but no memory and no overcommit charge, so a cache for every slot at full
context costs nothing until pages are committed. Transparent huge pages are
turned off for the range, else one touched byte could commit 2 MiB and the page
table would no longer describe what is resident. A guard page (no access)
ends the range: an overrun faults instead of quietly committing memory, and
the kernel cannot merge two caches' ranges into one mapping, so each cache's
resident memory can be read from /proc/self/smaps.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Sequence

import torch

from kvos.memory.virtual.region import DeviceOutOfMemory, PageRun, RegionError, check_runs

_MAP_NORESERVE = 0x4000  # Linux value; Python's mmap module does not export it.
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault pages in writable, without touching data.
_PROT_NONE = 0


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.mincore.restype = ctypes.c_int
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mprotect.restype = ctypes.c_int
    return libc


def host_page_size() -> int:
    return mmap.PAGESIZE


class HostRegion:
    """A reserved range of host memory whose 4 KiB pages are committed on demand.

    madvise goes through ctypes rather than `mmap.madvise` because ctypes drops
    the GIL, so a background thread can commit pages while the model runs.
    """

    def __init__(self, num_bytes: int) -> None:
        if num_bytes <= 0:
            raise ValueError(f"num_bytes must be > 0, got {num_bytes}")
        self.page_size = host_page_size()
        self.num_pages = -(-num_bytes // self.page_size)
        self.device = torch.device("cpu")
        self._libc = _libc()
        num_bytes = self.num_pages * self.page_size
        self._mmap: mmap.mmap | None = mmap.mmap(
            -1,
            num_bytes + self.page_size,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        self._bytes = torch.frombuffer(self._mmap, dtype=torch.uint8)[:num_bytes]
        self.base_address = self._bytes.data_ptr()
        if self._libc.mprotect(self.base_address + num_bytes, self.page_size, _PROT_NONE) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"mprotect of the guard page failed: {os.strerror(code)}")
        self._madvise(0, self.num_pages, mmap.MADV_NOHUGEPAGE)
        self._can_populate = self._probe_populate()
        self._num_committed = 0

    @property
    def num_physical_pages(self) -> int:
        """Pages committed (the page table never commits a page twice); the host keeps none in reserve."""
        return self._num_committed

    def as_bytes(self) -> torch.Tensor:
        return self._bytes

    def commit(self, runs: Sequence[PageRun]) -> None:
        """Populate every page of `runs`; on failure give back what this call populated and raise."""
        pages = self._check_runs(runs)
        done: list[PageRun] = []
        try:
            for first, count in runs:
                if count == 0:
                    continue
                done.append((first, count))  # a failed populate may have faulted in part of the run
                if self._can_populate:
                    self._madvise(first, count, _MADV_POPULATE_WRITE)
                else:
                    # Older kernels: a write fault per page commits it. The pages are
                    # fresh (never committed, or released), so the byte written is moot.
                    start = first * self.page_size
                    self._bytes[start : start + count * self.page_size : self.page_size] = 0
        except OSError as exc:
            for first, count in done:
                self._madvise(first, count, mmap.MADV_DONTNEED)
            if exc.errno in (errno.ENOMEM, errno.EAGAIN):
                raise DeviceOutOfMemory(f"the host has no memory for {len(pages)} more pages") from exc
            raise RegionError(f"committing {len(pages)} host pages failed: {exc}") from exc
        self._num_committed += len(pages)

    def release(self, runs: Sequence[PageRun]) -> None:
        """Drop every page of `runs`. madvise(DONTNEED) fails only on a bad range, which is checked first."""
        pages = self._check_runs(runs)
        for first, count in runs:
            if count:
                self._madvise(first, count, mmap.MADV_DONTNEED)
        self._num_committed -= len(pages)

    def trim(self) -> int:
        """Nothing to give back: released host pages go straight to the kernel."""
        return 0

    def make_room(self) -> None:
        """Nothing to ask: torch's CPU allocator caches nothing that madvise could use."""

    def resident_pages(self, first_page: int, num_pages: int) -> torch.Tensor:
        """Which of these pages the kernel has backed right now (mincore), as bools.

        The page table's word is checked against this in tests.
        """
        self._check_range(first_page, num_pages)
        flags = (ctypes.c_ubyte * num_pages)()
        address = self.base_address + first_page * self.page_size
        if self._libc.mincore(address, num_pages * self.page_size, flags) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"mincore failed: {os.strerror(code)}")
        return torch.tensor(list(flags), dtype=torch.uint8).bitwise_and(1).bool()

    def rss_bytes(self) -> int:
        """Resident bytes of this range as /proc/self/smaps reports them (the kernel's word)."""
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
        for i, line in enumerate(lines):
            fields = line.split(maxsplit=1)
            if "-" not in fields[0] or fields[0].endswith(":"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= self.base_address < end:
                for entry in lines[i + 1 :]:
                    if entry.startswith("Rss:"):
                        return int(entry.split()[1]) * 1024
        raise RuntimeError(f"no mapping in /proc/self/smaps holds {self.base_address:#x}")

    def close(self) -> None:
        """Give every page back; the address range goes when the last view of it is gone.

        Unmapping now would leave any tensor still viewing the range dangling,
        so the mmap object is left to the garbage collector.
        """
        if self._mmap is None:
            return
        self._madvise(0, self.num_pages, mmap.MADV_DONTNEED)
        self._num_committed = 0
        self._mmap = None

    def _probe_populate(self) -> bool:
        """Whether this kernel knows MADV_POPULATE_WRITE (it answers EINVAL if not)."""
        address = self.base_address
        if self._libc.madvise(address, self.page_size, _MADV_POPULATE_WRITE) == 0:
            self._madvise(0, 1, mmap.MADV_DONTNEED)
            return True
        code = ctypes.get_errno()
        if code != errno.EINVAL:
            raise OSError(code, f"madvise(MADV_POPULATE_WRITE) failed: {os.strerror(code)}")
        return False

    def _madvise(self, first_page: int, num_pages: int, advice: int) -> None:
        address = self.base_address + first_page * self.page_size
        if self._libc.madvise(address, num_pages * self.page_size, advice) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"madvise(advice={advice}) failed: {os.strerror(code)}")

    def _check_range(self, first_page: int, num_pages: int) -> None:
        self._check_runs([(first_page, num_pages)])

    def _check_runs(self, runs: Sequence[PageRun]) -> list[int]:
        if self._mmap is None:
            raise RegionError("region is closed")
        return check_runs(runs, self.num_pages)
