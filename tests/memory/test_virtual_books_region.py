"""The books-only region: the virtual cache's page accounting for any size of cache, with no memory."""

from __future__ import annotations

import pytest
import torch

from kvos.core.request import Request
from kvos.memory.shape import KVShape
from kvos.memory.virtual.books_region import BooksRegion
from kvos.memory.virtual.region import RegionError
from kvos.memory.virtual.virtual_kv_manager import VirtualKVCacheManager
from kvos.sampling_params import SamplingParams

MiB = 2**20


def test_books_count_committed_pages_and_refuse_what_the_page_table_would_never_do() -> None:
    region = BooksRegion(10 * 4096 + 1, 4096)
    assert region.num_pages == 11
    region.commit([(0, 3), (7, 2)])
    assert region.num_physical_pages == 5
    with pytest.raises(RegionError, match=r"\[2\] are already committed"):
        region.commit([(2, 1)])
    with pytest.raises(RegionError, match=r"\[3\] are not committed"):
        region.release([(1, 3)])
    assert region.num_physical_pages == 5  # a refused call changes nothing
    with pytest.raises(IndexError):
        region.commit([(10, 2)])
    region.release([(0, 3)])
    assert region.num_physical_pages == 2
    view = region.as_bytes()
    assert view.device.type == "meta" and view.numel() == 11 * 4096
    region.close()
    with pytest.raises(RegionError, match="closed"):
        region.commit([(0, 1)])


def test_a_gpu_sized_cache_keeps_its_books_here_without_memory() -> None:
    """A Llama-3-8B-shaped cache of 64 GiB in 2 MiB pages (more than this machine has) on books alone: a
    request's pages are ceil(tokens x bytes per token / page), its look-ahead included, and freeing it keeps
    them for the row's next tenant."""
    shape = KVShape(32, 8, 128, torch.bfloat16, torch.device("meta"))
    bytes_per_token = 2 * 32 * 8 * 128 * 2
    kv = VirtualKVCacheManager(
        budget_bytes=64 * 2**30, shape=shape, max_num_seqs=16, max_model_len=8192, books_page_size=2 * MiB
    )
    request = Request("r", list(range(5000)), SamplingParams(max_tokens=100))
    assert kv.allocate_slots(request, 5000) is not None
    pages = -(-(5000 + kv.lookahead_tokens) * bytes_per_token // (2 * MiB))
    assert kv.num_used_blocks == pages
    assert kv.physical_bytes == pages * 2 * MiB
    assert kv.num_free_blocks == 64 * 2**30 // (2 * MiB) - pages
    kv.free(request)
    assert kv.num_used_blocks == 0 and kv.num_deferred_pages == pages
    kv.close()
