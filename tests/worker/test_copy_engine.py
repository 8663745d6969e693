"""The copy thread: moves run in submission order, the engine thread waits only for those touching its blocks."""

from __future__ import annotations

import threading

import pytest
import torch

from kvos.worker.copy_engine import CopyEngine, CopyReport, CopyThreadError

BLOCK = 4


def gate_job(engine: CopyEngine, step_id: int, first_block: int, num_blocks: int) -> threading.Event:
    """Submit a job touching the given blocks that runs only once the returned event is set."""
    release = threading.Event()

    def run(report: CopyReport) -> None:
        assert release.wait(5)
        report.kv_loaded.append(f"r{first_block}")

    engine.submit(step_id, [(first_block * BLOCK, (first_block + num_blocks) * BLOCK)], run)
    return release


def test_waiting_for_untouched_blocks_does_not_wait_for_the_copy() -> None:
    engine = CopyEngine(torch.device("cpu"))
    release = gate_job(engine, 1, first_block=10, num_blocks=3)
    engine.wait_for({0, 1, 9, 13}, BLOCK)  # returns at once: the job holds blocks 10-12 only
    assert engine.num_pending == 1 and engine.take_reports() == []
    waiter = threading.Thread(target=engine.wait_for, args=({12}, BLOCK))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # block 12 is being copied: the step that uses it waits
    release.set()
    waiter.join(5)
    assert not waiter.is_alive()
    (report,) = engine.take_reports()
    assert report.step_id == 1 and report.kv_loaded == ["r10"]
    engine.close()


def test_jobs_run_in_submission_order_and_a_failed_step_s_reports_are_dropped() -> None:
    engine = CopyEngine(torch.device("cpu"))
    order: list[int] = []
    for step in (1, 2, 3):
        engine.submit(step, [], lambda report, step=step: order.append(step))
    engine.drain()
    assert order == [1, 2, 3]
    engine.discard(2)
    assert [r.step_id for r in engine.take_reports()] == [1, 3]
    engine.close()
    engine.close()  # twice is fine


def test_a_job_that_raises_is_raised_on_the_engine_thread_and_its_reports_kept() -> None:
    engine = CopyEngine(torch.device("cpu"))

    def boom(report: CopyReport) -> None:
        raise MemoryError("host tier")

    engine.submit(1, [], lambda report: report.disk_loaded.append(b"k"))
    engine.submit(2, [], boom)
    engine.drain()
    with pytest.raises(CopyThreadError, match="MemoryError: host tier"):
        engine.take_reports()
    assert [r.step_id for r in engine.take_reports()] == [1, 2]  # the next call hands them over
    engine.close()
