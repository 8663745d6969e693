"""Block accounting of the paged KV cache: allocation, prefix sharing, CoW, LRU eviction."""

from __future__ import annotations

import hashlib
import struct

import pytest

from kvos.core.plan import CopyKV
from kvos.core.request import Request
from kvos.memory.block_allocator import BlockAllocator, BlockRemoved, BlockStored
from kvos.memory.block_hash import root_hash
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.sampling_params import SamplingParams

BS = 4


def make_manager(num_blocks: int = 8, prefix_caching: bool = True) -> PagedKVCacheManager:
    return PagedKVCacheManager(
        num_blocks=num_blocks, block_size=BS, max_model_len=1000, enable_prefix_caching=prefix_caching
    )


def make_request(req_id: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(req_id=req_id, prompt_token_ids=tokens, params=SamplingParams(max_tokens=4), cache_salt=salt)


def admit(kv: PagedKVCacheManager, request: Request) -> int:
    """Allocate the whole prompt, then report the step that computed it as done."""
    cached = kv.lookup_prefix(request)
    assert kv.allocate_slots(request, request.num_tokens - cached, cached)
    request.num_computed_tokens = request.num_tokens
    kv.publish(request, request.num_tokens)
    kv.end_step()
    return cached


def slots(kv: PagedKVCacheManager, request: Request, num_tokens: int) -> list[int]:
    """Flat slots of the first `num_tokens` positions, by the addressing rule the worker applies."""
    table = kv.block_table(request)
    return [table[p // BS] * BS + p % BS for p in range(num_tokens)]


def test_allocate_and_free_returns_every_block() -> None:
    kv = make_manager()
    a = make_request("a", list(range(10)))
    admit(kv, a)
    assert kv.num_used_blocks == 3
    assert len(set(slots(kv, a, 10))) == 10
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


def test_lru_evicts_the_least_recently_freed_block_first() -> None:
    kv = make_manager(num_blocks=4)
    old, new = make_request("old", [1] * 4 + [0]), make_request("new", [2] * 4 + [0])
    admit(kv, old)
    admit(kv, new)
    kv.free(old)  # freed first: its cached block goes first
    kv.free(new)
    # Free list, oldest first: old's tail, old's head, new's tail, new's head.
    x = make_request("x", [3] * 4 + [0])
    assert kv.allocate_slots(x, 5)  # two blocks: old's, so old's cached head is evicted and new's is not
    assert kv.lookup_prefix(make_request("old2", [1] * 4 + [0])) == 0
    assert kv.lookup_prefix(make_request("new2", [2] * 4 + [0])) == 4
    y = make_request("y", [4] * 8)
    assert kv.allocate_slots(y, 8)
    assert kv.lookup_prefix(make_request("new3", [2] * 4 + [0])) == 0


def test_fork_shares_blocks_and_copies_partial_tail_on_write() -> None:
    kv = make_manager()
    parent = make_request("p", list(range(6)))
    admit(kv, parent)
    head, tail = kv.block_table(parent)
    assert kv.allocator.blocks[head].ref_count == 1
    child = make_request("c", list(range(6)))
    allocation = kv.fork(parent, child, num_tokens=5, num_new_tokens=1)
    assert allocation is not None
    new_head, new_tail = kv.block_table(child)
    # The full block is shared (two references); the partial one the child writes into is copied.
    assert new_head == head and kv.allocator.blocks[head].ref_count == 2
    assert new_tail != tail and kv.allocator.blocks[tail].ref_count == 1
    assert allocation.copies == [CopyKV(tail * BS, new_tail * BS, BS)]
    assert allocation.table_update is not None and list(allocation.table_update.block_ids) == [head, new_tail]
    kv.free(parent)
    kv.free(child)
    assert kv.num_used_blocks == 0


def test_failed_fork_changes_nothing() -> None:
    kv = make_manager(num_blocks=2)
    parent = make_request("p", list(range(6)))
    admit(kv, parent)
    child = make_request("c", list(range(6)))
    assert kv.fork(parent, child, num_tokens=5, num_new_tokens=1) is None  # no block left for the copy
    assert kv.block_table(child) == [] and kv.allocator.blocks[kv.block_table(parent)[0]].ref_count == 1


def test_check_fits_names_length_and_capacity() -> None:
    kv = make_manager(num_blocks=2)
    with pytest.raises(ValueError, match=r"needs 9 tokens.*at most 8"):
        kv.check_fits(9)


def test_block_allocator_refuses_zero_blocks() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockAllocator(0)


def test_blocks_are_findable_only_after_publish() -> None:
    kv = make_manager()
    a = make_request("a", list(range(9)))
    assert kv.allocate_slots(a, 9)
    kv.end_step()  # the step failed: nothing was published
    kv.free(a)
    assert kv.lookup_prefix(make_request("b", list(range(9)))) == 0
    assert kv.drain_events() == []


def test_block_identity_is_a_chained_sha256_rooted_in_the_model() -> None:
    kv = PagedKVCacheManager(num_blocks=8, block_size=BS, max_model_len=1000, model_identity="m")
    a = make_request("a", list(range(9)))
    admit(kv, a)
    root = root_hash("m", BS)
    h0 = hashlib.sha256(root + struct.pack("<4q", 0, 1, 2, 3)).digest()
    h1 = hashlib.sha256(h0 + struct.pack("<4q", 4, 5, 6, 7)).digest()
    assert kv.block_hashes(a) == [h0, h1]
    assert [type(e) for e in kv.drain_events()] == [BlockStored, BlockStored]
    # Another model's blocks never match.
    other = PagedKVCacheManager(num_blocks=8, block_size=BS, max_model_len=1000, model_identity="n")
    assert other.block_hashes(make_request("a", list(range(9))))[0] != h0


def test_cache_salt_keeps_tenants_apart() -> None:
    kv = make_manager()
    admit(kv, make_request("a", list(range(9)), salt="tenant-1"))
    assert kv.lookup_prefix(make_request("b", list(range(9)), salt="tenant-2")) == 0
    assert kv.lookup_prefix(make_request("c", list(range(9)))) == 0
    assert kv.lookup_prefix(make_request("d", list(range(9)), salt="tenant-1")) == 8


def test_eviction_is_reported_as_an_event() -> None:
    kv = make_manager(num_blocks=2)
    a = make_request("a", list(range(5)))
    admit(kv, a)
    kv.free(a)
    stored = kv.drain_events()
    assert len(stored) == 1 and isinstance(stored[0], BlockStored)
    assert kv.allocate_slots(make_request("b", [9] * 8), 8)
    (removed,) = kv.drain_events()
    assert removed == BlockRemoved(stored[0].block_hash, stored[0].block_id)


def decode_one(kv: PagedKVCacheManager, request: Request) -> None:
    """One decode step of `request`: a sampled token appended, its slot allocated, then published."""
    request.output_token_ids.append(7)
    assert kv.allocate_slots(request, 1) is not None
    request.num_computed_tokens += 1
    kv.publish(request, request.num_computed_tokens)
    kv.end_step()


def test_publish_walks_each_block_once_over_a_long_decode() -> None:
    kv = make_manager(num_blocks=32)
    a = make_request("a", list(range(6)))
    calls = []
    mark_cached = kv.allocator.mark_cached
    kv.allocator.mark_cached = lambda *args: (calls.append(args[0]), mark_cached(*args))  # type: ignore[method-assign]
    admit(kv, a)
    for _ in range(58):
        decode_one(kv, a)
    assert a.num_computed_tokens == 64
    # 16 full blocks, each published once, not again at every later step.
    assert calls == kv.block_table(a)
    assert kv.lookup_prefix(make_request("b", [*a.all_token_ids, 1])) == 64
    kv.free(a)
    assert kv._publish_cursor == {} and kv._unpublished == {}


def test_a_block_whose_digest_was_taken_is_published_once_the_holder_is_evicted() -> None:
    kv = make_manager(num_blocks=8)
    prompt = list(range(12))
    a = make_request("a", prompt)
    assert kv.allocate_slots(a, 4)  # a computes its prompt in chunks of one block
    a.num_computed_tokens = 4
    kv.publish(a, 4)
    kv.end_step()
    # b (same prompt) computes blocks 1 and 2 itself in the step where a computes block 1: b publishes first.
    b = make_request("b", [*prompt, 99])
    assert kv.allocate_slots(b, 9, kv.lookup_prefix(b))
    assert kv.allocate_slots(a, 4)
    b.num_computed_tokens = 13
    kv.publish(b, 13)
    a.num_computed_tokens = 8
    kv.publish(a, 8)
    kv.end_step()
    hashes = kv.block_hashes(a)
    assert kv.allocator.lookup(hashes[1]) == kv.block_table(b)[1]
    kv.free(b)
    d = make_request("d", [1000 + t for t in range(24)])
    assert kv.allocate_slots(d, 24)  # takes every free block: b's cached blocks are evicted
    kv.end_step()
    kv.free(d)
    assert kv.allocator.lookup(hashes[1]) is None
    assert kv.allocate_slots(a, 4)
    a.num_computed_tokens = 12
    kv.publish(a, 12)
    kv.end_step()
    # a's own block 1 now carries the digest, as a walk over every block would have done.
    assert [kv.allocator.lookup(h) for h in kv.block_hashes(a)] == kv.block_table(a)
    assert kv.lookup_prefix(make_request("c", [*prompt, 5])) == 12
    kv.free(a)
    assert kv.num_used_blocks == 0 and kv._publish_cursor == {} and kv._unpublished == {}


def test_a_duplicate_block_is_not_marked_again_while_its_holder_lives() -> None:
    # a and b plan the same 3-block prompt in one step: b finds a's first two blocks (pending) but computes the
    # last itself (a prefix hit stops short of the last token), and a publishes that digest first.
    kv = make_manager(num_blocks=32)
    prompt = list(range(3 * BS))
    a, b = make_request("a", list(prompt)), make_request("b", list(prompt))
    for request in (a, b):
        assert kv.allocate_slots(request, request.num_tokens, kv.lookup_prefix(request))
        request.num_computed_tokens = request.num_tokens
    for request in (a, b):
        kv.publish(request, request.num_tokens)
    kv.end_step()
    assert kv.block_table(b)[:2] == kv.block_table(a)[:2] and kv.block_table(b)[2] != kv.block_table(a)[2]
    assert kv._unpublished == {"b": [2]}
    calls: list[int] = []
    mark_cached = kv.allocator.mark_cached
    kv.allocator.mark_cached = lambda *args: (calls.append(args[0]), mark_cached(*args))  # type: ignore[method-assign]
    for _ in range(BS - 1):  # b decodes inside its fourth block: nothing fills, and a still holds the digest
        decode_one(kv, b)
    assert calls == []
    decode_one(kv, b)  # the fourth block fills: it alone is marked
    assert calls == [kv.block_table(b)[3]]
    kv.free(a)  # a's last prompt block stays cached, idle: b's still waits
    decode_one(kv, b)
    assert calls == [kv.block_table(b)[3]]
    d = make_request("d", [1000 + t for t in range(27 * BS)])
    assert kv.allocate_slots(d, d.num_tokens)  # takes every free block: a's idle cached block is evicted
    kv.end_step()
    decode_one(kv, b)  # b's own block takes the digest now, as a walk over every block would have
    assert calls == [kv.block_table(b)[3], kv.block_table(b)[2]]
    assert [kv.allocator.lookup(h) for h in kv.block_hashes(b)] == kv.block_table(b)[:4]
    kv.free(b)
    kv.free(d)
    assert kv.num_used_blocks == 0 and kv._unpublished == {}


def test_a_failed_step_leaves_its_blocks_to_be_marked_pending_again() -> None:
    kv = make_manager()
    a = make_request("a", list(range(5)))
    admit(kv, a)
    reader = make_request("r", [*range(8), 3])
    a.output_token_ids.extend([5, 6, 7])
    assert kv.allocate_slots(a, 3)  # fills block 1
    assert kv.lookup_prefix(reader) == 8  # pending: findable within the step
    kv.end_step(failed=True)
    assert kv.lookup_prefix(reader) == 4
    assert kv.allocate_slots(a, 3)  # the same tokens planned again
    assert kv.lookup_prefix(reader) == 8
    a.num_computed_tokens = 8
    kv.publish(a, 8)
    kv.end_step()
    assert kv.lookup_prefix(reader) == 8
    kv.free(a)
    assert kv.num_used_blocks == 0


def test_allocate_many_takes_what_one_by_one_allocation_takes() -> None:
    """Same ids in the same order, the same evictions reported, the same books left (the admission's batch take)."""
    books = []
    for batch in (False, True):
        allocator = BlockAllocator(6)
        first = [allocator.allocate() for _ in range(4)]
        for n, block_id in enumerate(first):
            allocator.mark_cached(block_id, bytes([n]), b"")
        for block_id in (first[2], first[0], first[3]):
            allocator.release(block_id)
        allocator.drain_events()
        taken = allocator.allocate_many(4) if batch else [allocator.allocate() for _ in range(4)]
        books.append((taken, allocator.drain_events(), list(allocator._free), dict(allocator._cached)))
        with pytest.raises(RuntimeError, match="not enough free KV blocks"):
            allocator.allocate_many(allocator.num_free_blocks + 1)
    assert books[0] == books[1]
    taken, events, free, cached = books[1]
    assert taken == [4, 5, 2, 0] and free == [3]
    assert [e.block_id for e in events] == [2, 0] and cached == {bytes([1]): 1, bytes([3]): 3}


def test_a_decode_inside_a_block_digests_nothing() -> None:
    """Digests are computed once per full block, when it fills: not re-checked at every step in between."""
    kv = make_manager(num_blocks=32)
    a = make_request("a", list(range(6)))
    admit(kv, a)
    calls = []
    block_hashes = kv.block_hashes
    kv.block_hashes = lambda request: (calls.append(request.num_tokens), block_hashes(request))[1]  # type: ignore[method-assign]
    for _ in range(10):
        decode_one(kv, a)
    # 7 to 16 tokens: a block fills at 8, 12 and 16 (asked by its pending mark, then by its publish).
    assert calls == [8, 8, 12, 12, 16, 16] and len(kv._block_hashes["a"]) == 4
    assert kv.lookup_prefix(make_request("b", [*a.all_token_ids, 1])) == 16
