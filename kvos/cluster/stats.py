"""The cluster's counters: every live instance's `EngineStats`, summed (what /metrics and max_waiting read)."""

from __future__ import annotations

from collections.abc import Sequence

from kvos.engine.stats import EngineStats, TierStats


def _merge_pairs(pairs: Sequence[tuple[tuple[str, float], ...]]) -> tuple[tuple[str, float], ...]:
    total: dict[str, float] = {}
    for items in pairs:
        for key, value in items:
            total[key] = total.get(key, 0) + value
    return tuple(total.items())


def merge_stats(all_stats: Sequence[EngineStats]) -> EngineStats:
    """Sum counts and bytes; tiers are summed by name, per-key tuples by key."""
    tiers: dict[str, TierStats] = {}
    for stats in all_stats:
        for tier in stats.tiers:
            seen = tiers.get(tier.tier)
            tiers[tier.tier] = (
                tier
                if seen is None
                else TierStats(
                    tier.tier,
                    seen.used_bytes + tier.used_bytes,
                    seen.cached_bytes + tier.cached_bytes,
                    seen.capacity_bytes + tier.capacity_bytes,
                    seen.hit_tokens + tier.hit_tokens,
                )
            )

    def total(name: str) -> int:
        return sum(getattr(s, name) for s in all_stats)

    return EngineStats(
        num_running=total("num_running"),
        num_waiting=total("num_waiting"),
        num_free_seq_slots=total("num_free_seq_slots"),
        num_used_blocks=total("num_used_blocks"),
        num_free_blocks=total("num_free_blocks"),
        prefix_cache_queries=total("prefix_cache_queries"),
        prefix_cache_hits=total("prefix_cache_hits"),
        num_preemptions=total("num_preemptions"),
        num_prompt_tokens=total("num_prompt_tokens"),
        num_generation_tokens=total("num_generation_tokens"),
        preemptions_by_reason=tuple((k, int(v)) for k, v in _merge_pairs([s.preemptions_by_reason for s in all_stats])),
        tenant_service=_merge_pairs([s.tenant_service for s in all_stats]),
        preemptions_by_mode=tuple((k, int(v)) for k, v in _merge_pairs([s.preemptions_by_mode for s in all_stats])),
        tiers=tuple(tiers.values()),
        swap_out_bytes=total("swap_out_bytes"),
        swap_in_bytes=total("swap_in_bytes"),
        demoted_bytes=total("demoted_bytes"),
        promoted_bytes=total("promoted_bytes"),
    )
