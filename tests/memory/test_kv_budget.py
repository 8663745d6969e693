"""The KV budget: explicit bytes as given, a fraction of free memory rounded to a stable size."""

from __future__ import annotations

import torch

from kvos.config import CacheConfig
from kvos.memory import factory


def test_explicit_bytes_are_used_as_given() -> None:
    assert factory.kv_budget_bytes(CacheConfig(kv_cache_memory_bytes=123_457), torch.device("cpu")) == 123_457


def test_a_fraction_of_free_memory_is_stable_while_free_memory_drifts(monkeypatch) -> None:
    """Two start-ups 30 MiB of free memory apart get the same cache, rounded down to 64 MiB."""
    cache = CacheConfig(kv_cache_memory_fraction=0.1)
    sizes = []
    for free in (22_000 * 2**20, 22_030 * 2**20):
        monkeypatch.setattr(factory, "available_memory_bytes", lambda device, free=free: free)
        sizes.append(factory.kv_budget_bytes(cache, torch.device("cpu")))
    assert sizes[0] == sizes[1] == 2176 * 2**20  # 2200 MiB rounded down to a multiple of 64 MiB


def test_a_small_fraction_is_not_rounded_to_zero(monkeypatch) -> None:
    monkeypatch.setattr(factory, "available_memory_bytes", lambda device: 100 * 2**20)
    assert factory.kv_budget_bytes(CacheConfig(kv_cache_memory_fraction=0.5), torch.device("cpu")) == 50 * 2**20
