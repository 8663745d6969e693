"""Scheduling policies: who waits in what order, who is preempted, and what a step's service costs.

A policy is one object behind `SchedulingPolicy`; the scheduler calls it at
four points and nothing else changes between policies (in particular never
the tokens a request gets: policies reorder, they do not alter).

    add / requeue / peek / pop / remove   the waiting queue, in the policy's order
    victim(running)                       who loses its KV when memory runs out
    displace(running, waiting, step)      who gives up its sequence slot to a waiting request (or None)
    on_step(plan, output) / on_finish     service accounting (fair share)

A new policy is one file here plus its test, registered in `make_policy`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from kvos.config import SchedulerConfig
from kvos.core.plan import StepOutput, StepPlan
from kvos.core.request import Request


class SchedulingPolicy(Protocol):
    name: str

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Request]:
        """Waiting requests, next to be admitted first."""
        ...

    def add(self, request: Request) -> None:
        """A new arrival joins the waiting queue."""
        ...

    def requeue(self, request: Request) -> None:
        """A preempted request waits again (ahead of later arrivals of its rank)."""
        ...

    def peek(self) -> Request | None: ...

    def pop(self) -> Request: ...

    def remove(self, request: Request) -> None: ...

    def victim(self, running: list[Request]) -> Request:
        """The running request to preempt when KV memory runs out."""
        ...

    def displace(self, running: list[Request], step: int) -> Request | None:
        """A running request to preempt so the head of the queue gets its sequence slot, or None."""
        ...

    def on_step(self, plan: StepPlan, output: StepOutput, requests: dict[str, Request]) -> None:
        """See what a step computed (service accounting), before the scheduler applies it."""
        ...

    def on_finish(self, request: Request, was_running: bool) -> None:
        """A request ended (any way); it was running, or waiting and already removed from the queue."""
        ...


POLICIES = ("fcfs", "priority", "fair")


def make_policy(config: SchedulerConfig) -> SchedulingPolicy:
    if config.policy == "fcfs":
        from kvos.core.policies.fcfs import FCFSPolicy

        return FCFSPolicy()
    if config.policy == "priority":
        from kvos.core.policies.priority import PriorityPolicy

        return PriorityPolicy(config.preemption_quantum_steps)
    if config.policy == "fair":
        from kvos.core.policies.fair import FairPolicy

        return FairPolicy(
            dict(config.tenant_weights),
            config.fair_input_weight,
            config.fair_output_weight,
            config.fair_preemption_lead,
            config.preemption_quantum_steps,
        )
    raise ValueError(f"unknown scheduling policy {config.policy!r}; kvos has {', '.join(POLICIES)}")
