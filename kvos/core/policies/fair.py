"""Fair share between tenants: the Virtual Token Counter (VTC, Sheng et al., OSDI 2024).

Each tenant (the OpenAI `user` field; requests without one share the
tenant "") has a counter of the service it has received, weighted:

    service = (w_in x prompt tokens computed + w_out x tokens generated) / tenant weight

Admission serves the backlogged tenant with the smallest counter (ties by
arrival). A tenant that becomes backlogged after being idle has its counter
lifted to the smallest counter among those backlogged, so idling banks no
credit. Under KV pressure the victim is the latest-arrived running request of
the tenant furthest ahead.

With `preemption_lead` set (FastSwitch's point: fairness needs cheap context
switches), when every sequence slot is taken and the tenant furthest ahead
leads the waiting head's tenant by more than that much service, its latest
running request gives up its slot (once it has run `quantum_steps` steps).
Without it, a starved tenant waits for the next free slot.

What this bounds (VTC's theorem): between two continuously backlogged
tenants the counters never differ by more than about
2 x max(w_in x longest prompt, w_out x tokens per step).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from kvos.core.plan import StepOutput, StepPlan
from kvos.core.request import Request


class FairPolicy:
    name = "fair"

    def __init__(
        self,
        weights: dict[str, float],
        input_weight: float,
        output_weight: float,
        preemption_lead: float | None = None,
        quantum_steps: int = 0,
    ) -> None:
        self.weights = weights
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.preemption_lead = preemption_lead
        self.quantum_steps = quantum_steps
        self.counters: dict[str, float] = {}
        self._queues: dict[str, deque[Request]] = {}
        self._running: dict[str, int] = {}
        """Running requests per tenant: a tenant is backlogged while it has any waiting or running."""

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __iter__(self) -> Iterator[Request]:
        return iter(sorted((r for q in self._queues.values() for r in q), key=self._rank))

    def _backlogged(self) -> list[str]:
        return [t for t in self.counters if self._queues.get(t) or self._running.get(t)]

    def add(self, request: Request) -> None:
        tenant = request.tenant
        if tenant not in self._backlogged():
            others = [self.counters[t] for t in self._backlogged()]
            lifted = min(others) if others else max(self.counters.values(), default=0.0)
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), lifted)
        self._queues.setdefault(tenant, deque()).append(request)

    def requeue(self, request: Request) -> None:
        self._running[request.tenant] = self._running.get(request.tenant, 1) - 1
        self._queues.setdefault(request.tenant, deque()).appendleft(request)

    def _rank(self, request: Request) -> tuple[float, float]:
        return self.counters.get(request.tenant, 0.0), request.arrival_time

    def peek(self) -> Request | None:
        heads = [q[0] for q in self._queues.values() if q]
        return min(heads, key=self._rank) if heads else None

    def pop(self) -> Request:
        request = self.peek()
        if request is None:
            raise IndexError("pop from an empty waiting queue")
        self._queues[request.tenant].popleft()
        self._running[request.tenant] = self._running.get(request.tenant, 0) + 1
        return request

    def remove(self, request: Request) -> None:
        self._queues[request.tenant].remove(request)

    def victim(self, running: list[Request]) -> Request:
        return max(running, key=lambda r: (self.counters.get(r.tenant, 0.0), r.arrival_time))

    def displace(self, running: list[Request], step: int) -> Request | None:
        head = self.peek()
        if self.preemption_lead is None or head is None:
            return None
        others = [r for r in running if r.tenant != head.tenant and step - r.admitted_step >= self.quantum_steps]
        if not others:
            return None
        leader = max(others, key=lambda r: (self.counters.get(r.tenant, 0.0), r.arrival_time))
        lead = self.counters.get(leader.tenant, 0.0) - self.counters.get(head.tenant, 0.0)
        return leader if lead > self.preemption_lead else None

    def on_step(self, plan: StepPlan, output: StepOutput, requests: dict[str, Request]) -> None:
        for scheduled in plan.scheduled:
            request = requests.get(scheduled.req_id)
            if request is None:
                continue
            tenant = request.tenant
            end = scheduled.num_computed_tokens + len(scheduled.new_token_ids)
            prompt_tokens = max(0, min(request.num_prompt_tokens, end) - scheduled.num_computed_tokens)
            generated = 1 if scheduled.req_id in output.sampled else 0
            service = self.input_weight * prompt_tokens + self.output_weight * generated
            self.counters[tenant] = self.counters.get(tenant, 0.0) + service / self.weights.get(tenant, 1.0)

    def on_finish(self, request: Request, was_running: bool) -> None:
        if was_running:
            self._running[request.tenant] = max(0, self._running.get(request.tenant, 0) - 1)
