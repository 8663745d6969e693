"""The virtual KV cache against the process's real memory, with hand-built requests.

The page table claims which pages are committed; mincore and /proc/self/smaps
say what the kernel really backs. They must agree after every operation.
"""

from __future__ import annotations

import gc

import pytest
import torch

from kvos.core.request import Request
from kvos.memory.shape import KVShape
from kvos.memory.virtual import VirtualKVCacheManager
from kvos.memory.virtual.layout import LayoutKind
from kvos.sampling_params import SamplingParams
from kvos.worker.kv_cache import VirtualKVBuffer

# 2 layers x 2 KV heads x 64 x fp32: 2048 bytes per token, 2 tokens per 4 KiB page
# in the megacache, 8 tokens per page in each of the 4 per-layer planes.
SHAPE = KVShape(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, device=torch.device("cpu"))
PAGE = 4096
LAYOUTS: list[LayoutKind] = ["megacache", "per_layer"]


def make_manager(
    layout: LayoutKind = "megacache", budget_pages: int = 256, rows: int = 4, lookahead: int = 0
) -> VirtualKVCacheManager:
    return VirtualKVCacheManager(
        budget_bytes=budget_pages * PAGE,
        shape=SHAPE,
        max_num_seqs=rows,
        max_model_len=256,
        layout=layout,
        lookahead_tokens=lookahead,
    )


def make_request(req_id: str, num_prompt: int, max_tokens: int = 64) -> Request:
    return Request(
        req_id=req_id, prompt_token_ids=list(range(num_prompt)), params=SamplingParams(max_tokens=max_tokens)
    )


def prefill(kv: VirtualKVCacheManager, request: Request) -> None:
    assert kv.lookup_prefix(request) == 0
    assert kv.allocate_slots(request, request.num_tokens)
    request.num_computed_tokens = request.num_tokens


def decode(kv: VirtualKVCacheManager, request: Request, steps: int) -> None:
    for _ in range(steps):
        request.output_token_ids.append(0)
        assert kv.allocate_slots(request, 1)
        request.num_computed_tokens += 1


def buffer(kv: VirtualKVCacheManager) -> VirtualKVBuffer:
    """The worker's tensors over the manager's region."""
    return VirtualKVBuffer(kv.layout, kv.region)


def indices(kv: VirtualKVCacheManager, request: Request, num_tokens: int) -> torch.Tensor:
    """Flat slots of the request's first positions: its row's run (the worker's addressing rule)."""
    (row,) = kv.block_table(request)
    start = row * kv.table_block_size
    return torch.arange(start, start + num_tokens)


def check_page_map(kv: VirtualKVCacheManager) -> None:
    """Every page the table says is committed is resident, and no other page is."""
    expected = torch.zeros(kv.region.num_pages, dtype=torch.bool)
    for row, mapped in enumerate(kv.table.mapped):
        for page, count in kv.layout.page_runs(row, 0, mapped):
            expected[page : page + count] = True
    resident = kv.region.resident_pages(0, kv.region.num_pages)
    assert torch.equal(resident, expected), f"{int((resident != expected).sum())} pages disagree"
    assert kv.region.rss_bytes() == kv.num_committed_pages * PAGE == kv.committed_bytes


@pytest.mark.parametrize("layout", LAYOUTS)
def test_page_map_matches_resident_memory(layout: LayoutKind) -> None:
    kv = make_manager(layout)
    a, b = make_request("a", 37), make_request("b", 5)
    prefill(kv, a)
    prefill(kv, b)
    check_page_map(kv)
    decode(kv, a, 20)
    check_page_map(kv)
    assert (
        kv.num_used_blocks
        == kv.num_committed_pages
        == (kv.layout.pages_for(57) + kv.layout.pages_for(5)) * kv.layout.num_planes
    )
    kv.free(a)
    kv.free(b)
    kv.free(b)
    assert kv.num_used_blocks == 0
    assert kv.num_deferred_pages == kv.num_committed_pages > 0  # kept for the rows' next tenants
    check_page_map(kv)
    assert kv.release_idle_pages() > 0
    assert kv.num_committed_pages == 0
    check_page_map(kv)
    kv.close()


def test_decode_commits_one_page_when_crossing_a_page_boundary() -> None:
    kv = make_manager()
    a = make_request("a", 3)
    prefill(kv, a)
    committed = [kv.num_committed_pages]
    for _ in range(6):
        decode(kv, a, 1)
        committed.append(kv.num_committed_pages)
    # 2 tokens per page: 3..9 tokens need 2, 2, 3, 3, 4, 4, 5 pages.
    assert committed == [2, 2, 3, 3, 4, 4, 5]
    check_page_map(kv)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flat_indices_and_contiguous_views_address_the_same_memory(layout: LayoutKind) -> None:
    kv = make_manager(layout)
    a, b = make_request("a", 9), make_request("b", 4)
    prefill(kv, a)
    prefill(kv, b)
    buf = buffer(kv)
    for k_cache, v_cache in buf.kv_caches:
        for request in (a, b):
            idx = indices(kv, request, request.num_tokens)
            assert idx.tolist() == list(range(kv.kv_start(request), kv.kv_start(request) + request.num_tokens))
            k_cache[idx] = torch.randn(request.num_tokens, 2, 64)
            v_cache[idx] = torch.randn(request.num_tokens, 2, 64)
    for layer, (k_cache, v_cache) in enumerate(buf.kv_caches):
        for request in (a, b):
            row = kv.row_of(request)
            k, v = buf.contiguous_kv(layer, slice(row, row + 1), request.num_tokens)
            idx = indices(kv, request, request.num_tokens)
            assert k.shape == (1, request.num_tokens, 2, 64)
            assert torch.equal(k[0], k_cache[idx]) and torch.equal(v[0], v_cache[idx])
    assert not torch.equal(buf.kv_caches[0][0][indices(kv, a, 4)], buf.kv_caches[1][0][indices(kv, a, 4)])
    check_page_map(kv)  # writing through the views touched no page outside the map


def test_finished_rows_are_reused_best_fit_without_new_pages() -> None:
    kv = make_manager(rows=3)
    long, short = make_request("long", 40), make_request("short", 8)
    prefill(kv, long)
    prefill(kv, short)
    long_row, short_row = kv.row_of(long), kv.row_of(short)
    kv.free(long)
    kv.free(short)
    committed = kv.num_committed_pages
    c = make_request("c", 7)
    prefill(kv, c)
    assert kv.row_of(c) == short_row  # the tightest row already holding enough pages
    d = make_request("d", 30)
    prefill(kv, d)
    assert kv.row_of(d) == long_row
    assert kv.num_committed_pages == committed  # both served from deferred pages
    assert kv.num_deferred_pages == 0
    check_page_map(kv)


def test_pressure_reclaims_deferred_pages_and_failure_changes_nothing() -> None:
    kv = make_manager(budget_pages=30, rows=3)
    x, y, z = make_request("x", 30), make_request("y", 20), make_request("z", 10)  # 15 + 10 + 5 pages
    for request in (x, y, z):
        prefill(kv, request)
    x_row, y_row = kv.row_of(x), kv.row_of(y)
    kv.free(x)
    kv.free(y)
    assert kv.num_committed_pages == 30 and kv.num_deferred_pages == 25
    w = make_request("w", 40)  # 20 pages: x's 15 are reused, 5 come off the tail of y's idle row
    prefill(kv, w)
    assert kv.row_of(w) == x_row
    assert kv.table.mapped[y_row] == 5 and kv.table.num_reclaimed_pages == 5
    assert kv.num_committed_pages == 30
    check_page_map(kv)
    before = (list(kv.table.mapped), kv.num_committed_pages, kv.num_used_blocks)
    v = make_request("v", 12)  # 6 pages, but only y's 5 idle pages are left
    assert not kv.allocate_slots(v, 12)
    assert (list(kv.table.mapped), kv.num_committed_pages, kv.num_used_blocks) == before
    w.output_token_ids.append(0)
    assert not kv.allocate_slots(w, 1 + 10 * 2)  # w to 31 pages: over the budget, refused
    assert (list(kv.table.mapped), kv.num_committed_pages, kv.num_used_blocks) == before
    check_page_map(kv)


def test_fork_copies_the_parents_kv_into_its_own_row() -> None:
    kv = make_manager()
    parent, child = make_request("p", 11), make_request("c", 11)
    prefill(kv, parent)
    buf = buffer(kv)
    for k_cache, v_cache in buf.kv_caches:
        idx = indices(kv, parent, 11)
        k_cache[idx] = torch.randn(11, 2, 64)
        v_cache[idx] = torch.randn(11, 2, 64)
    allocation = kv.fork(parent, child, 11, 0)
    assert allocation is not None
    assert kv.row_of(child) != kv.row_of(parent)
    buf.copy(allocation.copies)  # what the worker does with the plan's copies
    for k_cache, v_cache in buf.kv_caches:
        assert torch.equal(k_cache[indices(kv, child, 11)], k_cache[indices(kv, parent, 11)])
        assert torch.equal(v_cache[indices(kv, child, 11)], v_cache[indices(kv, parent, 11)])
    check_page_map(kv)
    full = make_manager(rows=1)
    prefill(full, parent)
    assert full.fork(parent, child, 11, 0) is None  # no free row: the engine recomputes the prompt instead


def test_over_long_request_is_refused_with_lengths() -> None:
    kv = make_manager(budget_pages=64)  # 128 tokens of memory, 256 of context
    assert kv.capacity_tokens == 128
    kv.check_fits(128)
    with pytest.raises(ValueError, match=r"needs 129 tokens.*at most 128.*KV capacity 128"):
        kv.check_fits(129)
    roomy = make_manager(budget_pages=1024)
    with pytest.raises(ValueError, match=r"needs 300 tokens.*max_model_len 256"):
        roomy.check_fits(300)


def test_background_mapper_maps_ahead_within_the_request() -> None:
    kv = make_manager(lookahead=8)
    a = make_request("a", 5, max_tokens=100)
    prefill(kv, a)
    kv.wait_for_mapper()
    assert kv.table.mapped[kv.row_of(a)] == kv.layout.pages_for(5 + 8)
    assert kv.table.needed[kv.row_of(a)] == kv.layout.pages_for(5)
    check_page_map(kv)
    short = make_request("s", 5, max_tokens=2)
    prefill(kv, short)
    kv.wait_for_mapper()
    assert kv.table.mapped[kv.row_of(short)] == kv.layout.pages_for(7)  # never past its last token
    decode(kv, a, 3)
    kv.wait_for_mapper()
    assert kv.table.mapped[kv.row_of(a)] == kv.layout.pages_for(8 + 8)
    check_page_map(kv)
    kv.close()


def test_megacache_wastes_less_than_per_layer() -> None:
    waste = {}
    for layout in LAYOUTS:
        kv = make_manager(layout)
        for i, n in enumerate([5, 13, 21, 3]):
            prefill(kv, make_request(f"r{i}", n))
        waste[layout] = (kv.committed_bytes - kv.used_bytes) / kv.committed_bytes
        assert kv.used_bytes == 42 * SHAPE.bytes_per_token
    # at most half a page per request in the megacache; up to a page per plane per request per-layer
    assert waste["megacache"] < waste["per_layer"]


def test_static_reservation_commits_every_row_once() -> None:
    with pytest.raises(ValueError, match="static reservation of 4 rows x 256 tokens"):
        make_manager(budget_pages=256).commit_all_rows()
    kv = make_manager(budget_pages=512)
    kv.commit_all_rows()
    assert kv.num_committed_pages == 512 and kv.num_used_blocks == 0
    committed = kv.num_committed_pages
    prefill(kv, make_request("a", 100))
    assert kv.num_committed_pages == committed and kv.num_used_blocks == 128
    check_page_map(kv)


def test_a_forgotten_manager_stops_its_mapper_thread() -> None:
    kv = make_manager(lookahead=8)
    prefill(kv, make_request("a", 40))
    kv.wait_for_mapper()
    thread = kv._mapper._thread
    assert thread.is_alive()
    del kv
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()
