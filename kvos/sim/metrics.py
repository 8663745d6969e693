"""The serving benchmark's report, computed from simulated times by the benchmark's own code.

`benchmarks.serve.summarize` turns per-request results into throughput,
TTFT / TPOT / end-to-end percentiles and goodput; here each simulated
request becomes the `RequestResult` a client would have recorded, so a
simulated figure and a measured one differ only in where the times came
from. The inter-token gaps are the exception: a million requests make a
hundred million gaps, too many for Python lists, so their percentiles are
taken with numpy by the same nearest-rank rule (`nearest_rank_ms`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvos.cluster.migration import MigrationResult
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.sim.repo import benchmarks
from kvos.sim.simulator import SimInstance, SimResult


def nearest_rank_ms(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """`benchmarks.serve.percentiles_ms` for large arrays: mean and nearest-rank percentiles, in ms."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return {"mean": float("nan"), **{f"p{p}": float("nan") for p in benchmarks("serve").PERCENTILES}}
    ordered = np.sort(data)
    picks = {
        f"p{p}": 1000 * float(ordered[max(0, math.ceil(p / 100 * data.size) - 1)])
        for p in benchmarks("serve").PERCENTILES
    }
    return {"mean": 1000 * float(ordered.mean()), **picks}


def summarize_sim(result: SimResult, ttft_slo_s: float, tpot_slo_s: float) -> dict[str, Any]:
    """The serving benchmark's summary of a simulated run, plus what only a simulator sees."""
    serve = benchmarks("serve")
    times = result.times
    failed = dict.fromkeys(times.rejected, "rejected: too long")
    failed.update(dict.fromkeys(times.abandoned, "not sent: an earlier turn of its session was rejected"))
    results = []
    for k in range(len(times.arrival_s)):
        if k in failed:
            results.append(serve.RequestResult(times.prompt_tokens[k], times.expected_tokens[k], error=failed[k]))
            continue
        arrival = times.arrival_s[k]
        results.append(
            serve.RequestResult(
                prompt_tokens=times.prompt_tokens[k],
                expected_tokens=times.expected_tokens[k],
                ok=True,
                output_tokens=times.num_output_tokens[k],
                ttft_s=times.first_token_s[k] - arrival,
                latency_s=times.last_token_s[k] - arrival,
            )
        )
    start = min(times.arrival_s, default=0.0)
    duration = max(result.end_s - start, 1e-9)
    summary = serve.summarize(results, duration, ttft_slo_s, tpot_slo_s)
    summary["itl_ms"] = nearest_rank_ms(np.frombuffer(times.itl_s, dtype=np.float64))
    instances = result.instances
    summary["simulation"] = {
        "num_instances": len(instances),
        "num_steps": sum(i.num_steps for i in instances),
        "num_events": result.num_events,
        "wall_s": result.wall_s,
        "events_per_s": result.num_events / result.wall_s if result.wall_s > 0 else float("nan"),
        "preemptions": sum(i.scheduler.num_preemptions for i in instances),
        "preemptions_by_reason": {
            reason: sum(i.scheduler.preemptions_by_reason[reason] for i in instances)
            for reason in instances[0].scheduler.preemptions_by_reason
        },
        "kv_peak_use": max(i.peak_used_blocks / i.kv_capacity_blocks for i in instances),
        "busy_fraction": sum(i.worker.busy_s for i in instances) / (len(instances) * duration),
        **tier_summary(instances),
        "migrations": migration_summary(result.migrations),
    }
    return summary


def busy_by_term(terms: dict[str, float], result: SimResult) -> dict[str, float]:
    """The fleet's busy time split by the step-time model's terms (`TermTotals.seconds`), largest first.

    `other` is what the model's terms leave out of the instances' busy time:
    first uses of a row count, waits for KV copies a step cannot overlap,
    and steps raised to the model's floor.
    """
    busy = sum((i.worker.busy_s for i in result.instances), 0.0)
    split = dict(sorted(terms.items(), key=lambda item: -item[1]))
    split["other"] = busy - sum(terms.values(), 0.0)
    split["busy"] = busy
    return split


def migration_summary(migrations: Sequence[MigrationResult]) -> dict[str, Any]:
    """Live migrations tried, by outcome; blocks copied and downtime (stop to resume) of those that moved."""
    outcomes: dict[str, int] = {}
    for m in migrations:
        outcomes[m.outcome] = outcomes.get(m.outcome, 0) + 1
    moved = [m for m in migrations if m.outcome == "migrated"]
    return {
        "tried": len(migrations),
        "by_outcome": outcomes,
        "blocks_copied": sum(m.blocks_copied for m in moved),
        "downtime_ms": nearest_rank_ms(np.array([m.downtime_s for m in moved], dtype=np.float64)),
    }


def tier_summary(instances: Sequence[SimInstance]) -> dict[str, Any]:
    """Prompt tokens looked up and found per tier (the server's `kvos_kv_tier_hit_tokens`), moves and copy time."""
    queried = sum(i.kv.prefix_cache_stats()[0] for i in instances)
    counters = [i.kv.counters for i in instances]
    hits = {
        "primary": sum(c.primary_hit_tokens for c in counters),
        "host": sum(c.host_hit_tokens for c in counters),
        "disk": sum(c.disk_hit_tokens for c in counters),
    }
    return {
        "prompt_tokens_queried": queried,
        "hit_rate_by_tier": {tier: hit / queried if queried else 0.0 for tier, hit in hits.items()},
        "preemptions_by_mode": {
            mode: sum(i.scheduler.preemptions_by_mode[mode] for i in instances) for mode in ("swap", "recompute")
        },
        "blocks_moved": {
            "demote": sum(c.blocks_demoted for c in counters),
            "promote": sum(c.blocks_promoted for c in counters),
            "swap_out": sum(c.blocks_swapped_out for c in counters),
            "swap_in": sum(c.blocks_swapped_in for c in counters),
            "disk_write": sum(c.blocks_to_disk for c in counters),
            "disk_read": sum(c.blocks_from_disk for c in counters),
        },
        "copy_s": sum(i.worker.copy_s for i in instances),
        "host_tier": _host_use(instances),
        "disk_tier": _disk_use(instances),
    }


def _host_use(instances: Sequence[SimInstance]) -> dict[str, float] | None:
    """The host tier's use, as fractions of its blocks: the most any instance pinned at once (swapped-out KV,
    hits being loaded), and what the tiers cache at the end."""
    pools = [(i, i.kv.host) for i in instances if i.kv.host is not None]
    if not pools:
        return None
    return {
        "peak_held": max(i.peak_host_held_blocks / pool.num_blocks for i, pool in pools),
        "cached_at_end": sum(pool.num_idle_cached_blocks for _, pool in pools) / sum(p.num_blocks for _, p in pools),
    }


def _disk_use(instances: Sequence[SimInstance]) -> dict[str, float] | None:
    """The disk tier's use at the end, as a fraction of its files (everything on disk is cache)."""
    tiers = [i.kv.disk for i in instances if isinstance(i.kv, PagedKVCacheManager) and i.kv.disk is not None]
    if not tiers:
        return None
    return {"stored_at_end": sum(t.num_stored_blocks for t in tiers) / sum(t.num_blocks for t in tiers)}


def plot_goodput(points: Sequence[tuple[float, dict[str, Any]]], path: str, title: str) -> None:
    """Goodput and throughput (requests/s) against offered rate, one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and none needed for a file
    import matplotlib.pyplot as plt

    rates = [rate for rate, _ in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rates, [s["goodput"] for _, s in points], marker="o", label="goodput (met TTFT and TPOT SLOs)")
    ax.plot(rates, [s["request_throughput"] for _, s in points], marker="s", linestyle="--", label="throughput")
    ax.plot(rates, rates, color="grey", linewidth=0.8, label="offered rate")
    ax.set_xlabel("request rate (requests/s)")
    ax.set_ylabel("requests/s")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
