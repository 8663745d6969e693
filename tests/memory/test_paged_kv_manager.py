"""Block accounting of the paged KV cache: allocation, prefix sharing, CoW, LRU eviction."""

from __future__ import annotations

import pytest
import torch

from kvos.engine.request import Request
from kvos.memory.block_allocator import BlockAllocator
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.sampling_params import SamplingParams

BS = 4


def make_manager(num_blocks: int = 8, prefix_caching: bool = True) -> PagedKVCacheManager:
    return PagedKVCacheManager(
        num_blocks=num_blocks,
        block_size=BS,
        num_layers=2,
        num_kv_heads=1,
        head_dim=2,
        dtype=torch.float32,
        device="cpu",
        max_model_len=1000,
        enable_prefix_caching=prefix_caching,
    )


def make_request(req_id: str, tokens: list[int]) -> Request:
    return Request(req_id=req_id, prompt_token_ids=tokens, params=SamplingParams(max_tokens=4))


def admit(kv: PagedKVCacheManager, request: Request) -> int:
    cached = kv.lookup_prefix(request)
    assert kv.allocate_slots(request, request.num_tokens - cached, cached)
    request.num_computed_tokens = request.num_tokens
    return cached


def test_allocate_and_free_returns_every_block() -> None:
    kv = make_manager()
    a = make_request("a", list(range(10)))
    admit(kv, a)
    assert kv.num_used_blocks == 3
    assert kv.kv_indices(a, 10).tolist() == [
        s for b in kv.block_table(a) for s in range(b * BS, b * BS + BS)
    ][:10]
    kv.free(a)
    kv.free(a)
    assert kv.num_used_blocks == 0


def test_out_of_blocks_returns_false_and_changes_nothing() -> None:
    kv = make_manager(num_blocks=2)
    a = make_request("a", list(range(12)))
    assert not kv.allocate_slots(a, 12)
    assert kv.num_used_blocks == 0
    assert kv.block_table(a) == []


def test_shared_prefix_is_reused_and_counted() -> None:
    kv = make_manager()
    a = make_request("a", list(range(10)))
    b = make_request("b", list(range(8)) + [99, 98, 97])
    assert admit(kv, a) == 0
    assert admit(kv, b) == 8
    assert kv.block_table(a)[:2] == kv.block_table(b)[:2]
    assert kv.num_used_blocks == 3 + 1
    assert kv.prefix_cache_stats() == (21, 8)
    kv.free(a)
    kv.free(b)
    assert kv.num_used_blocks == 0


def test_full_prompt_hit_still_computes_one_token() -> None:
    kv = make_manager()
    admit(kv, make_request("a", list(range(8))))
    b = make_request("b", list(range(8)))
    assert kv.lookup_prefix(b) == 4


def test_freed_cached_blocks_are_hit_then_evicted_lru() -> None:
    kv = make_manager(num_blocks=4)
    a = make_request("a", list(range(9)))
    admit(kv, a)
    kv.free(a)
    assert kv.num_used_blocks == 0
    b = make_request("b", list(range(8)) + [50])
    assert admit(kv, b) == 8
    kv.free(b)
    # A request needing all four blocks evicts the cached prefix.
    c = make_request("c", [7] * 16)
    assert kv.allocate_slots(c, 16)
    assert kv.lookup_prefix(make_request("d", list(range(9)))) == 0
    kv.free(c)
    assert kv.num_used_blocks == 0


def test_fork_shares_blocks_and_copies_partial_tail_on_write() -> None:
    kv = make_manager()
    parent = make_request("p", list(range(6)))
    admit(kv, parent)
    k0 = kv.kv_caches[0][0]
    tail = kv.block_table(parent)[1]
    k0[tail * BS : tail * BS + 2] = 5.0
    child = make_request("c", list(range(6)))
    assert kv.fork(parent, child)
    child.num_computed_tokens = 6
    assert kv.block_table(child) == kv.block_table(parent)
    child.output_token_ids.append(1)
    assert kv.allocate_slots(child, 1)
    new_tail = kv.block_table(child)[1]
    assert new_tail != tail
    assert kv.block_table(child)[0] == kv.block_table(parent)[0]
    assert torch.equal(k0[new_tail * BS : new_tail * BS + 2], k0[tail * BS : tail * BS + 2])
    kv.free(parent)
    kv.free(child)
    assert kv.num_used_blocks == 0


def test_check_fits_names_length_and_capacity() -> None:
    kv = make_manager(num_blocks=2)
    with pytest.raises(ValueError, match=r"needs 9 tokens.*at most 8"):
        kv.check_fits(9)


def test_block_allocator_refuses_zero_blocks() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockAllocator(0)
