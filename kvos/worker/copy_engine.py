"""KV moves between tiers, off the step's critical path: one copy thread, jobs in plan order.

    engine thread                                   copy thread (started on first use)
    execute(plan N):  submit saves, loads, ... --->  [job N.1][job N.2][job N+1.1] ...  FIFO
                      wait_for(blocks the step uses)   each job records the primary slot ranges it touches
                      forward pass                     and its report (disk checks, timings, loaded requests)
                      take_reports() -> StepOutput

Every move between tiers (host saves and loads, disk reads and writes) runs
here, one job after another in the order the plans issued them. That order is
all the tiers below the pool need: a host block is never overwritten before an
earlier job has read it, whatever the engine thread does meanwhile.

The primary pool is the one place both threads touch. A job records the slot
ranges of the pool it reads or writes; before its forward pass the worker
waits for the jobs that touch blocks its requests use (`wait_for`), and no
others: a swap-in for a request that waits for its KV overlaps the step of
those that compute. On CUDA the copies are queued on a side stream that first
waits for the work the engine thread had queued when the job was submitted;
the job ends when that stream has drained, so the wait above orders them.

A job that raises is logged and raised again by the next `take_reports`
(its reports and the others' wait for the call after): the step that hears
of it fails its requests, as a step whose synchronous copy raised would. Jobs
that can fail one request alone (a swap-in) catch their own errors and say so
in their report instead, and so do host saves: a save that dies leaves its
blocks marked unwritten, so whoever reads them later fails alone
(`HostKVPool.unwritten`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


@dataclass
class CopyReport:
    """What one job did, for the StepOutput of the step that first sees it done."""

    step_id: int
    kv_loaded: list[str] = field(default_factory=list)
    kv_load_failed: dict[str, str] = field(default_factory=dict)
    disk_loaded: list[bytes] = field(default_factory=list)
    disk_load_failed: dict[bytes, str] = field(default_factory=dict)
    disk_save_failed: dict[bytes, str] = field(default_factory=dict)
    host_save_failed: list[int] = field(default_factory=list)
    """Host blocks a save could not write."""
    unfilled_blocks: list[int] = field(default_factory=list)
    """Primary blocks a host load did not fill: its source's save had failed, or the copy raised."""
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _Job:
    seq: int
    ranges: tuple[tuple[int, int], ...]
    """Slot ranges [start, end) of the primary pool the job reads or writes."""
    run: Callable[[CopyReport], None]
    report: CopyReport
    event: torch.cuda.Event | None = None


class CopyThreadError(RuntimeError):
    """A KV move between tiers raised on the copy thread."""


class CopyEngine:
    """A FIFO of KV moves run by one background thread; the engine thread waits only for what it needs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._done = threading.Condition()
        self._next_seq = 0
        self._done_seq = -1
        self._pending: dict[int, _Job] = {}
        """Submitted and not yet finished, by sequence number (read under `_done`)."""
        self._reports: list[CopyReport] = []
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def num_pending(self) -> int:
        with self._done:
            return len(self._pending)

    def submit(self, step_id: int, ranges: Iterable[tuple[int, int]], run: Callable[[CopyReport], None]) -> None:
        """Queue `run` (which fills in its report) behind every job submitted before it."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kvos-copy", daemon=True)
            self._thread.start()
        event = None
        if self._stream is not None:
            event = torch.cuda.Event()
            event.record()  # the side stream starts after what the engine thread has queued so far
        with self._done:
            job = _Job(self._next_seq, tuple(ranges), run, CopyReport(step_id), event)
            self._next_seq += 1
            self._pending[job.seq] = job
        self._queue.put(job)

    def wait_for(self, blocks: Iterable[int], block_size: int) -> None:
        """Return once no unfinished job touches any of `blocks` (pool blocks of `block_size` slots)."""
        with self._done:
            if not self._pending:
                return
            wanted = set(blocks)
            last = -1
            for job in self._pending.values():
                if any(
                    b in wanted for start, end in job.ranges for b in range(start // block_size, -(-end // block_size))
                ):
                    last = max(last, job.seq)
            self._done.wait_for(lambda: self._done_seq >= last)

    def drain(self) -> None:
        """Return once every submitted job has finished."""
        with self._done:
            last = self._next_seq - 1
            self._done.wait_for(lambda: self._done_seq >= last)

    def take_reports(self) -> list[CopyReport]:
        """Reports of the jobs finished since the last call, in submission order; raises a job's error."""
        with self._done:
            error, self._error = self._error, None
            if error is None:
                reports, self._reports = self._reports, []
                return reports
        raise CopyThreadError(f"a KV copy between tiers failed: {type(error).__name__}: {error}") from error

    def discard(self, step_id: int) -> None:
        """Forget the reports of `step_id`'s jobs (the step failed; call `drain` first)."""
        with self._done:
            self._reports = [r for r in self._reports if r.step_id != step_id]

    def close(self) -> None:
        """Finish the queued jobs and stop the thread. Safe to call twice."""
        if self._thread is not None:
            self.drain()
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                with torch.inference_mode():
                    if self._stream is not None:
                        assert job.event is not None
                        self._stream.wait_event(job.event)
                        with torch.cuda.stream(self._stream):
                            job.run(job.report)
                        self._stream.synchronize()
                    else:
                        job.run(job.report)
                error = None
            except BaseException as exc:  # reported to the engine thread, never lost with the thread
                logger.exception("KV copy job of step %d failed", job.report.step_id)
                error = exc
            with self._done:
                del self._pending[job.seq]
                self._done_seq = job.seq
                self._reports.append(job.report)
                if error is not None and self._error is None:
                    self._error = error
                self._done.notify_all()
