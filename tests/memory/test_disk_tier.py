"""Disk tier books: write-back below the pool or the host tier, prefetch of a waiting request's prefix,
the worker's report, and a failed step forgetting what it planned to publish below the pool."""

from __future__ import annotations

from kvos.core.plan import LoadFromDisk, SaveToDisk
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.memory.tiers.disk import DiskBlockIndex
from kvos.memory.tiers.host import HostBlockPool
from tests.memory.test_host_tier import BS, make_request, run_prompt


def make_manager(num_blocks: int = 2, num_host_blocks: int = 0, num_disk_blocks: int = 8) -> PagedKVCacheManager:
    return PagedKVCacheManager(
        num_blocks=num_blocks,
        block_size=BS,
        max_model_len=1000,
        host=HostBlockPool(num_host_blocks) if num_host_blocks else None,
        disk=DiskBlockIndex(num_disk_blocks),
    )


def test_without_a_host_tier_evicted_blocks_go_straight_to_disk() -> None:
    kv = make_manager()
    a = make_request("a", list(range(8)))
    run_prompt(kv, a)
    kv.free(a)  # free list [1, 0], both cached
    b = make_request("b", list(range(100, 108)))
    kv.allocate_slots(b, 8)
    ops = kv.take_tier_ops()
    keys = kv.block_hashes_of(list(range(8)))
    assert ops.disk_saves == [SaveToDisk("primary", 1, keys[1]), SaveToDisk("primary", 0, keys[0])]
    assert keys[0] in kv.disk and keys[1] in kv.disk  # type: ignore[operator]
    assert kv.counters.blocks_to_disk == 2


def test_a_waiting_request_prefetches_its_disk_prefix_and_finds_only_checked_blocks() -> None:
    kv = make_manager(num_blocks=4, num_host_blocks=2)
    keys = kv.block_hashes_of(list(range(12)))
    kv.disk = DiskBlockIndex(8, keys)  # as a restarted engine finds them
    r = make_request("r", list(range(12)) + [99])
    assert kv.tier_hits(r) == {"primary": 0, "host": 0, "disk": 12}
    assert kv.lookup_prefix(r) == 0  # nothing usable yet: disk blocks must be loaded first
    assert kv.prefetch(r)
    ops = kv.take_tier_ops()
    # The host tier has room for two: those load now, the third is recomputed.
    assert [(op.key, op.tier) for op in ops.disk_loads] == [(keys[0], "host"), (keys[1], "host")]
    assert all(isinstance(op, LoadFromDisk) for op in ops.disk_loads)
    # The worker found the second file corrupted.
    kv.apply_disk_report([keys[0]], {keys[1]: "checksum mismatch"}, {})
    kv.end_step()
    assert keys[1] not in kv.disk and kv.counters.disk_corrupted == 1  # type: ignore[operator]
    assert not kv.prefetch(r)  # once per admission
    cached, allocation = run_prompt(kv, r)
    assert cached == 4 and len(allocation.loads) == 1  # the checked block, host -> pool
    assert kv.counters.disk_hit_tokens == 4 and kv.counters.host_hit_tokens == 0  # counted once, as disk
    kv.free(r)
    assert kv.num_used_blocks == 0 and kv.host is not None and kv.host.num_held_blocks == 0


def test_aborting_a_request_that_prefetched_gives_back_what_it_held() -> None:
    kv = make_manager(num_blocks=4)
    keys = kv.block_hashes_of(list(range(8)))
    kv.disk = DiskBlockIndex(8, keys)
    r = make_request("r", list(range(8)) + [1])
    assert kv.prefetch(r)
    assert kv.num_used_blocks == 2  # load targets in the pool, held for r
    kv.apply_disk_report(keys, {}, {})
    kv.end_step()
    kv.free(r)
    assert kv.num_used_blocks == 0
    assert kv.allocator.num_idle_cached_blocks == 2  # the checked blocks stay findable


def test_a_prefetch_never_evicts_the_files_it_is_about_to_read() -> None:
    """The disk tier is full with r's two prefix blocks, the pool full of another prompt's cached blocks.
    Taking a pool block to read r's first file into writes that pool block's KV to disk, and a full disk
    drops its oldest file to make room: never one of those r reads this step (it would read back missing)."""
    kv = make_manager(num_blocks=2, num_disk_blocks=2)
    keys = kv.block_hashes_of(list(range(8)))
    kv.disk = DiskBlockIndex(2, [keys[1], keys[0]])  # keys[1] the oldest
    a = make_request("a", list(range(100, 108)))
    run_prompt(kv, a)
    kv.free(a)  # both pool blocks cached and idle
    r = make_request("r", list(range(8)) + [1])
    assert kv.prefetch(r)
    ops = kv.take_tier_ops()
    assert [op.key for op in ops.disk_loads] == keys
    assert not set(ops.disk_drops) & set(keys) and keys[0] in kv.disk and keys[1] in kv.disk  # type: ignore[operator]


def test_a_failed_write_stops_the_tier_taking_blocks() -> None:
    kv = make_manager()
    a = make_request("a", list(range(8)))
    run_prompt(kv, a)
    kv.free(a)
    kv.allocate_slots(make_request("b", list(range(100, 108))), 8)
    saves = kv.take_tier_ops().disk_saves
    kv.apply_disk_report([], {}, {saves[0].key: "OSError: [Errno 28] No space left on device"})
    kv.end_step()
    assert kv.disk is not None and not kv.disk.accepting
    assert saves[0].key not in kv.disk and kv.counters.disk_write_failures == 1
    assert kv.disk.add(b"x" * 32) is None


def test_a_failed_step_forgets_what_it_planned_to_publish_in_the_host_and_disk_tiers() -> None:
    kv = make_manager(num_blocks=2, num_host_blocks=1)
    a = make_request("a", list(range(8)))
    run_prompt(kv, a)
    kv.free(a)
    keys = kv.block_hashes_of(list(range(8)))
    b = make_request("b", list(range(100, 108)))
    allocation = kv.allocate_slots(b, 8)
    assert allocation is not None and allocation.saves  # a block written back to the host tier...
    assert kv.take_tier_ops().disk_saves  # ...and one to disk
    host = kv.host
    assert host is not None and any(host.lookup(k) is not None for k in keys)
    kv.end_step(failed=True)  # the worker raised: those saves may never have run
    assert all(host.lookup(k) is None for k in keys)
    assert all(k not in kv.disk for k in keys)  # type: ignore[operator]
    kv.free(b)
    assert kv.num_used_blocks == 0 and host.num_held_blocks == 0


def test_a_request_waits_until_every_disk_read_is_reported_across_steps() -> None:
    kv = make_manager(num_blocks=4)
    keys = kv.block_hashes_of(list(range(8)))
    kv.disk = DiskBlockIndex(8, keys)
    r = make_request("r", list(range(8)) + [1])
    assert kv.prefetch(r)
    kv.take_tier_ops()
    kv.end_step()  # the copy thread has not finished the reads: no report yet
    assert kv.prefetch(r) and kv.lookup_prefix(r) == 0  # still waiting
    kv.apply_disk_report([keys[0]], {}, {})
    kv.end_step()
    assert kv.prefetch(r)  # the second read is still out
    kv.apply_disk_report([keys[1]], {}, {})
    assert not kv.prefetch(r) and kv.lookup_prefix(r) == 8


def test_a_read_that_lands_after_its_request_ended_keeps_its_block_until_reported() -> None:
    kv = make_manager(num_blocks=3)
    keys = kv.block_hashes_of(list(range(8)))
    kv.disk = DiskBlockIndex(8, keys)
    r = make_request("r", list(range(8)) + [1])
    assert kv.prefetch(r)
    kv.take_tier_ops()
    kv.end_step()
    kv.free(r)  # aborted while its reads run
    assert kv.num_used_blocks == 2  # the targets are still being written: nobody else may take them
    kv.apply_disk_report([keys[0]], {keys[1]: "missing"}, {})
    assert kv.num_used_blocks == 0
    assert kv.allocator.lookup(keys[0]) is not None and kv.allocator.lookup(keys[1]) is None
