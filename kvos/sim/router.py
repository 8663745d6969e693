"""Which simulated instance gets an arriving request: one interface, round-robin and least-load."""

from __future__ import annotations

import heapq
from typing import Protocol

from kvos.sim.workload import SimRequest

ROUTERS = ("round_robin", "least_load")


class Router(Protocol):
    def route(self, request: SimRequest) -> int:
        """The index of the instance that takes `request` (counted as one more unfinished request there)."""
        ...

    def on_finish(self, instance: int) -> None:
        """A request on `instance` ended."""
        ...


class RoundRobinRouter:
    def __init__(self, num_instances: int) -> None:
        self.num_instances = num_instances
        self._next = 0

    def route(self, request: SimRequest) -> int:
        index = self._next
        self._next = (index + 1) % self.num_instances
        return index

    def on_finish(self, instance: int) -> None:
        return None


class LeastLoadRouter:
    """The instance with the fewest unfinished requests (ties: the lowest index).

    A heap with lazy deletion: every change of a load pushes a fresh entry
    and stale ones are skipped when they surface, so a route costs
    O(log instances) even across a thousand instances.
    """

    def __init__(self, num_instances: int) -> None:
        self.loads = [0] * num_instances
        self._heap = [(0, i) for i in range(num_instances)]

    def route(self, request: SimRequest) -> int:
        while True:
            load, index = self._heap[0]
            if load == self.loads[index]:
                break
            heapq.heappop(self._heap)
        self.loads[index] += 1
        heapq.heapreplace(self._heap, (load + 1, index))
        return index

    def on_finish(self, instance: int) -> None:
        self.loads[instance] -= 1
        heapq.heappush(self._heap, (self.loads[instance], instance))


def make_router(name: str, num_instances: int) -> Router:
    if num_instances < 1:
        raise ValueError(f"num_instances must be >= 1, got {num_instances}")
    if name == "round_robin":
        return RoundRobinRouter(num_instances)
    if name == "least_load":
        return LeastLoadRouter(num_instances)
    raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {name!r}")
