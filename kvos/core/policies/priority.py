"""Priorities: lower `priority` is served sooner, and may take a running request's slot.

Waiting requests are ordered by (priority, arrival). Under KV pressure the
victim is the lowest-priority, latest-arrived running request. Unlike vLLM,
when every sequence slot is taken and a strictly more urgent request waits,
the least urgent running request is preempted for it, but only once it has
run `quantum_steps` steps since it was admitted, so two requests cannot
thrash each other out of the batch.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator

from kvos.core.plan import StepOutput, StepPlan
from kvos.core.request import Request


class PriorityPolicy:
    name = "priority"

    def __init__(self, quantum_steps: int) -> None:
        self.quantum_steps = quantum_steps
        self._queue: list[tuple[int, float, int, Request]] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return (entry[3] for entry in self._queue)

    def add(self, request: Request) -> None:
        bisect.insort(
            self._queue, (request.priority, request.arrival_time, next(self._order), request), key=lambda e: e[:3]
        )

    def requeue(self, request: Request) -> None:
        # Its arrival time puts it ahead of later arrivals of the same priority.
        self.add(request)

    def peek(self) -> Request | None:
        return self._queue[0][3] if self._queue else None

    def pop(self) -> Request:
        return self._queue.pop(0)[3]

    def remove(self, request: Request) -> None:
        self._queue = [e for e in self._queue if e[3] is not request]

    @staticmethod
    def _least_urgent(running: list[Request]) -> Request:
        return max(running, key=lambda r: (r.priority, r.arrival_time))

    def victim(self, running: list[Request]) -> Request:
        return self._least_urgent(running)

    def displace(self, running: list[Request], step: int) -> Request | None:
        head = self.peek()
        if head is None or not running:
            return None
        candidate = self._least_urgent(running)
        if candidate.priority <= head.priority or step - candidate.admitted_step < self.quantum_steps:
            return None
        return candidate

    def on_step(self, plan: StepPlan, output: StepOutput, requests: dict[str, Request]) -> None:
        pass

    def on_finish(self, request: Request, was_running: bool) -> None:
        pass
