"""Which simulated instance gets an arriving request: kvos's cluster routers, unchanged, and one for big fleets.

`round-robin`, `least-load`, `prefix-aware` and `session` are the classes
that `kvos serve --instances N` routes with (`kvos.cluster.routers`). They
choose from what the cluster core shows them: each instance's load as its
last step reported it (`kvos.cluster.instance.instance_load`, the function
the real instances report with) plus what was routed to it since, and, for
prefix-aware, how many leading blocks of the prompt each instance's prefix
cache holds, known from its KV events. A choice costs a view per instance,
as it does in the cluster.

`least-requests` is the simulator's own: the instance with the fewest
unfinished requests, kept in a heap, O(log instances) a request. It is for
fleets of hundreds or thousands of instances, where a view of every
instance per arrival would dominate the run. kvos's cluster has no such
router; its least-load weighs KV memory (Llumnix's freeness), not a count.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Protocol

from kvos.cluster.config import ClusterConfig
from kvos.cluster.routers import InstanceView
from kvos.cluster.routers import Router as ClusterRouterPolicy
from kvos.cluster.routers import make_router as make_cluster_router
from kvos.core.request import Request
from kvos.sim import CLUSTER_ROUTERS, ROUTERS

Views = Callable[[Request, bool], list[InstanceView]]
"""Every instance's view now, in index order; with True, each counts the request's prompt blocks it caches."""


class Router(Protocol):
    reads_state: bool
    """Whether choices read the instances' loads or caches. Then every instance reports after every step,
    as the cluster's do (inside a decode run, `SimInstance.view` rebuilds those reports from its plan)."""

    def route(self, request: Request, views: Views) -> int:
        """The index of the instance that takes `request`."""
        ...

    def on_finish(self, instance: int) -> None:
        """A request on `instance` ended."""
        ...

    def on_move(self, request: Request, source: int, destination: int) -> None:
        """`request` migrated from `source` to `destination`."""
        ...


class ClusterRouter:
    """One of `kvos.cluster.routers`, choosing from the same views the cluster core would build."""

    def __init__(self, name: str, num_instances: int, prefix_overload_steps: float) -> None:
        """`num_instances`: those it routes to, indices 0 to num_instances - 1."""
        self.num_instances = num_instances
        self.policy: ClusterRouterPolicy = make_cluster_router(
            ClusterConfig(router=name, prefix_overload_steps=prefix_overload_steps)  # type: ignore[arg-type]
        )
        self.reads_state = name != "round-robin"

    def route(self, request: Request, views: Views) -> int:
        return self.policy.choose(request, views(request, self.policy.wants_prefix))

    def on_finish(self, instance: int) -> None:
        return None

    def on_move(self, request: Request, source: int, destination: int) -> None:
        if destination < self.num_instances:  # not a disaggregated fleet's decode instance: none is routed there
            self.policy.moved(request, destination)


class LeastRequestsRouter:
    """The instance with the fewest unfinished requests (ties: the lowest index).

    A heap with lazy deletion: every change of a load pushes a fresh entry
    and stale ones are skipped when they surface, so a route costs
    O(log instances) even across a thousand instances.
    """

    reads_state = False  # its counts are its own: it needs no report from the instances

    def __init__(self, num_instances: int) -> None:
        self.loads = [0] * num_instances
        self._heap = [(0, i) for i in range(num_instances)]

    def route(self, request: Request, views: Views) -> int:
        while True:
            load, index = self._heap[0]
            if load == self.loads[index]:
                break
            heapq.heappop(self._heap)
        self.loads[index] += 1
        heapq.heapreplace(self._heap, (load + 1, index))
        return index

    def on_finish(self, instance: int) -> None:
        if instance < len(self.loads):  # not one it routes to (a disaggregated fleet's decode instance)
            self.loads[instance] -= 1
            heapq.heappush(self._heap, (self.loads[instance], instance))

    def on_move(self, request: Request, source: int, destination: int) -> None:
        self.on_finish(source)
        if destination < len(self.loads):
            self.loads[destination] += 1
            heapq.heappush(self._heap, (self.loads[destination], destination))


def make_router(name: str, num_instances: int, prefix_overload_steps: float) -> Router:
    if num_instances < 1:
        raise ValueError(f"num_instances must be >= 1, got {num_instances}")
    if name in CLUSTER_ROUTERS:
        return ClusterRouter(name, num_instances, prefix_overload_steps)
    if name == "least-requests":
        return LeastRequestsRouter(num_instances)
    raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {name!r}")
