"""The host region: reserving costs no memory, commit and release move real pages."""

from __future__ import annotations

import torch

from kvos.memory.virtual.host_backend import HostRegion

GIB = 2**30


def resident(region: HostRegion) -> list[int]:
    return region.resident_pages(0, region.num_pages).nonzero().flatten().tolist()


def test_reserving_a_large_range_commits_nothing() -> None:
    region = HostRegion(64 * GIB)  # far beyond this machine's memory: address space only
    assert region.num_pages == 64 * GIB // region.page_size
    assert region.rss_bytes() == 0
    region.commit([(5, 2)])
    assert region.rss_bytes() == 2 * region.page_size
    region.close()
    assert region.rss_bytes() == 0


def test_commit_and_release_exact_pages_and_data_survives_in_between() -> None:
    region = HostRegion(16 * 4096)
    page = region.page_size
    data = region.as_bytes()
    region.commit([(3, 4)])
    assert resident(region) == [3, 4, 5, 6]
    data[3 * page : 7 * page] = 9
    region.release([(4, 2)])
    assert resident(region) == [3, 6]
    assert int(data[3 * page : 4 * page].sum()) == 9 * page
    assert int(data[6 * page : 7 * page].sum()) == 9 * page
    region.commit([(4, 1)])
    assert int(data[4 * page : 5 * page].sum()) == 0  # released pages come back zeroed
    assert resident(region) == [3, 4, 6]


def test_touching_fallback_commits_the_same_pages() -> None:
    region = HostRegion(8 * 4096)
    region._can_populate = False  # what a kernel without MADV_POPULATE_WRITE gets
    region.commit([(1, 3)])
    assert resident(region) == [1, 2, 3]


def test_views_of_the_range_do_not_touch_it() -> None:
    region = HostRegion(1024 * 4096)
    grid = region.as_bytes().view(torch.float32).view(1024, 1024)
    rows = grid[::2, :7]
    assert rows.shape == (512, 7)
    assert resident(region) == []
