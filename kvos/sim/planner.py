"""`kvos sim plan`: the fewest instances that serve a rate within SLOs, by search over simulated runs.

The fleet meets its SLOs when at least `attainment` of the requests have
TTFT <= ttft_slo and TPOT <= tpot_slo (DistServe's SLO attainment; 90% by
default). Instance counts double from 1 until one meets them, then a
binary search finds the smallest between the last that failed and the first
that met. This assumes more instances never serve worse, which holds for
these routers up to simulation noise; every tried count is reported so a
non-monotone case shows.

Disaggregated fleets (`plan_disaggregated`) are sized in two searches: the
fewest prefill instances whose TTFT alone meets the attainment (the decode
tier cannot change a first token's time), then, for that many prefill
instances and a few more, the fewest decode instances meeting both SLOs;
the split with the fewest instances in all wins. That is the
prefill:decode ratio search: the ratio is what the two searches settle on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvos.sim.metrics import summarize_sim
from kvos.sim.simulator import FleetConfig, SimResult, Simulator
from kvos.sim.step_model import StepTimeModel
from kvos.sim.worker import LinkModel
from kvos.sim.workload import SimRequest, SimSession

EXTRA_PREFILL = 2
"""Prefill counts above the TTFT-only minimum also tried: more prefill can cut the decode tier's queueing."""


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


def fewest(meets: Callable[[int], bool], max_count: int, what: str) -> int:
    """The smallest count >= 1 for which `meets` holds: doubling, then bisection (assumes it is monotone)."""
    low, high = 0, 1  # low fails (0 instances serve nothing), high is the candidate
    while not meets(high):
        low = high
        high *= 2
        if high > max_count:
            raise ValueError(f"no fleet of up to {max_count} {what} meets the SLOs at this rate")
    while high - low > 1:
        mid = (low + high) // 2
        if meets(mid):
            high = mid
        else:
            low = mid
    return high


def plan_instances(
    fleet: FleetConfig,
    step_model: StepTimeModel,
    requests: Sequence[SimRequest],
    slo: SLO,
    max_instances: int = 4096,
    sessions: Sequence[SimSession] = (),
) -> PlanResult:
    """The fewest instances of `fleet` (its router, its instance config) that meet `slo` on `requests` and
    `sessions`' turns."""
    tried: list[tuple[int, float, float]] = []

    def meets(n: int) -> bool:
        config = dataclasses.replace(fleet, num_instances=n)
        summary = summarize_sim(Simulator(config, step_model).run(requests, sessions), slo.ttft_s, slo.tpot_s)
        tried.append((n, summary["slo_attainment"], summary["goodput"]))
        return summary["slo_attainment"] >= slo.attainment

    return PlanResult(fewest(meets, max_instances, "instances"), tuple(tried))


def ttft_attainment(result: SimResult, ttft_s: float) -> float:
    """Fraction of all requests that got a first token within `ttft_s` of arriving."""
    times = result.times
    n = len(times.arrival_s)
    rejected = set(times.rejected)
    met = sum(1 for k in range(n) if k not in rejected and times.first_token_s[k] - times.arrival_s[k] <= ttft_s)
    return met / n if n else 1.0


@dataclass(frozen=True)
class DisaggPlanResult:
    num_prefill: int
    num_decode: int
    tried: tuple[tuple[int, int, float, float], ...]
    """(prefill, decode, SLO attainment, goodput) of every simulated run; decode 0: the prefill tier alone
    (its attainment is then TTFT attainment)."""

    @property
    def num_instances(self) -> int:
        return self.num_prefill + self.num_decode

    def to_json(self) -> dict[str, Any]:
        return {
            "num_instances": self.num_instances,
            "num_prefill": self.num_prefill,
            "num_decode": self.num_decode,
            "tried": [{"prefill": p, "decode": d, "slo_attainment": a, "goodput": g} for p, d, a, g in self.tried],
        }


def plan_disaggregated(
    fleet: FleetConfig,
    link: LinkModel,
    step_model: StepTimeModel,
    requests: Sequence[SimRequest],
    slo: SLO,
    max_instances: int = 4096,
) -> DisaggPlanResult:
    """The prefill:decode split of instances like `fleet`'s with the fewest instances that meets `slo`."""
    tried: list[tuple[int, int, float, float]] = []
    prefill_only = [SimRequest(r.arrival_s, r.prompt_tokens, 1, r.tenant, r.priority) for r in requests]

    def prefill_meets(p: int) -> bool:
        result = Simulator(dataclasses.replace(fleet, num_instances=p), step_model).run(prefill_only)
        attainment = ttft_attainment(result, slo.ttft_s)
        tried.append((p, 0, attainment, math.nan))
        return attainment >= slo.attainment

    min_prefill = fewest(prefill_meets, max_instances, "prefill instances")
    best: tuple[int, int] | None = None
    for p in range(min_prefill, min_prefill + EXTRA_PREFILL + 1):
        if best is not None and p >= sum(best):
            break

        def both_meet(d: int, p: int = p) -> bool:
            split = dataclasses.replace(fleet, num_instances=p + d, prefill_instances=p, link=link)
            summary = summarize_sim(Simulator(split, step_model).run(requests), slo.ttft_s, slo.tpot_s)
            tried.append((p, d, summary["slo_attainment"], summary["goodput"]))
            return summary["slo_attainment"] >= slo.attainment

        try:
            d = fewest(both_meet, max_instances - p, "decode instances")
        except ValueError:
            continue
        if best is None or p + d < sum(best):
            best = (p, d)
    if best is None:
        raise ValueError(f"no disaggregated fleet of up to {max_instances} instances meets the SLOs at this rate")
    return DisaggPlanResult(best[0], best[1], tuple(tried))
