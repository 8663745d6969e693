"""Sizing the KV budget and building the manager (the books) the config asks for.

The worker builds the matching buffers (`kvos.worker.kv_cache.make_kv_buffer`)
from the same config and the manager's sizes.
"""

from __future__ import annotations

import logging

import torch

from kvos.config import CacheConfig
from kvos.memory.kv_manager import KVCacheManager
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.memory.shape import KVShape
from kvos.memory.tiers.disk import DiskBlockIndex
from kvos.memory.tiers.host import HostBlockPool

logger = logging.getLogger(__name__)


def available_memory_bytes(device: torch.device) -> int:
    """Memory the KV cache may take from: free device memory, or available host memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


# A fraction of free memory is rounded down to this: free memory drifts between
# runs, and a cache whose size does not lets `compile=True` take its graphs
# (specialised on the cache's shape) from Inductor's disk cache at start-up.
BUDGET_GRANULE_BYTES = 64 * 2**20


def kv_budget_bytes(cache: CacheConfig, device: torch.device) -> int:
    if cache.kv_cache_memory_bytes is not None:
        return cache.kv_cache_memory_bytes
    budget = int(available_memory_bytes(device) * cache.kv_cache_memory_fraction)
    return budget - budget % BUDGET_GRANULE_BYTES if budget >= BUDGET_GRANULE_BYTES else budget


def make_kv_manager(
    cache: CacheConfig,
    shape: KVShape,
    max_num_seqs: int,
    max_model_len: int,
    model_identity: str = "",
    disk: DiskBlockIndex | None = None,
) -> KVCacheManager:
    """`model_identity` roots the prefix cache's block digests (see `kvos.memory.block_hash`); `disk` is the disk
    tier's books, built from what the worker's store found in its directory."""
    budget = kv_budget_bytes(cache, shape.device)
    if cache.kv_cache == "virtual":
        from kvos.memory.virtual.virtual_kv_manager import VirtualKVCacheManager

        return VirtualKVCacheManager(
            budget_bytes=budget,
            shape=shape,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            host_bytes=cache.kv_offload_bytes,
            host_block_size=cache.block_size,
        )
    num_blocks = budget // (shape.bytes_per_token * cache.block_size)
    if num_blocks < 1:
        raise ValueError(
            f"KV cache budget of {budget} bytes is below one block "
            f"({shape.bytes_per_token * cache.block_size} bytes); raise kv_cache_memory_bytes"
        )
    host = None
    if cache.kv_offload_bytes is not None:
        num_host_blocks = cache.kv_offload_bytes // (shape.bytes_per_token * cache.block_size)
        if num_host_blocks < 1:
            raise ValueError(
                f"kv_offload_bytes of {cache.kv_offload_bytes} is below one block "
                f"({shape.bytes_per_token * cache.block_size} bytes)"
            )
        host = HostBlockPool(num_host_blocks)
    return PagedKVCacheManager(
        num_blocks=num_blocks,
        block_size=cache.block_size,
        max_model_len=max_model_len,
        enable_prefix_caching=cache.enable_prefix_caching,
        model_identity=f"{model_identity}|{shape.dtype}",
        host=host,
        disk=disk,
    )


def host_tier(manager: KVCacheManager) -> tuple[HostBlockPool, int] | None:
    """`manager`'s host tier books and tokens per host block, or None without a host tier."""
    from kvos.memory.virtual.virtual_kv_manager import VirtualKVCacheManager

    if isinstance(manager, PagedKVCacheManager) and manager.host is not None:
        return manager.host, manager.block_size
    if isinstance(manager, VirtualKVCacheManager) and manager.host is not None:
        return manager.host, manager.host_block_size
    return None
