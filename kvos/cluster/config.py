"""How a cluster of engine instances is deployed and routed: one frozen config, its flags derive from it."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Literal

RouterName = Literal["round-robin", "least-load", "prefix-aware", "session"]
ROUTERS = ("round-robin", "least-load", "prefix-aware", "session")


@dataclass(frozen=True)
class ClusterConfig:
    """N engine instances as Ray actors behind one router.

    `instances`: engine instances started at launch (each a Ray actor with
    its own scheduler, KV cache and model). `ray_address`: join that Ray
    cluster instead of starting a local runtime in this process.
    `threads_per_instance`: torch threads each instance uses (None: this
    machine's cores divided by the instances, at least 1), so instances
    sharing a machine do not oversubscribe it. `max_restarts`: how often Ray
    restarts an instance whose process died. `prefix_overload_steps`: the
    prefix-aware router sends a request to the instance holding its longest
    cached prefix unless that instance's freeness is below this many decode
    steps (then it routes by load). `failover_timeout_s`: how long a request
    whose instance died may wait for a healthy one before it fails.
    `migration_freeness_gap`: every `migration_interval_s` seconds, when the
    freest and the fullest instance differ by more than this many decode
    steps of freeness, the shortest request on the fullest moves live to the
    freest (Llumnix's load balancing; None: only draining migrates).
    `prefill_instances` / `decode_instances` (DistServe): when set, new
    requests go to prefill instances only, and once a request's prompt is
    computed (its first token sampled) its KV moves to a decode instance by
    the same path as a live migration; `instances` is then their sum.
    """

    instances: int = 1
    ray_address: str | None = None
    router: RouterName = "least-load"
    threads_per_instance: int | None = None
    max_restarts: int = 3
    prefix_overload_steps: float = 4.0
    failover_timeout_s: float = 60.0
    migration_freeness_gap: float | None = None
    migration_interval_s: float = 1.0
    prefill_instances: int = 0
    decode_instances: int = 0

    def __post_init__(self) -> None:
        if self.prefill_instances < 0 or self.decode_instances < 0:
            raise ValueError("prefill_instances and decode_instances must be >= 0")
        if (self.prefill_instances > 0) != (self.decode_instances > 0):
            raise ValueError(
                "disaggregation needs both --prefill-instances and --decode-instances "
                f"(got {self.prefill_instances} and {self.decode_instances})"
            )
        if self.disaggregated:
            object.__setattr__(self, "instances", self.prefill_instances + self.decode_instances)
        if self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.threads_per_instance is not None and self.threads_per_instance < 1:
            raise ValueError(f"threads_per_instance must be >= 1, got {self.threads_per_instance}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if self.migration_freeness_gap is not None and self.migration_freeness_gap <= 0:
            raise ValueError(f"migration_freeness_gap must be > 0, got {self.migration_freeness_gap}")
        if self.migration_interval_s <= 0:
            raise ValueError(f"migration_interval_s must be > 0, got {self.migration_interval_s}")
        if self.failover_timeout_s <= 0:
            raise ValueError(f"failover_timeout_s must be > 0, got {self.failover_timeout_s}")

    @property
    def num_threads(self) -> int:
        """Torch threads per instance: as configured, else this machine's cores shared out."""
        if self.threads_per_instance is not None:
            return self.threads_per_instance
        return max(1, (os.cpu_count() or 1) // self.instances)

    @property
    def disaggregated(self) -> bool:
        return self.prefill_instances > 0

    @property
    def enabled(self) -> bool:
        """Whether `kvos serve` runs a cluster (more than one instance, or an existing Ray cluster)."""
        return self.instances > 1 or self.ray_address is not None


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    """`kvos serve` flags for a cluster; defaults come from `ClusterConfig`."""
    d = ClusterConfig()
    group = parser.add_argument_group("cluster (engine instances on Ray; see docs/cluster.md)")
    group.add_argument(
        "--instances", type=int, default=d.instances, help="engine instances, each a Ray actor (1: no Ray)"
    )
    group.add_argument("--ray-address", default=d.ray_address, help="join this Ray cluster instead of a local one")
    group.add_argument("--router", default=d.router, choices=ROUTERS, help="which instance serves a new request")
    group.add_argument(
        "--threads-per-instance", type=int, default=d.threads_per_instance, help="default: cores / instances"
    )
    group.add_argument("--max-restarts", type=int, default=d.max_restarts, help="Ray restarts of a dead instance")
    group.add_argument(
        "--failover-timeout",
        dest="failover_timeout_s",
        type=float,
        default=d.failover_timeout_s,
        help="seconds a request may wait for a healthy instance after its own died",
    )
    add_placement_args(group)
    add_disaggregation_args(group)


def add_placement_args(group: argparse._ArgumentGroup) -> None:
    """Where requests go and when they move: flags `kvos serve` and `kvos sim` share."""
    d = ClusterConfig()
    group.add_argument(
        "--prefix-overload-steps",
        type=float,
        default=d.prefix_overload_steps,
        help="prefix-aware: pass over an instance with less freeness than this (decode steps)",
    )
    group.add_argument(
        "--migrate-on-imbalance",
        dest="migration_freeness_gap",
        type=float,
        default=d.migration_freeness_gap,
        metavar="GAP",
        help="live-migrate a request when instances' freeness differs by more than GAP decode steps",
    )
    group.add_argument(
        "--migration-interval",
        dest="migration_interval_s",
        type=float,
        default=d.migration_interval_s,
        help="seconds between load-imbalance checks",
    )


def add_disaggregation_args(group: argparse._ArgumentGroup) -> None:
    """DistServe's split, as `kvos serve` and `kvos sim run` take it."""
    d = ClusterConfig()
    group.add_argument(
        "--prefill-instances",
        type=int,
        default=d.prefill_instances,
        help="disaggregation: instances that only compute prompts (needs --decode-instances)",
    )
    group.add_argument(
        "--decode-instances",
        type=int,
        default=d.decode_instances,
        help="disaggregation: instances that decode what prefill instances hand over",
    )


def cluster_config_from_args(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig(
        instances=args.instances,
        ray_address=args.ray_address,
        router=args.router,
        threads_per_instance=args.threads_per_instance,
        max_restarts=args.max_restarts,
        prefix_overload_steps=args.prefix_overload_steps,
        failover_timeout_s=args.failover_timeout_s,
        migration_freeness_gap=args.migration_freeness_gap,
        migration_interval_s=args.migration_interval_s,
        prefill_instances=args.prefill_instances,
        decode_instances=args.decode_instances,
    )
