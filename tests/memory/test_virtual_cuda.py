"""The CUDA region and the virtual KV manager on a real GPU, through each driver path.

Skipped without a GPU; scripts/gpu_check_virtual.py runs this file and counts
a skip as a failure, so on a lent GPU both paths must really run.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvos.memory.shape import KVShape
from kvos.memory.virtual import VirtualKVCacheManager, cuda_backend
from kvos.memory.virtual.cuda_backend import CudaRegion
from kvos.memory.virtual.region import RegionError
from kvos.worker.kv_cache import VirtualKVBuffer
from tests.memory.test_virtual_kv_manager import buffer, indices, make_manager, make_request, prefill

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(params=["bindings", "ctypes"])
def driver_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Regions opened in the test use only this driver path."""
    if request.param == "bindings":
        if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
            pytest.skip("cuda.bindings is not installed")
        monkeypatch.setattr(cuda_backend, "DRIVERS", (cuda_backend._BindingsDriver,))
    else:
        monkeypatch.setattr(cuda_backend, "DRIVERS", (cuda_backend._CtypesDriver,))
    return request.param


def test_region_maps_and_unmaps_pages(driver_path: str) -> None:
    region = CudaRegion(8 * 2**21, torch.device("cuda"))
    assert region.driver_name.startswith("cuda.bindings" if driver_path == "bindings" else "ctypes")
    assert region.num_physical_pages == 0  # the page mapped while the view was made is already back
    data = region.as_bytes()
    assert data.device.type == "cuda" and data.numel() == region.num_pages * region.page_size
    page = region.page_size
    region.commit([(2, 3)])
    data[2 * page : 5 * page].fill_(7)
    assert int(data[2 * page : 5 * page].sum()) == 7 * 3 * page
    region.release([(3, 2)])
    assert region.is_mapped(2) and not region.is_mapped(3)
    assert region.num_physical_pages == 3  # released pages stay in the pool
    region.commit([(6, 2)])
    assert region.num_physical_pages == 3
    data[6 * page : 8 * page].fill_(1)
    assert int(data[2 * page : 3 * page].sum()) == 7 * page  # page 2 kept its contents throughout
    region.release([(6, 2)])
    assert region.trim() == 2 and region.num_physical_pages == 1
    del data
    region.close()
    assert region.is_freed


def test_close_waits_for_the_last_view_and_then_frees_device_memory(driver_path: str) -> None:
    torch.cuda.synchronize()
    free_before, _ = torch.cuda.mem_get_info()
    region = CudaRegion(64 * 2**21, torch.device("cuda"))
    region.commit([(0, 32)])
    view = region.as_bytes()[: 32 * region.page_size]
    view.fill_(1)
    free_mapped, _ = torch.cuda.mem_get_info()
    assert free_before - free_mapped >= 32 * region.page_size
    region.close()
    assert not region.is_freed
    assert int(view[-1]) == 1  # still valid memory: the view holds the reservation
    with pytest.raises(RegionError, match="closed"):
        region.commit([(40, 1)])
    del view
    assert region.is_freed
    free_after, _ = torch.cuda.mem_get_info()
    assert free_after >= free_mapped + 32 * region.page_size - 2**21


def test_manager_matches_cpu_manager(driver_path: str) -> None:
    cpu = make_manager()
    gpu = VirtualKVCacheManager(
        budget_bytes=64 * 2**21,
        shape=KVShape(2, 2, 64, torch.bfloat16, torch.device("cuda")),
        max_num_seqs=4,
        max_model_len=256,
    )
    a, b = make_request("a", 37), make_request("b", 5)
    for kv in (cpu, gpu):
        a.num_computed_tokens = b.num_computed_tokens = 0
        prefill(kv, a)
        prefill(kv, b)
    cpu_buf, gpu_buf = buffer(cpu), buffer(gpu)

    def write_and_read_back() -> None:
        # In a function of its own: the layer views die with it, and with them their hold on the region.
        for (k_cpu, _), (k_gpu, _) in zip(cpu_buf.kv_caches, gpu_buf.kv_caches, strict=True):
            values = torch.randn(37, 2, 64)
            k_cpu[indices(cpu, a, 37)] = values
            k_gpu[indices(gpu, a, 37).cuda()] = values.to("cuda", torch.bfloat16)
            row = gpu.row_of(a)
            k_view, _ = gpu_buf.contiguous_kv(0, slice(row, row + 1), 37)
            assert k_view.device.type == "cuda"
            assert torch.equal(k_gpu[indices(gpu, a, 37).cuda()].cpu(), values.to(torch.bfloat16))

    write_and_read_back()
    gpu.free(a)
    gpu.free(b)
    assert gpu.num_used_blocks == 0
    assert gpu.physical_bytes >= gpu.num_committed_pages * gpu.layout.page_size
    gpu.close()
    gpu_buf.close()
    assert isinstance(gpu.region, CudaRegion) and gpu.region.is_freed


def test_a_dropped_manager_and_buffer_free_device_memory(driver_path: str) -> None:
    torch.cuda.synchronize()
    free_before, _ = torch.cuda.mem_get_info()
    kv = VirtualKVCacheManager(
        budget_bytes=64 * 2**21,
        shape=KVShape(2, 8, 128, torch.bfloat16, torch.device("cuda")),
        max_num_seqs=4,
        max_model_len=4096,
    )
    buf = VirtualKVBuffer(kv.layout, kv.region)
    prefill(kv, make_request("a", 4000, max_tokens=8))
    kv.wait_for_mapper()
    assert kv.physical_bytes > 0
    del kv, buf
    torch.cuda.synchronize()
    free_after, _ = torch.cuda.mem_get_info()
    assert free_after >= free_before - 2**21
