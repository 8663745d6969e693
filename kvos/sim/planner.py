"""`kvos sim plan`: the fewest colocated instances that serve a rate within SLOs, by search over simulated runs.

The fleet meets its SLOs when at least `attainment` of the requests have
TTFT <= ttft_slo and TPOT <= tpot_slo (DistServe's SLO attainment; 90% by
default). Instance counts double from 1 until one meets them, then a
binary search finds the smallest between the last that failed and the first
that met. This assumes more instances never serve worse, which holds for
these routers up to simulation noise; every tried count is reported so a
non-monotone case shows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvos.sim.metrics import summarize_sim
from kvos.sim.simulator import FleetConfig, Simulator
from kvos.sim.step_model import StepTimeModel
from kvos.sim.workload import SimRequest


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 2.0
    tpot_s: float = 0.2
    attainment: float = 0.9

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"ttft_s and tpot_s must be > 0, got {self.ttft_s} and {self.tpot_s}")
        if not 0 < self.attainment <= 1:
            raise ValueError(f"attainment must be in (0, 1], got {self.attainment}")


@dataclass(frozen=True)
class PlanResult:
    num_instances: int
    tried: tuple[tuple[int, float, float], ...]
    """(instances, SLO attainment, goodput) of every simulated run, in the order run."""

    def to_json(self) -> dict[str, Any]:
        return {
            "num_instances": self.num_instances,
            "tried": [{"instances": n, "slo_attainment": a, "goodput": g} for n, a, g in self.tried],
        }


def plan_instances(
    fleet: FleetConfig,
    step_model: StepTimeModel,
    requests: Sequence[SimRequest],
    slo: SLO,
    max_instances: int = 4096,
) -> PlanResult:
    """The fewest instances of `fleet` (its router, its instance config) that meet `slo` on `requests`."""
    tried: list[tuple[int, float, float]] = []

    def meets(n: int) -> bool:
        config = dataclasses.replace(fleet, num_instances=n)
        summary = summarize_sim(Simulator(config, step_model).run(requests), slo.ttft_s, slo.tpot_s)
        tried.append((n, summary["slo_attainment"], summary["goodput"]))
        return summary["slo_attainment"] >= slo.attainment

    low, high = 0, 1  # low fails (0 instances serve nothing), high is the candidate
    while not meets(high):
        low = high
        high *= 2
        if high > max_instances:
            raise ValueError(f"no fleet of up to {max_instances} instances meets the SLOs at this rate")
    while high - low > 1:
        mid = (low + high) // 2
        if meets(mid):
            high = mid
        else:
            low = mid
    return PlanResult(high, tuple(tried))
