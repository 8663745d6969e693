"""The CUDA region and the virtual KV manager on a fake driver that fails on demand.

Every driver call an operation makes is failed in turn, through both real
driver wrappers (cuda.bindings and ctypes): afterwards the region must still
be the driver's truth, no handle may be lost (created == mapped + spare +
released), the page table must agree with the region, and a device out of
memory must turn into a refused allocation, which the scheduler answers by
preempting.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import pytest
import torch

from kvos.config import SchedulerConfig
from kvos.core.plan import SampledToken, StepOutput
from kvos.core.request import Request
from kvos.core.scheduler import Scheduler
from kvos.memory.shape import KVShape
from kvos.memory.virtual import VirtualKVCacheManager, cuda_backend, virtual_kv_manager
from kvos.memory.virtual.cuda_backend import CudaDriverError, CudaRegion
from kvos.memory.virtual.region import DeviceOutOfMemory, RegionBroken, RegionError
from kvos.sampling_params import SamplingParams
from kvos.worker.kv_cache import VirtualKVBuffer
from tests.memory.fake_cuda import (
    PATHS,
    FakeDevice,
    check_consistent,
    fake_region,
    open_fake_driver,
)

# 2 layers x 2 KV heads x 64 x fp32 = 2048 bytes per token: 2 tokens per 4 KiB fake page (megacache).
SHAPE = KVShape(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, device=torch.device("cpu"))
PAGE = 4096

Operation = Callable[[CudaRegion], None]


def calls_of(path: str, setup: Operation, operation: Operation) -> list[str]:
    """The driver calls `operation` makes after `setup`, on a fresh fake that never fails."""
    device = FakeDevice()
    region = fake_region(path, device, 16)
    setup(region)
    start = len(device.calls)
    operation(region)
    return device.calls[start:]


def fail_each_call(path: str, setup: Operation, operation: Operation) -> list[tuple[str, FakeDevice, CudaRegion, bool]]:
    """Run `operation` once per driver call it makes, failing that call; (call, device, region, raised)."""
    results = []
    for k, call in enumerate(calls_of(path, setup, operation)):
        device = FakeDevice()
        region = fake_region(path, device, 16)
        setup(region)
        device.fail_call(len(device.calls) + k)
        try:
            operation(region)
            raised = False
        except RegionError:
            raised = True
        results.append((call, device, region, raised))
    return results


def with_spare(region: CudaRegion) -> None:
    """Pages 0, 2 mapped and one handle spare: a commit then takes one spare handle and creates the rest."""
    region.commit([(0, 3)])
    region.release([(1, 1)])


# -- the region alone -----------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_commit_is_all_or_nothing_at_every_failure_point(path: str) -> None:
    def commit(region: CudaRegion) -> None:
        region.commit([(1, 1), (5, 2)])

    results = fail_each_call(path, with_spare, commit)
    assert {call for call, *_ in results} >= {"cuCtxPushCurrent", "cuMemCreate", "cuMemMap", "cuMemSetAccess"}
    for call, device, region, raised in results:
        check_consistent(region, device)
        if call == "cuCtxPopCurrent":  # the work was done; a context left pushed is only logged
            assert not raised and sorted(region._reservation.mapped) == [0, 1, 2, 5, 6]
            continue
        assert raised, call
        assert sorted(region._reservation.mapped) == [0, 2], call
        assert region.num_physical_pages == len(device.live)
        region.commit([(1, 1), (5, 2)])  # the failure left nothing behind to trip over
        check_consistent(region, device)


@pytest.mark.parametrize("path", PATHS)
def test_release_is_all_or_nothing_at_every_failure_point(path: str) -> None:
    def setup(region: CudaRegion) -> None:
        region.commit([(0, 4), (8, 2)])

    def release(region: CudaRegion) -> None:
        region.release([(1, 2), (8, 1)])

    results = fail_each_call(path, setup, release)
    assert {call for call, *_ in results} >= {"cuCtxSynchronize", "cuMemUnmap"}
    for call, device, region, raised in results:
        check_consistent(region, device)
        if call == "cuCtxPopCurrent":
            assert not raised
            continue
        assert raised, call
        assert sorted(region._reservation.mapped) == [0, 1, 2, 3, 8, 9], call


@pytest.mark.parametrize("path", PATHS)
def test_close_frees_everything_and_a_failed_close_can_be_retried(path: str) -> None:
    def setup(region: CudaRegion) -> None:
        with_spare(region)

    results = fail_each_call(path, setup, CudaRegion.close)
    assert {call for call, *_ in results} >= {"cuMemUnmap", "cuMemRelease", "cuMemAddressFree"}
    for call, device, region, raised in results:
        check_consistent(region, device)
        if call in ("cuCtxPopCurrent", "cuDevicePrimaryCtxRelease"):
            assert not raised  # logged: every page, handle and the range are already back
        else:
            assert raised, call
            assert not region.is_freed
            region.close()
        assert region.is_freed
        assert device.live == set() and device.mapped == {} and device.reserved == {}
        if call != "cuDevicePrimaryCtxRelease":
            assert device.retained == 0
        check_consistent(region, device)


@pytest.mark.parametrize("path", PATHS)
def test_a_failed_undo_breaks_the_region_but_loses_no_handle(path: str) -> None:
    device = FakeDevice()
    region = fake_region(path, device, 16)
    start = len(device.calls)
    region.commit([(0, 1)])
    calls = device.calls[start:]  # push, create, map, set access, pop
    start = len(device.calls)
    # Commit two pages: the second map fails, and so does the unmap that undoes the first.
    # push, create, map, access, create, map(fails), unmap(fails), pop
    device.fail_call(start + 5)
    device.fail_call(start + 6)
    with pytest.raises(CudaDriverError, match="cuMemMap"):
        region.commit([(1, 2)])
    assert calls[1:4] == ["cuMemCreate", "cuMemMap", "cuMemSetAccess"]
    check_consistent(region, device)
    assert sorted(region._reservation.mapped) == [0, 1]  # page 1 is still mapped: the region says so
    with pytest.raises(RegionBroken):
        region.commit([(5, 1)])
    with pytest.raises(RegionBroken):
        region.release([(0, 1)])
    region.close()
    assert region.is_freed and device.live == set() and device.reserved == {}
    check_consistent(region, device)


@pytest.mark.parametrize("path", PATHS)
def test_a_dead_context_fails_every_call_and_keeps_every_handle(path: str) -> None:
    device = FakeDevice()
    region = fake_region(path, device, 16)
    with_spare(region)
    device.fail_from(len(device.calls))
    with pytest.raises(RegionError):
        region.commit([(4, 2)])
    with pytest.raises(RegionError):
        region.close()
    check_consistent(region, device)
    assert len(device.live) == 3
    device.heal()
    region.close()
    assert region.is_freed and device.live == set()


@pytest.mark.parametrize("path", PATHS)
def test_out_of_memory_is_typed_and_leaves_the_pool_ready(path: str) -> None:
    device = FakeDevice(capacity_pages=3)
    region = fake_region(path, device, 16)
    region.commit([(0, 2)])
    with pytest.raises(DeviceOutOfMemory, match="cuMemCreate"):
        region.commit([(4, 2)])  # the first page fits, the second does not
    check_consistent(region, device)
    assert sorted(region._reservation.mapped) == [0, 1]
    assert len(region._reservation.spare) == 1  # created for the undone page, kept for the next commit
    region.commit([(4, 1)])
    assert len(device.live) == 3
    assert region.trim() == 0
    region.release([(4, 1)])
    assert region.trim() == 1 and len(device.live) == 2
    check_consistent(region, device)


@pytest.mark.parametrize("path", PATHS)
def test_every_call_runs_in_a_pushed_context_that_is_popped(path: str) -> None:
    device = FakeDevice()
    region = fake_region(path, device, 16)
    with_spare(region)
    region.trim()
    region.close()
    assert device.ctx_stack == [] and device.retained == 0
    assert device.calls.count("cuCtxPushCurrent") == device.calls.count("cuCtxPopCurrent")
    assert "cuCtxSetCurrent" not in device.calls
    check_consistent(region, device)


# -- views own the reservation ---------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_close_waits_for_the_last_view(path: str) -> None:
    device = FakeDevice()
    region = fake_region(path, device, 16)
    region.commit([(0, 2)])
    view = region.as_bytes()[PAGE : 2 * PAGE].view(torch.int32)
    region.close()
    assert not region.is_freed and len(device.mapped) == 2  # the view may still be read
    view.fill_(3)
    with pytest.raises(RegionError, match="closed"):
        region.commit([(4, 1)])
    with pytest.raises(RegionError, match="closed"):
        region.as_bytes()
    del view
    assert region.is_freed and device.live == set() and device.reserved == {} and device.retained == 0
    region.close()


@pytest.mark.parametrize("path", PATHS)
def test_a_dropped_region_frees_its_memory(path: str) -> None:
    device = FakeDevice()
    region = fake_region(path, device, 16)
    region.commit([(0, 3)])
    del region
    assert device.live == set() and device.reserved == {} and device.retained == 0


def test_a_broken_bindings_install_falls_back_to_ctypes(monkeypatch: pytest.MonkeyPatch) -> None:
    device = FakeDevice()

    def broken_bindings(index: int) -> cuda_backend._BindingsDriver:
        raise RuntimeError("cuda.bindings imported but cuInit failed")

    monkeypatch.setattr(cuda_backend, "DRIVERS", (broken_bindings, lambda index: open_fake_driver("ctypes", device)))
    driver = cuda_backend.open_driver(0)
    assert driver.name.startswith("ctypes")
    driver.close()
    monkeypatch.setattr(cuda_backend, "DRIVERS", (broken_bindings,))
    with pytest.raises(RegionError, match="cuInit failed"):
        cuda_backend.open_driver(0)


def test_libcuda_so_1_is_preferred_over_whatever_find_library_names(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []

    def cdll(name: str) -> str:
        opened.append(name)
        return name

    monkeypatch.setattr(cuda_backend.ctypes, "CDLL", cdll)
    monkeypatch.setattr(cuda_backend.ctypes.util, "find_library", lambda name: "/stubs/libcuda.so")
    assert cuda_backend._load_libcuda() == ("libcuda.so.1", "libcuda.so.1")
    assert opened == ["libcuda.so.1"]


# -- the manager and the scheduler on the fake ---------------------------------------------


@pytest.fixture(params=PATHS)
def fake_gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> FakeDevice:
    """Managers built in this test get a CudaRegion on a fake device (capacity set by the test)."""
    device = FakeDevice()
    path = request.param

    def open_region(num_bytes: int, _: torch.device) -> CudaRegion:
        return CudaRegion(num_bytes, torch.device("cpu"), driver=open_fake_driver(path, device), view=_view)

    from tests.memory.fake_cuda import host_view as _view

    monkeypatch.setattr(virtual_kv_manager, "open_region", open_region)
    monkeypatch.setattr(virtual_kv_manager, "region_page_size", lambda _: PAGE)
    return device


def make_manager(budget_pages: int = 64, rows: int = 4, lookahead: int = 0) -> VirtualKVCacheManager:
    return VirtualKVCacheManager(
        budget_bytes=budget_pages * PAGE, shape=SHAPE, max_num_seqs=rows, max_model_len=64, lookahead_tokens=lookahead
    )


def make_request(req_id: str, num_prompt: int, max_tokens: int = 8) -> Request:
    return Request(
        req_id=req_id, prompt_token_ids=list(range(num_prompt)), params=SamplingParams(max_tokens=max_tokens)
    )


def check_table(kv: VirtualKVCacheManager, device: FakeDevice) -> None:
    """The page table's word is exactly what the fake driver has mapped."""
    assert isinstance(kv.region, CudaRegion)
    check_consistent(kv.region, device)
    expected = set()
    for row, mapped in enumerate(kv.table.mapped):
        for first, count in kv.layout.page_runs(row, 0, mapped):
            expected.update(range(first, first + count))
    assert set(kv.region._reservation.mapped) == expected
    assert kv.num_committed_pages == len(expected) <= kv.table.budget_pages


def make_idle_rows() -> VirtualKVCacheManager:
    """A full 10-page budget held by two idle rows of 6 and 4 pages, left mapped for their next tenants."""
    kv = make_manager(budget_pages=10, rows=3)
    a, b = make_request("a", 12), make_request("b", 8)
    assert kv.allocate_slots(a, 12) and kv.allocate_slots(b, 8)
    kv.free(a)
    kv.free(b)
    return kv


def test_reclaim_under_pressure_at_every_failure_point(fake_gpu: FakeDevice) -> None:
    def scenario(fail_at: int | None) -> tuple[VirtualKVCacheManager, bool, int]:
        fake_gpu.reset()
        kv = make_idle_rows()
        start = len(fake_gpu.calls)
        if fail_at is not None:
            fake_gpu.fail_call(start + fail_at)
        try:
            # 8 pages: the 6-page idle row is taken, 2 more come off the other idle row's tail.
            refused = kv.allocate_slots(make_request("big", 16), 16) is None
        except RegionError:
            refused = True
        fake_gpu.heal()
        return kv, refused, len(fake_gpu.calls) - start

    kv, refused, num_calls = scenario(None)
    assert not refused and kv.table.num_reclaimed_pages == 2
    kv.close()
    for k in range(num_calls):
        kv, refused, _ = scenario(k)
        check_table(kv, fake_gpu)
        assert refused or kv.num_used_blocks == 8
        kv.close()


def test_device_out_of_memory_is_a_refusal_after_one_retry(fake_gpu: FakeDevice) -> None:
    kv = make_manager(budget_pages=64)
    fake_gpu.capacity_pages = 10  # the budget allows 64; the device holds 10
    a = make_request("a", 16)
    assert kv.allocate_slots(a, 16)  # 8 pages
    kv.free(a)
    b = make_request("b", 12, max_tokens=4)
    assert kv.allocate_slots(b, 12)  # 6 pages: row a is the best fit, no new page
    c = make_request("c", 10)
    # 5 new pages; the device has room for 2. The retry reclaims the 2 pages row a
    # still has past b's need (handles kept for reuse), then is refused all the same.
    tenants = list(kv.table.tenant)
    assert kv.allocate_slots(c, 10) is None
    assert kv.table.tenant == tenants and kv.table.mapped[kv.row_of(b)] == kv.table.needed[kv.row_of(b)] == 6
    assert kv.num_out_of_memory == 1
    check_table(kv, fake_gpu)
    kv.free(b)
    assert kv.allocate_slots(c, 10)  # b's pages are reclaimed into c's row: no new handle needed
    check_table(kv, fake_gpu)
    kv.close()


def test_a_driver_error_other_than_memory_still_raises(fake_gpu: FakeDevice) -> None:
    kv = make_manager()
    fake_gpu.fail_call(len(fake_gpu.calls) + 2)  # push, create, map
    with pytest.raises(CudaDriverError, match="cuMemMap"):
        kv.allocate_slots(make_request("a", 4), 4)
    check_table(kv, fake_gpu)
    assert kv.allocate_slots(make_request("a", 4), 4)
    kv.close()


def run_step(scheduler: Scheduler) -> None:
    plan = scheduler.schedule()
    sampled = {c.req_id: SampledToken(1) for c in plan.scheduled if c.sample}
    scheduler.update_from_output(plan, StepOutput(plan.step_id, sampled))


def test_the_scheduler_preempts_when_the_device_runs_out(fake_gpu: FakeDevice) -> None:
    kv = make_manager(budget_pages=64)
    fake_gpu.capacity_pages = 16  # room for one request at a time at the end, not three
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), kv, frozenset(), 64)
    for i in range(3):
        scheduler.add(make_request(f"r{i}", 10, max_tokens=14))  # 24 tokens: 12 pages each
    for _ in range(200):
        if not scheduler.has_unfinished():
            break
        run_step(scheduler)
        check_table(kv, fake_gpu)
    assert not scheduler.has_unfinished()
    assert scheduler.num_preemptions > 0 and kv.num_out_of_memory > 0
    kv.close()
    assert fake_gpu.live == set() and fake_gpu.reserved == {}


# -- the mapper thread ------------------------------------------------------------------------


def test_the_mapper_survives_failing_jobs(fake_gpu: FakeDevice, caplog: pytest.LogCaptureFixture) -> None:
    kv = make_manager(lookahead=8)
    a = make_request("a", 4, max_tokens=40)
    # The step maps 2 pages (push, 2 x (create, map, access), pop); the look-ahead's first map fails.
    fake_gpu.fail_call(len(fake_gpu.calls) + 8 + 2)
    with caplog.at_level(logging.WARNING):
        assert kv.allocate_slots(a, 4)
        kv.wait_for_mapper()
    assert kv.num_mapper_failures == 1 and isinstance(kv.last_mapper_error, CudaDriverError)
    assert "background page mapping failed" in caplog.text
    assert kv._mapper is not None and kv._mapper.is_alive
    check_table(kv, fake_gpu)
    assert kv.table.mapped[kv.row_of(a)] == kv.layout.pages_for(4)  # the job changed nothing
    a.num_computed_tokens = 4
    a.output_token_ids.append(0)
    assert kv.allocate_slots(a, 1)
    kv.wait_for_mapper()
    assert kv.table.mapped[kv.row_of(a)] == kv.layout.pages_for(5 + 8)  # the next job ran
    check_table(kv, fake_gpu)


def test_the_mapper_survives_any_exception_and_drain_never_hangs(
    fake_gpu: FakeDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv = make_manager(lookahead=8)

    def broken(*args: object) -> int:
        raise KeyError("not a driver error at all")

    monkeypatch.setattr(kv.table, "look_ahead", broken)
    assert kv.allocate_slots(make_request("a", 4, max_tokens=40), 4)
    kv.wait_for_mapper()
    assert kv.num_mapper_failures == 1 and isinstance(kv.last_mapper_error, KeyError)
    assert kv._mapper is not None and kv._mapper.is_alive
    kv.close()
    assert not kv._mapper.is_alive
    kv._mapper.submit(0, "a", 3)  # ignored once stopped
    kv.wait_for_mapper()  # returns at once
    kv.close()


def test_device_out_of_memory_in_look_ahead_is_not_a_failure(fake_gpu: FakeDevice) -> None:
    kv = make_manager(lookahead=8)
    fake_gpu.capacity_pages = 2
    a = make_request("a", 4, max_tokens=40)
    assert kv.allocate_slots(a, 4)
    kv.wait_for_mapper()
    assert kv.num_mapper_failures == 0
    assert kv.table.mapped[kv.row_of(a)] == 2
    check_table(kv, fake_gpu)
    kv.close()


# -- ownership: manager and buffer --------------------------------------------------------------


def test_memory_goes_back_once_manager_and_buffer_are_both_closed(fake_gpu: FakeDevice) -> None:
    kv = make_manager(lookahead=8)
    buffer = VirtualKVBuffer(kv.layout, kv.region)
    assert kv.allocate_slots(make_request("a", 10, max_tokens=20), 10)
    kv.wait_for_mapper()
    assert kv.physical_bytes == kv.committed_bytes == kv.num_committed_pages * PAGE > 0
    kv.close()
    assert fake_gpu.live and fake_gpu.reserved  # the buffer's views still use the memory
    buffer.kv_caches[0][0][:2].fill_(1.0)
    buffer.close()
    assert fake_gpu.live == set() and fake_gpu.reserved == {} and fake_gpu.retained == 0
    buffer.close()
    kv.close()
    with pytest.raises(RuntimeError, match="closed"):
        buffer.copy([])


def test_dropping_manager_and_buffer_without_close_frees_everything(fake_gpu: FakeDevice) -> None:
    kv = make_manager(lookahead=8)
    buffer = VirtualKVBuffer(kv.layout, kv.region)
    assert kv.allocate_slots(make_request("a", 10, max_tokens=20), 10)
    kv.wait_for_mapper()
    assert kv._mapper is not None
    thread = kv._mapper._thread
    del kv, buffer
    assert fake_gpu.live == set() and fake_gpu.reserved == {}  # refcounting alone: no cycle holds them
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_release_idle_pages_gives_handles_back_to_the_device(fake_gpu: FakeDevice) -> None:
    kv = make_idle_rows()
    assert kv.allocate_slots(make_request("big", 16), 16)  # reclaims 2 pages of the other idle row: reused at once
    assert len(kv.region._reservation.spare) == 0
    assert kv.release_idle_pages() == 2
    assert kv.physical_bytes == kv.num_committed_pages * PAGE == 8 * PAGE
    assert len(fake_gpu.live) == 8
    check_table(kv, fake_gpu)
    kv.close()


def test_the_buffer_refuses_copies_across_a_row(fake_gpu: FakeDevice) -> None:
    from kvos.core.plan import CopyKV

    kv = make_manager()
    buffer = VirtualKVBuffer(kv.layout, kv.region)
    row_tokens = kv.layout.row_tokens
    with pytest.raises(IndexError, match="cross the end of a row"):
        buffer.copy([CopyKV(row_tokens - 2, 0, 4)])
    with pytest.raises(IndexError, match="outside"):
        buffer.copy([CopyKV(0, 4 * row_tokens, 1)])
    with pytest.raises(IndexError, match="length"):
        buffer.contiguous_kv(0, slice(0, 1), row_tokens + 1)
    assert "VirtualKVBuffer(megacache" in repr(buffer)
    buffer.close()
    kv.close()
