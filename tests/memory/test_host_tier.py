"""Host tier books: write-back on eviction, prefix lookup across tiers, swap out and in, no leaks."""

from __future__ import annotations

import pytest

from kvos.core.plan import LoadFromHost, SaveToHost, TableUpdate, coalesce_loads, coalesce_saves
from kvos.core.request import Request
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.memory.tiers.host import HostBlockPool
from kvos.sampling_params import SamplingParams

BS = 4


def make_manager(num_blocks: int = 2, num_host_blocks: int = 4, prefix_caching: bool = True) -> PagedKVCacheManager:
    return PagedKVCacheManager(
        num_blocks=num_blocks,
        block_size=BS,
        max_model_len=1000,
        enable_prefix_caching=prefix_caching,
        host=HostBlockPool(num_host_blocks),
    )


def make_request(req_id: str, tokens: list[int]) -> Request:
    return Request(req_id=req_id, prompt_token_ids=tokens, params=SamplingParams(max_tokens=4))


def run_prompt(kv: PagedKVCacheManager, request: Request):
    """Allocate what the prompt needs after its prefix hits, then report the step done."""
    cached = kv.lookup_prefix(request)
    allocation = kv.allocate_slots(request, request.num_tokens - cached, cached)
    assert allocation is not None
    request.num_computed_tokens = request.num_tokens
    kv.publish(request, request.num_tokens)
    kv.end_step()
    return cached, allocation


def assert_baseline(kv: PagedKVCacheManager) -> None:
    assert kv.num_used_blocks == 0
    assert kv.host is not None and kv.host.num_held_blocks == 0
    assert kv.num_host_copies == 0


def test_evicting_a_cached_block_writes_it_back_to_the_host_tier_first() -> None:
    kv = make_manager()
    a = make_request("a", list(range(8)))
    run_prompt(kv, a)
    kv.free(a)  # tail first: the free list is now [1, 0], both cached
    b = make_request("b", list(range(100, 108)))
    _, allocation = run_prompt(kv, b)
    assert allocation.saves == [SaveToHost(1, 0), SaveToHost(0, 1)]
    assert kv.counters.blocks_demoted == 2
    assert kv.host is not None and kv.host.num_idle_cached_blocks == 2 and kv.host.num_held_blocks == 0
    kv.free(b)
    assert_baseline(kv)


def test_write_back_skips_blocks_the_host_tier_already_holds() -> None:
    kv = make_manager(num_blocks=2, num_host_blocks=4)
    a, b = make_request("a", list(range(8))), make_request("b", list(range(100, 108)))
    run_prompt(kv, a)
    kv.free(a)
    run_prompt(kv, b)  # a's two blocks go down to the host tier
    kv.free(b)
    a2 = make_request("a2", list(range(8)))
    cached, allocation = run_prompt(kv, a2)  # a's first block comes back up; b's two go down
    assert cached == 4 and len(allocation.loads) == 1
    assert kv.counters.blocks_demoted == 4
    kv.free(a2)
    c = make_request("c", list(range(200, 208)))
    _, allocation = run_prompt(kv, c)  # evicts a's two blocks again: the host tier holds both already
    assert allocation.saves == []
    assert kv.counters.blocks_demoted == 4


def test_prefix_lookup_spans_tiers_and_counts_hits_per_tier() -> None:
    kv = make_manager(num_blocks=3, num_host_blocks=4)
    a = make_request("a", list(range(8)))
    run_prompt(kv, a)
    kv.free(a)  # free list [2, 1, 0]: block 2 was never used, then a's tail, then a's head
    # b takes blocks 2 and 1: a's second block is written back, its first stays in the pool.
    b = make_request("b", list(range(100, 108)))
    _, allocation = run_prompt(kv, b)
    assert allocation.saves == [SaveToHost(1, 0)]
    kv.free(b)
    a2 = make_request("a2", list(range(8)) + [8])
    assert kv.lookup_prefix(a2) == 8
    cached, allocation = run_prompt(kv, a2)
    assert cached == 8 and a2.num_tokens == 9
    table = kv.block_table(a2)
    assert table[0] == 0  # primary hit: the very block
    assert allocation.loads == [LoadFromHost(0, table[1])]  # host hit: a fresh block, loaded
    assert allocation.table_update == TableUpdate(0, tuple(table))
    assert kv.counters.primary_hit_tokens == 4 and kv.counters.host_hit_tokens == 4
    assert kv.prefix_cache_stats() == (8 + 8 + 9, 8)
    kv.free(a2)
    assert_baseline(kv)
    assert kv.host is not None and kv.host.num_idle_cached_blocks >= 1  # the host copy is kept, as cache


def test_host_hits_are_pinned_until_the_step_ends() -> None:
    kv = make_manager(num_blocks=2, num_host_blocks=2)
    a = make_request("a", list(range(8)))
    run_prompt(kv, a)
    kv.free(a)
    b = make_request("b", list(range(100, 108)))
    run_prompt(kv, b)
    kv.free(b)
    host = kv.host
    assert host is not None
    a2 = make_request("a2", list(range(4)) + [50])
    cached = kv.lookup_prefix(a2)
    assert cached == 4
    assert kv.allocate_slots(a2, 1, cached) is not None
    (pinned,) = [b.host_block_id for b in host.blocks if b.ref_count > 0]
    kv.end_step()
    assert host.blocks[pinned].ref_count == 0


def test_swap_out_saves_the_partial_tail_and_swap_in_loads_it_back() -> None:
    kv = make_manager(num_blocks=4, num_host_blocks=4, prefix_caching=False)
    r = make_request("r", list(range(6)))
    run_prompt(kv, r)
    table = kv.block_table(r)
    saves = kv.swap_out(r)
    assert saves == coalesce_saves([SaveToHost(table[0], 0), SaveToHost(table[1], 1)])
    assert kv.num_used_blocks == 0 and kv.block_table(r) == []
    assert kv.host is not None and kv.host.num_held_blocks == 2
    r.output_token_ids.append(7)  # the token sampled before the swap, still to compute
    allocation = kv.allocate_slots(r, 1, 6)
    assert allocation is not None and allocation.table_update is not None
    new_table = list(allocation.table_update.block_ids)
    assert len(new_table) == 2
    assert allocation.loads == coalesce_loads([LoadFromHost(0, new_table[0]), LoadFromHost(1, new_table[1])])
    assert kv.host.num_held_blocks == 2  # the host copy is kept while it runs
    kv.end_step()
    kv.free(r)
    assert_baseline(kv)


def test_second_swap_out_writes_only_blocks_changed_since_the_swap_in() -> None:
    kv = make_manager(num_blocks=4, num_host_blocks=4, prefix_caching=False)
    r = make_request("r", list(range(6)))
    run_prompt(kv, r)
    assert kv.swap_out(r) is not None  # block 0 full, block 1 holds 2 of 4 tokens
    r.output_token_ids.extend([7, 8, 9])
    assert kv.allocate_slots(r, 3, 6) is not None
    r.num_computed_tokens = 9
    kv.end_step()
    table = kv.block_table(r)
    saves = kv.swap_out(r)
    # Block 0 is unchanged in the host tier; the old partial tail is rewritten in place; block 2 is new.
    assert saves == [SaveToHost(table[1], 1), SaveToHost(table[2], 2)] or saves == [SaveToHost(table[1], 1, 2)]
    assert kv.counters.blocks_swapped_out == 2 + 2
    kv.free(r)
    kv.free(r)  # twice is safe
    assert_baseline(kv)


def test_swap_out_shares_full_blocks_the_host_tier_already_holds() -> None:
    kv = make_manager(num_blocks=4, num_host_blocks=4)
    a = make_request("a", list(range(8)))
    run_prompt(kv, a)
    assert kv.swap_out(a) is not None
    a_copy_blocks = kv.host.num_held_blocks if kv.host else 0
    b = make_request("b", list(range(8)) + [9])
    cached, _ = run_prompt(kv, b)  # the swap-out indexed a's full blocks: b finds them in the host tier
    assert cached == 8
    tail = kv.block_table(b)[2]
    saves = kv.swap_out(b)
    assert saves is not None and [s.block_id for s in saves] == [tail]
    assert kv.host is not None and kv.host.num_held_blocks == a_copy_blocks + 1  # only b's partial tail is new
    kv.free(a)
    kv.free(b)
    assert_baseline(kv)


def test_swap_out_without_room_in_the_host_tier_changes_nothing() -> None:
    kv = make_manager(num_blocks=4, num_host_blocks=1, prefix_caching=False)
    r = make_request("r", list(range(6)))
    run_prompt(kv, r)
    table = kv.block_table(r)
    assert kv.swap_out(r) is None
    assert kv.block_table(r) == table and kv.num_host_copies == 0
    kv.free(r)
    assert_baseline(kv)


def test_host_pool_refuses_double_free() -> None:
    host = HostBlockPool(2)
    block = host.allocate()
    host.release(block)
    with pytest.raises(RuntimeError, match="double free"):
        host.release(block)


def test_coalescing_merges_runs_contiguous_on_both_sides() -> None:
    saves = [SaveToHost(3, 7), SaveToHost(4, 8), SaveToHost(6, 9), SaveToHost(7, 10)]
    assert coalesce_saves(saves) == [SaveToHost(3, 7, 2), SaveToHost(6, 9, 2)]
    loads = [LoadFromHost(0, 5), LoadFromHost(1, 6), LoadFromHost(3, 7)]
    assert coalesce_loads(loads) == [LoadFromHost(0, 5, 2), LoadFromHost(3, 7)]
