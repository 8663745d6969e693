"""A snapshot of the engine's counters, for logs and /metrics."""

from __future__ import annotations

from dataclasses import dataclass

MAX_TENANTS_REPORTED = 10
"""Tenants named in stats (the most served); the rest are summed as "other", so /metrics stays small."""


COPY_SECONDS_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Upper bounds of the KV copy latency histograms: a copy moves anything from one block to a long prompt."""


@dataclass(frozen=True)
class Histogram:
    """A latency histogram as plain data: per-bucket counts (not cumulative; the last is +Inf) and the sum."""

    name: str
    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float

    @property
    def count(self) -> int:
        return sum(self.counts)


class HistogramRecorder:
    """Accumulates observations for one `Histogram` (lives in the engine core; snapshots cross processes)."""

    def __init__(self, name: str, bounds: tuple[float, ...] = COPY_SECONDS_BUCKETS) -> None:
        self.name = name
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._total = 0.0

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))
        self._counts[index] += 1
        self._total += value

    def snapshot(self) -> Histogram:
        return Histogram(self.name, self.bounds, tuple(self._counts), self._total)


@dataclass(frozen=True)
class TierStats:
    """One KV tier's occupancy and what prefix lookups found there."""

    tier: str
    """"primary" (what attention reads), "host" or "disk"."""
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
    disk_write_bytes: int = 0
    """KV written to the disk tier (blocks evicted from the tier above, and at clean shutdowns)."""
    disk_read_bytes: int = 0
    """KV read back from the disk tier that passed its checks."""
    disk_corrupted_blocks: int = 0
    """Disk blocks discarded as corrupted (checksum, header or size), on read or at start-up."""
    disk_missing_blocks: int = 0
    disk_write_failures: int = 0
    disk_accepting: bool = True
    """False once a write failed (disk full or unwritable): the disk tier takes no more blocks."""
    copy_seconds: tuple[Histogram, ...] = ()
    """Per step, wall time of KV copies by direction: to_host, from_host, to_disk, from_disk."""

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
