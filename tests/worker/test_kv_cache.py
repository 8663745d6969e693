"""The worker's KV buffers: the budget is a ceiling, not memory taken at start-up."""

from __future__ import annotations

import torch

from kvos.memory.shape import KVShape
from kvos.worker.kv_cache import PagedKVBuffer


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_a_paged_pool_takes_memory_only_as_blocks_are_written() -> None:
    shape = KVShape(num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.float32, device=torch.device("cpu"))
    num_slots = 2**16  # 4 layers x K,V x 64 Ki slots x 512 B = 256 MiB of budget
    before = rss_bytes()
    buffer = PagedKVBuffer(num_slots, shape)
    after_start = rss_bytes()
    assert after_start - before < 16 * 2**20  # nothing committed at start-up
    for k_cache, v_cache in buffer.kv_caches:
        k_cache[: num_slots // 2] = 1.0  # half the slots written in every layer
        v_cache[: num_slots // 2] = 1.0
    written = rss_bytes() - before
    assert 100 * 2**20 < written < 200 * 2**20  # about half of the 256 MiB, now resident
    buffer.close()
