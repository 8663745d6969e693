"""Prometheus metrics for one server.

Each app gets its own registry (never the process-global one) so that two apps
in one process, as in tests, do not collide. Engine counters are read from the
engine's latest stats snapshot at scrape time rather than mirrored into
separate counters, so they can never drift from the engine; latencies are
observed per request, as the event loop sees them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from kvos.engine.client import RequestStream
from kvos.engine.stats import MAX_TENANTS_REPORTED, EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield GaugeMetricFamily("kvos_num_requests_running", "Sequences in the running batch.", value=s.num_running)
        yield GaugeMetricFamily("kvos_num_requests_waiting", "Sequences waiting to be scheduled.", value=s.num_waiting)
        yield GaugeMetricFamily(
            "kvos_kv_cache_used_blocks", "KV cache blocks held by requests.", value=s.num_used_blocks
        )
        yield GaugeMetricFamily("kvos_kv_cache_free_blocks", "KV cache blocks free.", value=s.num_free_blocks)
        yield GaugeMetricFamily(
            "kvos_prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache / tokens looked up.",
            value=s.prefix_cache_hit_rate,
        )
        yield CounterMetricFamily(
            "kvos_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", value=s.prefix_cache_queries
        )
        yield CounterMetricFamily(
            "kvos_prefix_cache_hits", "Prompt tokens found in the prefix cache.", value=s.prefix_cache_hits
        )
        yield CounterMetricFamily("kvos_num_preemptions", "Sequences preempted (any reason).", value=s.num_preemptions)
        by_reason = CounterMetricFamily(
            "kvos_preemptions_by_reason",
            "Sequences preempted: kv_memory (memory ran out) or displaced (slot given to a more urgent request).",
            labels=["reason"],
        )
        for reason, count in s.preemptions_by_reason:
            by_reason.add_metric([reason], count)
        yield by_reason
        service = GaugeMetricFamily(
            "kvos_tenant_service",
            "Weighted service (fair policy): the most served tenants, the rest as 'other'.",
            labels=["tenant"],
        )
        for tenant, value in s.tenant_service:
            service.add_metric([tenant], value)
        yield service
        by_mode = CounterMetricFamily(
            "kvos_preemptions_by_mode",
            "Sequences preempted: KV swapped to the host tier or recomputed.",
            labels=["mode"],
        )
        for mode, count in s.preemptions_by_mode:
            by_mode.add_metric([mode], count)
        yield by_mode
        yield from _tier_metrics(s)
        yield CounterMetricFamily("kvos_prompt_tokens", "Prompt tokens computed.", value=s.num_prompt_tokens)
        yield CounterMetricFamily("kvos_generation_tokens", "Tokens generated.", value=s.num_generation_tokens)


def _tier_metrics(s: EngineStats) -> Iterator[Metric]:
    """Per-tier occupancy and hits, and the traffic between tiers (paged cache)."""
    gauges = {
        "used": GaugeMetricFamily("kvos_kv_tier_used_bytes", "KV bytes held by requests, per tier.", labels=["tier"]),
        "cached": GaugeMetricFamily(
            "kvos_kv_tier_cached_bytes", "KV bytes kept as prefix cache (held by nobody), per tier.", labels=["tier"]
        ),
        "capacity": GaugeMetricFamily("kvos_kv_tier_capacity_bytes", "KV bytes a tier holds.", labels=["tier"]),
    }
    hits = CounterMetricFamily("kvos_kv_tier_hit_tokens", "Prompt tokens found in each tier.", labels=["tier"])
    for tier in s.tiers:
        gauges["used"].add_metric([tier.tier], tier.used_bytes)
        gauges["cached"].add_metric([tier.tier], tier.cached_bytes)
        gauges["capacity"].add_metric([tier.tier], tier.capacity_bytes)
        hits.add_metric([tier.tier], tier.hit_tokens)
    yield from gauges.values()
    yield hits
    traffic = CounterMetricFamily(
        "kvos_kv_tier_moved_bytes",
        "KV bytes moved between tiers: swap_out, swap_in, demote (write-back of evicted cache to the host "
        "tier), promote (host prefix hits), disk_write (evicted to or flushed to disk), disk_read (checked "
        "reads from disk).",
        labels=["kind"],
    )
    for kind, value in (
        ("swap_out", s.swap_out_bytes),
        ("swap_in", s.swap_in_bytes),
        ("demote", s.demoted_bytes),
        ("promote", s.promoted_bytes),
        ("disk_write", s.disk_write_bytes),
        ("disk_read", s.disk_read_bytes),
    ):
        traffic.add_metric([kind], value)
    yield traffic
    yield CounterMetricFamily(
        "kvos_kv_disk_corrupted_blocks",
        "Disk tier blocks discarded as corrupted (checksum, header or size); their tokens were recomputed.",
        value=s.disk_corrupted_blocks,
    )
    yield CounterMetricFamily(
        "kvos_kv_disk_missing_blocks", "Disk tier blocks whose file was gone when read.", value=s.disk_missing_blocks
    )
    yield CounterMetricFamily(
        "kvos_kv_disk_write_failures",
        "Disk tier writes that failed (disk full or unwritable); after the first the tier takes no blocks.",
        value=s.disk_write_failures,
    )
    yield GaugeMetricFamily(
        "kvos_kv_disk_accepting",
        "1 while the disk tier takes new blocks, 0 after a write failed.",
        value=s.disk_accepting,
    )
    copies = HistogramMetricFamily(
        "kvos_kv_copy_seconds",
        "Per step, wall time of KV copies between tiers by direction (to_host: swap-outs and write-backs; "
        "from_host: swap-ins and host hits; to_disk; from_disk).",
        labels=["direction"],
    )
    for h in s.copy_seconds:
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, h.bounds), "+Inf"), h.counts):
            cumulative += count
            buckets.append((bound, cumulative))
        copies.add_metric([h.name], buckets, h.total)
    yield copies


class ServerMetrics:
    """The registry behind GET /metrics."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        self.time_to_first_token = Histogram(
            "kvos_time_to_first_token_seconds",
            "Request arrival to first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "kvos_time_per_output_token_seconds",
            "Mean time between output tokens after the first.",
            buckets=_TOKEN_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tenant_time_to_first_token = Histogram(
            "kvos_tenant_time_to_first_token_seconds",
            "Request arrival to first token, per tenant (the OpenAI `user`; the first few named, the rest 'other').",
            labelnames=["tenant"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._named_tenants: set[str] = set()
        self.e2e_request_latency = Histogram(
            "kvos_e2e_request_latency_seconds",
            "Request arrival to its last token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def _tenant_label(self, tenant: str) -> str:
        """Label cardinality stays bounded: the first tenants seen keep their names."""
        if tenant in self._named_tenants or len(self._named_tenants) < MAX_TENANTS_REPORTED:
            self._named_tenants.add(tenant)
            return tenant
        return "other"

    def observe(self, stream: RequestStream, num_output_tokens: int, tenant: str = "") -> None:
        """Record a request that ran to completion (aborted ones would skew latency)."""
        if stream.first_token_time is None or stream.finish_time is None:
            return
        ttft = stream.first_token_time - stream.arrival_time
        self.time_to_first_token.observe(ttft)
        self.tenant_time_to_first_token.labels(self._tenant_label(tenant)).observe(ttft)
        self.e2e_request_latency.observe(stream.finish_time - stream.arrival_time)
        if num_output_tokens > 1:
            self.time_per_output_token.observe((stream.finish_time - stream.first_token_time) / (num_output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
