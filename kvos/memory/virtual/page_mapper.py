"""Background thread that maps pages for the next decode steps while the model runs.

Mapping a page costs a driver call (cuMemMap + cuMemSetAccess, tens of
microseconds) or a kernel call (madvise); doing it on the engine thread right
before the forward pass adds that to every step that crosses a page. The
manager instead queues "row r of request q wants n pages" after each
allocation, and this thread commits them from free budget during compute, so
the next step usually finds its page already there.

A job that fails is logged and counted (`num_failed_jobs`, `last_error`) and
the thread goes on serving: a failed early map is not fatal, because the
engine thread maps the page itself when the step needs it and reports any
error there. Whatever happens, every job is marked done and `drain()` returns
once the queue is empty or the thread has stopped, so it never blocks forever.

The thread holds only the queue and a weak reference to the page table, and is
told to stop when the table's owner is collected, so a forgotten manager does
not keep its memory alive.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque

from kvos.memory.virtual.page_table import SlotPageTable

logger = logging.getLogger(__name__)

_Job = tuple[int, str, int]
"""(row, req_id, pages wanted)."""


class _Jobs:
    """The queue between the engine thread and the mapper, with the failure record the engine reads."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.queue: deque[_Job] = deque()
        self.num_pending = 0
        """Jobs submitted and not yet done (queued or running)."""
        self.stopping = False
        self.stopped = False
        self.num_failed_jobs = 0
        self.last_error: BaseException | None = None

    def submit(self, job: _Job) -> bool:
        with self.cond:
            if self.stopping:
                return False
            self.queue.append(job)
            self.num_pending += 1
            self.cond.notify_all()
            return True

    def next(self) -> _Job | None:
        """The next job, or None once told to stop (queued jobs are then dropped)."""
        with self.cond:
            while not self.queue and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return None
            return self.queue.popleft()

    def done(self, error: BaseException | None = None) -> None:
        with self.cond:
            self.num_pending -= 1
            if error is not None:
                self.num_failed_jobs += 1
                self.last_error = error
            self.cond.notify_all()

    def stop(self) -> None:
        """Ask the thread to stop; jobs not started are dropped and count as done."""
        with self.cond:
            self.stopping = True
            self.num_pending -= len(self.queue)
            self.queue.clear()
            self.cond.notify_all()

    def mark_stopped(self) -> None:
        with self.cond:
            self.stopping = True
            self.stopped = True
            self.num_pending = 0
            self.queue.clear()
            self.cond.notify_all()

    def wait_idle(self) -> None:
        with self.cond:
            while self.num_pending and not self.stopped:
                self.cond.wait()


def _serve(jobs: _Jobs, table_ref: weakref.ref[SlotPageTable]) -> None:
    try:
        while True:
            job = jobs.next()
            if job is None:
                return
            error: BaseException | None = None
            try:
                table = table_ref()
                if table is None:
                    return
                row, req_id, num_pages = job
                with table.lock:
                    table.look_ahead(row, req_id, num_pages)
                del table
            except Exception as exc:
                error = exc
                logger.warning("background page mapping failed; the step will map the page itself", exc_info=True)
            finally:
                jobs.done(error)
    finally:
        # However the loop ends, nothing is left for drain() to wait on.
        jobs.mark_stopped()


class PageMapper:
    """Commits look-ahead pages on one daemon thread."""

    def __init__(self, table: SlotPageTable) -> None:
        self._jobs = _Jobs()
        self._thread = threading.Thread(
            target=_serve, args=(self._jobs, weakref.ref(table)), name="kvos-page-mapper", daemon=True
        )
        self._thread.start()
        self._finalizer = weakref.finalize(self, self._jobs.stop)

    @property
    def num_failed_jobs(self) -> int:
        """Jobs that raised (each was logged); the engine may report it."""
        return self._jobs.num_failed_jobs

    @property
    def last_error(self) -> BaseException | None:
        return self._jobs.last_error

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, row: int, req_id: str, num_pages: int) -> None:
        """Queue a job; ignored once the mapper is stopping (the step maps its own pages)."""
        self._jobs.submit((row, req_id, num_pages))

    def drain(self) -> None:
        """Wait until every queued job is done or the thread has stopped (tests and shutdown use this)."""
        self._jobs.wait_idle()

    def close(self) -> None:
        """Stop the thread after the job it is running, dropping queued ones. Safe to call twice."""
        if self._finalizer.alive:
            self._finalizer()
        self._thread.join()


class InlineMapper:
    """Look-ahead on the caller's thread, at once: for books without memory (`BooksRegion`, the simulator).

    A thread there would only make the books depend on timing. Mapping at
    once is the thread at its best: every look-ahead done before the next
    allocation, which is what it is there for.
    """

    num_failed_jobs = 0
    last_error: BaseException | None = None

    def __init__(self, table: SlotPageTable) -> None:
        self._table = table

    def submit(self, row: int, req_id: str, num_pages: int) -> None:
        with self._table.lock:
            self._table.look_ahead(row, req_id, num_pages)

    def drain(self) -> None:
        """Nothing is ever queued."""

    def close(self) -> None:
        """No thread to stop."""
