"""Background thread that maps pages for the next decode steps while the model runs.

Mapping a page costs a driver call (cuMemMap + cuMemSetAccess, tens of
microseconds) or a kernel call (madvise); doing it on the engine thread right
before the forward pass adds that to every step that crosses a page. The
manager instead queues "row r of request q wants n pages" after each
allocation, and this thread commits them from free budget during compute, so
the next step usually finds its page already there.

The thread holds only the queue and a weak reference to the page table, and is
told to stop when the table's owner is collected, so a forgotten manager does
not keep its memory alive.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref

from kvos.memory.virtual.page_table import SlotPageTable

logger = logging.getLogger(__name__)

_Job = tuple[int, str, int] | None


def _serve(jobs: queue.Queue[_Job], table_ref: weakref.ref[SlotPageTable]) -> None:
    while True:
        job = jobs.get()
        try:
            if job is None:
                return
            table = table_ref()
            if table is None:
                return
            row, req_id, num_pages = job
            with table.lock:
                table.look_ahead(row, req_id, num_pages)
            del table
        except (OSError, RuntimeError):
            # A failed early map is not fatal: the engine thread maps the page
            # itself when the step needs it, and reports the error there.
            logger.warning("background page mapping failed", exc_info=True)
        finally:
            jobs.task_done()


class PageMapper:
    """Commits look-ahead pages on one daemon thread."""

    def __init__(self, table: SlotPageTable) -> None:
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._thread = threading.Thread(
            target=_serve, args=(self._jobs, weakref.ref(table)), name="kvos-page-mapper", daemon=True
        )
        self._thread.start()
        self._finalizer = weakref.finalize(self, self._jobs.put, None)

    def submit(self, row: int, req_id: str, num_pages: int) -> None:
        self._jobs.put((row, req_id, num_pages))

    def drain(self) -> None:
        """Wait until every queued job is done (tests and shutdown use this)."""
        self._jobs.join()

    def close(self) -> None:
        if self._finalizer.alive:
            self._finalizer()
            self._thread.join()
