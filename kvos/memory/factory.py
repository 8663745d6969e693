"""Sizing the KV budget and building the manager the config asks for."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kvos.config import CacheConfig
from kvos.memory.kv_manager import KVCacheManager
from kvos.memory.paged_kv_manager import PagedKVCacheManager

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVShape:
    """What one token of KV looks like for a model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


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


def make_kv_manager(cache: CacheConfig, shape: KVShape, max_num_seqs: int, max_model_len: int) -> KVCacheManager:
    budget = kv_budget_bytes(cache, shape.device)
    if cache.kv_cache == "virtual":
        from kvos.memory.virtual.virtual_kv_manager import VirtualKVCacheManager

        return VirtualKVCacheManager(
            budget_bytes=budget, shape=shape, max_num_seqs=max_num_seqs, max_model_len=max_model_len
        )
    num_blocks = budget // (shape.bytes_per_token * cache.block_size)
    if num_blocks < 1:
        raise ValueError(
            f"KV cache budget of {budget} bytes is below one block "
            f"({shape.bytes_per_token * cache.block_size} bytes); raise kv_cache_memory_bytes"
        )
    return PagedKVCacheManager(
        num_blocks=num_blocks,
        block_size=cache.block_size,
        num_layers=shape.num_layers,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        dtype=shape.dtype,
        device=shape.device,
        max_model_len=max_model_len,
        enable_prefix_caching=cache.enable_prefix_caching,
    )
