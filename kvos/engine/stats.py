"""A snapshot of the engine's counters, for logs and /metrics."""

from __future__ import annotations

from dataclasses import dataclass

MAX_TENANTS_REPORTED = 10
"""Tenants named in stats (the most served); the rest are summed as "other", so /metrics stays small."""


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_seq_slots: int
    """Running slots free under max_num_seqs: waiting requests the next step can admit."""
    num_used_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_prompt_tokens: int
    num_generation_tokens: int
    preemptions_by_reason: tuple[tuple[str, int], ...] = ()
    """("kv_memory" | "displaced", count): why running requests lost their KV (memory, or a slot handed over)."""
    tenant_service: tuple[tuple[str, float], ...] = ()
    """(tenant, weighted service) under the fair policy: the most served, then "other"."""

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
