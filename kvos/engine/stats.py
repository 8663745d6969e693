"""A snapshot of the engine's counters, for logs and /metrics."""

from __future__ import annotations

from dataclasses import dataclass

MAX_TENANTS_REPORTED = 10
"""Tenants named in stats (the most served); the rest are summed as "other", so /metrics stays small."""


@dataclass(frozen=True)
class TierStats:
    """One KV tier's occupancy and what prefix lookups found there."""

    tier: str
    """"primary" (what attention reads) or "host"."""
    used_bytes: int
    """Held by requests (running, or swapped out to this tier)."""
    cached_bytes: int
    """Held by nobody, kept as prefix cache (evicted when the space is needed)."""
    capacity_bytes: int
    hit_tokens: int
    """Prompt tokens prefix lookups found in this tier."""


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
    preemptions_by_mode: tuple[tuple[str, int], ...] = ()
    """("swap" | "recompute", count): what happened to preempted requests' KV."""
    tiers: tuple[TierStats, ...] = ()
    """The paged cache's tiers (primary, then host when there is one)."""
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    demoted_bytes: int = 0
    """Cached KV written back to the host tier as the primary pool reused its blocks."""
    promoted_bytes: int = 0
    """Host-tier prefix hits loaded into the primary pool."""

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
