"""The virtual KV cache's host tier, book by book: swap-out and swap-in move a row's tokens exactly,
the memory of every tier comes back, and the page map stays what the kernel really backs."""

from __future__ import annotations

import pytest
import torch

from kvos.config import CacheConfig
from kvos.core.request import Request
from kvos.memory.kv_manager import SwappingKVCacheManager, TierOps
from kvos.memory.virtual import VirtualKVCacheManager
from kvos.memory.virtual.layout import LayoutKind
from kvos.worker.kv_cache import HostKVPool, VirtualKVBuffer, make_host_pool
from tests.memory import test_virtual_cuda_fake
from tests.memory.fake_cuda import FakeDevice
from tests.memory.test_virtual_kv_manager import LAYOUTS, PAGE, SHAPE, buffer, check_page_map, make_request, prefill

HOST_BLOCK = 16
fake_gpu = test_virtual_cuda_fake.fake_gpu
"""Managers built in a test that asks for it get a CUDA region on a fake driver."""
BYTES_PER_TOKEN = 2048


def make_manager(
    layout: LayoutKind = "megacache", budget_pages: int = 256, rows: int = 4, host_blocks: int = 64
) -> VirtualKVCacheManager:
    return VirtualKVCacheManager(
        budget_bytes=budget_pages * PAGE,
        shape=SHAPE,
        max_num_seqs=rows,
        max_model_len=256,
        layout=layout,
        lookahead_tokens=0,
        host_bytes=host_blocks * HOST_BLOCK * BYTES_PER_TOKEN,
        host_block_size=HOST_BLOCK,
    )


def host_pool(kv: VirtualKVCacheManager) -> HostKVPool:
    pool = make_host_pool(kv, SHAPE)
    assert pool is not None and pool.block_size == kv.host_block_size == HOST_BLOCK
    return pool


def slots(kv: VirtualKVCacheManager, request: Request, num_tokens: int) -> slice:
    (row,) = kv.block_table(request)
    return slice(row * kv.table_block_size, row * kv.table_block_size + num_tokens)


def fill(buf: VirtualKVBuffer, kv: VirtualKVCacheManager, req: Request, first: int, last: int) -> list[torch.Tensor]:
    """Write random K and V at the request's positions [first, last) in every layer; return the values."""
    run = slots(kv, req, last)
    written = []
    for k, v in buf.kv_caches:
        for cache in (k, v):
            values = torch.randn(last - first, SHAPE.num_kv_heads, SHAPE.head_dim)
            cache[run.start + first : run.stop] = values
            written.append(values)
    return written


def read(buf: VirtualKVBuffer, kv: VirtualKVCacheManager, req: Request, first: int, last: int) -> list[torch.Tensor]:
    run = slots(kv, req, last)
    return [cache[run.start + first : run.stop].clone() for k, v in buf.kv_caches for cache in (k, v)]


def assert_all_back(kv: VirtualKVCacheManager) -> None:
    assert kv.host is not None
    assert kv.num_used_blocks == 0
    assert kv.host.num_held_blocks == 0 and kv.num_host_copies == 0
    assert not kv.table.draining and all(tenant is None for tenant in kv.table.tenant)
    assert kv.num_committed_pages <= kv.table.budget_pages


def swap_out(kv: VirtualKVCacheManager, pool: HostKVPool, buf: VirtualKVBuffer, request: Request) -> int:
    """Preempt by swap as the scheduler and worker do; returns how many blocks the saves wrote."""
    saves = kv.swap_out(request)
    assert saves is not None
    pool.save(buf.kv_caches, saves)
    request.num_swapped_tokens, request.num_computed_tokens = request.num_computed_tokens, 0
    return sum(op.num_blocks for op in saves)


def swap_in(kv: VirtualKVCacheManager, pool: HostKVPool, buf: VirtualKVBuffer, request: Request) -> int:
    """Resume with one new token; returns how many load ops came (the row's run travels as few copies)."""
    allocation = kv.allocate_slots(request, 1, num_cached_tokens=request.num_swapped_tokens)
    assert allocation is not None and allocation.table_update is not None
    pool.load(buf.kv_caches, allocation.loads)
    request.num_computed_tokens, request.num_swapped_tokens = request.num_swapped_tokens, 0
    return len(allocation.loads)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_swap_round_trip_restores_the_row_exactly(layout: LayoutKind) -> None:
    kv = make_manager(layout)
    buf, pool = buffer(kv), host_pool(kv)
    a = make_request("a", 37)
    prefill(kv, a)
    kv_a = fill(buf, kv, a, 0, 37)
    assert swap_out(kv, pool, buf, a) == 3  # 37 tokens: two full host blocks and a partial one
    assert kv.num_used_blocks == 0 and kv.host is not None and kv.host.num_held_blocks == 3
    kv.end_step()
    assert kv.release_idle_pages() > 0  # the old row's pages are gone: only the host copy is left
    check_page_map(kv)
    assert swap_in(kv, pool, buf, a) == 1  # one coalesced run of three blocks
    check_page_map(kv)  # the load wrote committed pages only
    for got, want in zip(read(buf, kv, a, 0, 37), kv_a, strict=True):
        assert torch.equal(got, want)
    assert kv.counters.blocks_swapped_out == kv.counters.blocks_swapped_in == 3
    kv.free(a)
    assert_all_back(kv)


def test_second_swap_out_writes_only_the_blocks_added_since() -> None:
    kv = make_manager()
    buf, pool = buffer(kv), host_pool(kv)
    a = make_request("a", 37)
    prefill(kv, a)
    first = fill(buf, kv, a, 0, 37)
    swap_out(kv, pool, buf, a)
    kv.end_step()
    swap_in(kv, pool, buf, a)
    kv.end_step()
    a.num_computed_tokens = 38  # the resumed step computed token 37
    for _ in range(20):
        a.output_token_ids.append(0)
        assert kv.allocate_slots(a, 1) is not None
        a.num_computed_tokens += 1
    later = fill(buf, kv, a, 37, 58)
    # Blocks 0 and 1 are full and held since the first swap-out; block 2 (partial then) and block 3 are new.
    assert swap_out(kv, pool, buf, a) == 2
    assert kv.counters.blocks_swapped_out == 5
    kv.end_step()
    kv.release_idle_pages()
    swap_in(kv, pool, buf, a)
    got = read(buf, kv, a, 0, 58)
    for whole, head, tail in zip(got, first, later, strict=True):
        assert torch.equal(whole[:37], head) and torch.equal(whole[37:], tail)
    kv.free(a)
    assert_all_back(kv)


def test_swapped_pages_make_room_at_once_but_stay_readable_until_the_step_ends() -> None:
    # 64 pages = 128 tokens: "a" holds 96, "b" cannot grow by 64 until "a" is swapped out.
    kv = make_manager(budget_pages=64)
    buf, pool = buffer(kv), host_pool(kv)
    a, b = make_request("a", 96), make_request("b", 16)
    prefill(kv, a)
    prefill(kv, b)
    kv_a = fill(buf, kv, a, 0, 96)
    b.output_token_ids.extend([0] * 64)
    assert kv.allocate_slots(b, 64) is None
    saves = kv.swap_out(a)
    assert saves is not None
    assert kv.allocate_slots(b, 64) is not None  # the same step: room made by the swap-out
    # The step's saves run after every allocation of the plan: "a"'s pages are still there to read.
    pool.save(buf.kv_caches, saves)
    assert kv.num_committed_pages > kv.table.budget_pages  # until the step ends, by "a"'s pages
    check_page_map(kv)
    kv.end_step()
    assert kv.num_committed_pages <= kv.table.budget_pages
    check_page_map(kv)
    kv.free(b)
    a.num_swapped_tokens, a.num_computed_tokens = 96, 0
    swap_in(kv, pool, buf, a)
    for got, want in zip(read(buf, kv, a, 0, 96), kv_a, strict=True):
        assert torch.equal(got, want)
    kv.free(a)
    assert_all_back(kv)


@pytest.mark.parametrize("device_pages", [None, 60])
def test_on_a_gpu_the_swapped_pages_go_back_to_the_device_when_the_step_ends(
    fake_gpu: FakeDevice, device_pages: int | None
) -> None:
    """CUDA semantics on the fake driver: the step's overshoot is unmapped and its handles released
    at `end_step`; a device too full for the overshoot refuses the allocation cleanly."""
    fake_gpu.capacity_pages = device_pages
    kv = make_manager(budget_pages=64)
    buf, pool = buffer(kv), host_pool(kv)
    a, b = make_request("a", 96), make_request("b", 16)
    prefill(kv, a)  # 48 pages
    prefill(kv, b)  # 8 pages
    kv_a = fill(buf, kv, a, 0, 96)
    b.output_token_ids.extend([0] * 64)
    saves = kv.swap_out(a)
    assert saves is not None
    grown = kv.allocate_slots(b, 64)  # 32 more pages, while a's 48 wait for the save
    assert (grown is None) == (device_pages is not None)
    pool.save(buf.kv_caches, saves)
    kv.end_step()
    test_virtual_cuda_fake.check_table(kv, fake_gpu)
    assert len(fake_gpu.live) <= kv.table.budget_pages and not fake_gpu.misuse
    kv.free(b)
    a.num_swapped_tokens, a.num_computed_tokens = 96, 0
    swap_in(kv, pool, buf, a)
    for got, want in zip(read(buf, kv, a, 0, 96), kv_a, strict=True):
        assert torch.equal(got, want)
    kv.free(a)
    assert_all_back(kv)
    buf.close()
    kv.close()


def test_abort_while_swapped_out_and_a_failed_step_give_everything_back() -> None:
    kv = make_manager()
    buf, pool = buffer(kv), host_pool(kv)
    a, b = make_request("a", 40), make_request("b", 20)
    prefill(kv, a)
    prefill(kv, b)
    swap_out(kv, pool, buf, a)
    kv.end_step()
    kv.free(a)  # aborted while its KV sat in the host tier
    # A step that swaps "b" out fails: the scheduler drops the host copy and the step ends failed.
    assert kv.swap_out(b) is not None
    kv.free(b)
    kv.end_step(failed=True)
    assert_all_back(kv)
    check_page_map(kv)
    kv.free(a)  # twice is safe
    assert_all_back(kv)


def test_a_swap_out_never_written_is_forgotten_and_its_request_named() -> None:
    kv = make_manager()
    a, b = make_request("a", 40), make_request("b", 20)
    prefill(kv, a)
    prefill(kv, b)
    saves = kv.swap_out(a)
    assert saves is not None and kv.swap_out(b) is not None
    kv.end_step()
    lost = saves[-1].host_block_id + saves[-1].num_blocks - 1  # a's last block: the worker reports it unwritten
    assert kv.lose_host_blocks([lost]) == ["a"]
    assert kv.num_host_copies == 1  # b's copy stands
    allocation = kv.allocate_slots(a, 40)  # as the scheduler has it: a computes its KV again, in a fresh row
    assert allocation is not None and not allocation.loads
    kv.free(a)
    kv.free(b)
    assert_all_back(kv)
    check_page_map(kv)


def test_swap_out_refuses_when_the_host_tier_is_full_and_changes_nothing() -> None:
    kv = make_manager(host_blocks=2)
    a = make_request("a", 40)
    prefill(kv, a)
    assert kv.swap_out(a) is None  # 3 blocks needed
    assert kv.block_table(a) and kv.host is not None and kv.host.num_held_blocks == 0
    kv.free(a)
    assert_all_back(kv)


def test_rows_grow_in_whole_host_blocks() -> None:
    kv = make_manager()
    a = make_request("a", 17)
    prefill(kv, a)
    (row,) = kv.block_table(a)
    assert kv.table.needed[row] == kv.layout.pages_for(32)  # the swap copies the last block whole
    assert kv.max_tokens_per_request % HOST_BLOCK == 0
    kv.free(a)


def test_the_virtual_cache_takes_a_host_tier_but_no_disk_tier() -> None:
    kv = make_manager()
    assert isinstance(kv, SwappingKVCacheManager)  # the scheduler swaps through this protocol
    assert kv.prefetch(make_request("a", 4)) is False and kv.take_tier_ops() == TierOps()
    CacheConfig(kv_cache="virtual", kv_offload_bytes=2**20, preemption_mode="swap")
    with pytest.raises(ValueError, match="no prefix cache"):
        CacheConfig(kv_cache="virtual", kv_disk_path="/tmp/kv", kv_disk_bytes=2**20)
    with pytest.raises(ValueError, match="below one host block"):
        make_manager(host_blocks=0)
