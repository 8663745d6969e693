"""First come, first served: arrival order; the most recently admitted request yields its KV."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from kvos.core.plan import StepOutput, StepPlan
from kvos.core.request import Request


class FCFSPolicy:
    name = "fcfs"

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def requeue(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request | None:
        return self._queue[0] if self._queue else None

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def victim(self, running: list[Request]) -> Request:
        return running[-1]

    def displace(self, running: list[Request], step: int) -> Request | None:
        return None

    def on_step(self, plan: StepPlan, output: StepOutput, requests: dict[str, Request]) -> None:
        pass

    def on_finish(self, request: Request, was_running: bool) -> None:
        pass
