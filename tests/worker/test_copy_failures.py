"""Moves between tiers that raise on the copy thread: whoever would use what they moved fails or
recomputes, alone, and no later move of the same job is skipped.

The books plan against the host tier a step or more ahead of the copy thread,
so by the time a save fails, later plans may already read its blocks (a
prefix hit promoted, a swap-in, a disk write). These drive the real worker
with hand-made plans and a model whose tokens say which KV they read.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from kvos.core.plan import (
    LoadFromDisk,
    LoadFromHost,
    LoadRequestKV,
    NewRequestData,
    SaveToDisk,
    SaveToHost,
    ScheduledRequest,
    StepOutput,
    StepPlan,
    TableUpdate,
)
from kvos.memory.kv_manager import TierOps
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.memory.tiers.host import HostBlockPool
from kvos.sampling_params import SamplingParams
from kvos.worker.disk_store import DiskKVStore
from kvos.worker.kv_cache import HostKVPool, UnwrittenHostBlock, make_host_pool, make_kv_buffer
from kvos.worker.worker import KV_UNREADABLE, Worker
from tests.worker.test_worker_random import SHAPE, ChainModel, FlakyHostSaves, allowed, chain

BS = 4


def make_worker(tmp_path: Path | None = None) -> tuple[Worker, FlakyHostSaves]:
    kv = PagedKVCacheManager(16, BS, 64, host=HostBlockPool(8))
    store = DiskKVStore(str(tmp_path), 1 << 20, BS, SHAPE) if tmp_path is not None else None
    worker = Worker(
        ChainModel(0.0, random.Random(0)),  # type: ignore[arg-type]
        make_kv_buffer(kv, SHAPE),
        BS,
        SHAPE.device,
        host_pool=make_host_pool(kv, SHAPE),
        disk_store=store,
    )
    assert worker.host_pool is not None
    for k, v in worker.kv_buffer.kv_caches:  # what fresh memory may hold: a block no load filled reads as garbage
        k.fill_(float("nan"))
        v.fill_(float("nan"))
    return worker, FlakyHostSaves(worker.host_pool, seed=0)  # no save fails until a test sets fail_rate


def new(req_id: str, prompt: list[int]) -> NewRequestData:
    return NewRequestData(req_id, prompt, [], SamplingParams(max_tokens=4, seed=0), 0)


def run(worker: Worker, plan: StepPlan) -> StepOutput:
    """Execute `plan`, then hear everything its moves reported (a step's output carries what the copy
    thread finished by then; an empty plan drains it)."""
    output = worker.execute(plan)
    late = worker.execute(StepPlan(plan.step_id))
    output.kv_loaded.extend(late.kv_loaded)
    output.kv_load_failed.extend(late.kv_load_failed)
    output.host_save_failed.extend(late.host_save_failed)
    output.disk_save_failed.update(late.disk_save_failed)
    output.disk_loaded.extend(late.disk_loaded)
    output.disk_load_failed.update(late.disk_load_failed)
    return output


PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5]


def expected_kv(prompt: list[int], position: int) -> int:
    value = 1
    for token in prompt[: position + 1]:
        value = chain(value, token)
    return value


def prefill_a(worker: Worker) -> None:
    """Request a computes PROMPT into blocks 0-2 (its first two blocks are full)."""
    table = TableUpdate(0, (0, 1, 2))
    plan = StepPlan(1, [ScheduledRequest("a", PROMPT, 0, True, table)], [new("a", PROMPT)])
    output = run(worker, plan)
    assert output.sampled["a"].token_id in allowed([expected_kv(PROMPT, p) for p in range(len(PROMPT))])


def test_a_failed_save_is_reported_and_a_promotion_from_it_fails_its_readers_alone() -> None:
    worker, saves = make_worker()
    prefill_a(worker)
    saves.fail_rate = 1.0
    # Step 2 writes a's first block back to host block 5; the copy dies. Nothing is raised to the engine.
    assert run(worker, StepPlan(2, saves=[SaveToHost(0, 5)])).host_save_failed == [5]
    saves.fail_rate = 0.0
    # Step 3, planned before the books heard (the copy thread may lag a step behind): b finds a's first block
    # in the host tier (promoted into block 6) and computes the rest; c, beside it, shares nothing.
    # c samples; b fails with a message.
    b_table, c_prompt = TableUpdate(0, (6, 7, 8)), [2, 7, 1, 8, 2]
    plan = StepPlan(
        3,
        [
            ScheduledRequest("b", PROMPT[4:], 4, True, b_table),
            ScheduledRequest("c", c_prompt, 0, True, TableUpdate(0, (9, 10))),
        ],
        [new("b", PROMPT), new("c", c_prompt)],
        loads=[LoadFromHost(5, 6)],
    )
    output = worker.execute(plan)
    assert output.failed == {"b": KV_UNREADABLE} and "b" not in output.sampled
    assert output.sampled["c"].token_id in allowed([expected_kv(c_prompt, p) for p in range(len(c_prompt))])


def swap_in_from_a_failed_save() -> tuple[Worker, LoadRequestKV]:
    """a computes PROMPT; its two full blocks' save to host blocks 5-6 dies; the swap-in that reads them back
    into blocks 11-13."""
    worker, saves = make_worker()
    prefill_a(worker)
    saves.fail_rate = 1.0
    assert run(worker, StepPlan(2, saves=[SaveToHost(0, 5, 2)])).host_save_failed == [5, 6]
    saves.fail_rate = 0.0
    return worker, LoadRequestKV("a", TableUpdate(0, (11, 12, 13)), (LoadFromHost(5, 11, 2),))


def test_a_swap_in_from_an_unwritten_block_fails_that_request_and_a_later_save_heals_the_block() -> None:
    worker, swap_in = swap_in_from_a_failed_save()
    output = run(worker, StepPlan(3, kv_loads=[swap_in], preempted_req_ids=["a"]))
    ((req_id, step_id, error),) = output.kv_load_failed
    assert (req_id, step_id) == ("a", 3) and error.startswith("UnwrittenHostBlock: host block 5")
    assert not output.kv_loaded
    # Written again (a good save of the same blocks), they load: the values are a's KV.
    run(worker, StepPlan(5, saves=[SaveToHost(0, 5, 2)]))
    host = worker.host_pool
    assert host is not None and not host.unwritten
    assert run(worker, StepPlan(6, kv_loads=[swap_in])).kv_loaded == [("a", 6)]
    k = worker.kv_buffer.kv_caches[0][0]
    assert [int(k[11 * BS + p, 0, 0]) for p in range(8)] == [expected_kv(PROMPT, p) for p in range(8)]


def test_a_failed_swap_in_fails_a_request_that_shares_its_blocks_in_the_same_step() -> None:
    """The books make a swap-in's full blocks findable by digest to requests planned into the same step; one
    that took them as its prefix computed on blocks the failed load never filled: it fails, not samples."""
    worker, swap_in = swap_in_from_a_failed_save()
    # b's prompt is a's: its first 8 tokens are a's two full blocks (11, 12), which it shares.
    b = ScheduledRequest("b", PROMPT[8:], 8, True, TableUpdate(0, (11, 12, 14)))
    output = worker.execute(StepPlan(3, [b], [new("b", PROMPT)], kv_loads=[swap_in], preempted_req_ids=["a"]))
    assert output.failed == {"b": KV_UNREADABLE} and "b" not in output.sampled
    ((req_id, _, _),) = output.kv_load_failed
    assert req_id == "a"


def test_an_unwritten_host_block_is_not_written_to_disk(tmp_path: Path) -> None:
    worker, saves = make_worker(tmp_path)
    prefill_a(worker)
    saves.fail_rate = 1.0
    assert run(worker, StepPlan(2, saves=[SaveToHost(0, 5)])).host_save_failed == [5]
    saves.fail_rate = 0.0
    output = run(worker, StepPlan(3, disk_saves=[SaveToDisk("host", 5, b"\x01" * 32)]))
    assert not output.disk_save_failed  # skipped, not failed: the disk tier keeps taking blocks
    assert worker.disk_store is not None and not any(tmp_path.glob("*.kv"))


def test_the_host_pool_refuses_to_load_what_a_failed_save_left() -> None:
    pool = HostKVPool(4, BS, SHAPE)
    primary = [(torch.ones(8 * BS, 1, 16), torch.ones(8 * BS, 1, 16))]
    real = pool._move

    def dies(src: list, dst: list, runs: list[tuple[int, int, int]]) -> None:
        raise MemoryError("gone")

    pool._move = dies  # type: ignore[method-assign]
    with pytest.raises(MemoryError):
        pool.save(primary, [SaveToHost(0, 1, 2)])
    pool._move = real  # type: ignore[method-assign]
    assert pool.unwritten == {1, 2}
    with pytest.raises(UnwrittenHostBlock, match="host block 2"):
        pool.load(primary, [LoadFromHost(0, 0), LoadFromHost(2, 1)])
    pool.load(primary, [LoadFromHost(0, 0), LoadFromHost(3, 1)])  # the others load as ever
    pool.save(primary, [SaveToHost(4, 2)])
    assert pool.unwritten == {1}


def test_a_promotion_whose_copy_raises_fails_only_the_requests_holding_its_blocks() -> None:
    worker, _ = make_worker()
    prefill_a(worker)
    assert not run(worker, StepPlan(2, saves=[SaveToHost(0, 5)])).host_save_failed
    pool = worker.host_pool
    assert pool is not None
    real = pool._move

    def fails_into_the_pool(src: list, dst: list, runs: list[tuple[int, int, int]]) -> None:
        if dst is not pool.kv_caches:
            raise OSError("the host memory could not be read")
        real(src, dst, runs)

    pool._move = fails_into_the_pool  # type: ignore[method-assign]
    c_prompt = [2, 7, 1, 8, 2]
    plan = StepPlan(
        3,
        [
            ScheduledRequest("b", PROMPT[4:], 4, True, TableUpdate(0, (6, 7, 8))),
            ScheduledRequest("c", c_prompt, 0, True, TableUpdate(0, (9, 10))),
        ],
        [new("b", PROMPT), new("c", c_prompt)],
        loads=[LoadFromHost(5, 6)],
    )
    output = worker.execute(plan)  # raises nothing: the step goes on for c
    assert output.failed == {"b": KV_UNREADABLE} and list(output.sampled) == ["c"]


def test_a_disk_drop_that_raises_skips_none_of_the_host_saves_behind_it(tmp_path: Path) -> None:
    worker, _ = make_worker(tmp_path)
    prefill_a(worker)
    store = worker.disk_store
    assert store is not None

    def drop(key: bytes) -> None:
        raise PermissionError("read-only directory")

    store.drop = drop  # type: ignore[method-assign]
    output = run(worker, StepPlan(2, disk_drops=[b"\x02" * 32], saves=[SaveToHost(0, 5)]))
    assert not output.host_save_failed and not output.disk_save_failed
    swap_in = LoadRequestKV("a", TableUpdate(0, (11,)), (LoadFromHost(5, 11),))
    assert run(worker, StepPlan(3, kv_loads=[swap_in])).kv_loaded == [("a", 3)]
    k = worker.kv_buffer.kv_caches[0][0]
    assert [int(k[11 * BS + p, 0, 0]) for p in range(BS)] == [expected_kv(PROMPT, p) for p in range(BS)]


def test_a_disk_read_that_raises_is_reported_as_that_read_s_failure(tmp_path: Path) -> None:
    worker, _ = make_worker(tmp_path)
    store = worker.disk_store
    assert store is not None

    def load(caches: dict, op: LoadFromDisk) -> None:
        raise RuntimeError("shape mismatch")

    store.load = load  # type: ignore[method-assign]
    key = b"\x03" * 32
    output = run(worker, StepPlan(1, disk_loads=[LoadFromDisk(key, "host", 2)]))
    assert output.disk_load_failed == {key: "RuntimeError: shape mismatch"} and not output.disk_loaded


def test_write_down_reports_a_dying_host_save_as_a_step_does() -> None:
    worker, saves = make_worker()
    prefill_a(worker)
    saves.fail_rate = 1.0
    written = worker.write_down(TierOps(saves=[SaveToHost(0, 4, 2)]))  # a migration's reservation, between steps
    assert written.host_save_failed == [4, 5] and not written.disk_save_failed
    assert worker.host_pool is not None and worker.host_pool.unwritten == {4, 5}
