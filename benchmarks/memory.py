"""Resident memory of a process and its children, idle and at peak, for the benchmarks' reports.

Read from Linux's /proc (the machines these benchmarks run on); elsewhere the
figures are None. A server's RSS counts its child processes too (`kvos serve
--core-process` runs the engine core in one), so both ways of running compare.

    sampler = RSSSampler(pid)      # pid of the engine's or server's process
    idle = sampler.sample()        # after start-up and warm-up, before the load
    with sampler:                  # a thread samples every `interval_s` meanwhile
        run_the_load()
    sampler.peak_bytes             # the largest sample, idle included
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return children


def _own_rss(pid: int) -> int | None:
    try:
        # statm's second field: resident pages.
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def tree_rss_bytes(pid: int) -> int | None:
    """RSS of `pid` and all its descendants now, or None where /proc cannot tell."""
    own = _own_rss(pid)
    if own is None:
        return None
    total, stack = own, _children(pid)
    while stack:
        child = stack.pop()
        total += _own_rss(child) or 0
        stack += _children(child)
    return total


class RSSSampler:
    """Tracks the peak RSS of a process tree while in a `with` block (a background thread)."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.05) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.interval_s = interval_s
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int | None:
        """RSS now; also counted towards the peak."""
        rss = tree_rss_bytes(self.pid)
        if rss is not None and (self.peak_bytes is None or rss > self.peak_bytes):
            self.peak_bytes = rss
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> RSSSampler:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def mib(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2**20
