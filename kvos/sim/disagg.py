"""Disaggregated serving: a prefill fleet hands each request's KV to a decode fleet over a link.

DistServe's split. Prefill instances compute the prompt and sample the first
token; the prompt's KV then crosses a link (`LinkModel`: latency plus bytes
over bandwidth) to a decode instance, which generates the rest. Both tiers
are ordinary simulated fleets of kvos's own scheduler and KV books. The
decode tier never holds up the prefill tier (no backpressure is modelled),
so the two are simulated one after the other: the prefill run's
first-token times plus the transfer times are the decode run's arrivals.

On a decode instance the transferred KV is imported when the engine takes
the request in: its full blocks land in the pool as cached blocks of the
prompt (`SimRequest.kv_ready`), and the scheduler admits the request with
those prefix hits, recomputing only the partial last block and the first
token (at most one block of tokens). When the pool has no room for the
import, the decode instance recomputes the prompt.

The front end (`InstanceConfig.front_end`) stands where the client meets
the fleet: arrivals pass the prefill tier's, and each token reaches the
client `to_client_s` after the tier that made it; the hand-off goes from
engine to engine and passes neither.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, replace

from kvos.sim.simulator import FleetConfig, RequestTimes, SimResult, Simulator
from kvos.sim.step_model import FrontEnd, StepTimeModel
from kvos.sim.worker import LinkModel
from kvos.sim.workload import SimRequest


@dataclass(frozen=True)
class DisaggConfig:
    prefill: FleetConfig
    decode: FleetConfig
    link: LinkModel


def simulate_disaggregated(
    config: DisaggConfig, step_model: StepTimeModel, requests: Sequence[SimRequest]
) -> SimResult:
    """Serve `requests` (sorted by arrival) on the two tiers; one result over both, per original request."""
    prefill_specs = [SimRequest(r.arrival_s, r.prompt_tokens, 1, r.tenant, r.priority) for r in requests]
    front, back = config.prefill.instance.front_end, config.decode.instance.front_end
    prefill = Simulator(_with_front_end(config.prefill, FrontEnd(to_engine_s=front.to_engine_s)), step_model).run(
        prefill_specs
    )
    rejected = set(prefill.times.rejected)
    handoffs = []  # (arrival at the decode tier, original index)
    for k, r in enumerate(requests):
        if k not in rejected and r.output_tokens > 1:
            handoffs.append((prefill.times.first_token_s[k] + config.link.seconds(r.prompt_tokens), k))
    handoffs.sort()
    decode_specs = [
        SimRequest(
            at,
            requests[k].prompt_tokens + 1,
            requests[k].output_tokens - 1,
            requests[k].tenant,
            requests[k].priority,
            kv_ready=True,
        )
        for at, k in handoffs
    ]
    decode = Simulator(_with_front_end(config.decode, FrontEnd(to_client_s=back.to_client_s)), step_model).run(
        decode_specs
    )

    times = RequestTimes()
    n = len(requests)
    times.arrival_s.extend(r.arrival_s for r in requests)
    times.prompt_tokens.extend(r.prompt_tokens for r in requests)
    times.expected_tokens.extend(r.output_tokens for r in requests)
    times.first_token_s.extend(t + front.to_client_s for t in prefill.times.first_token_s)
    times.last_token_s.extend(t + front.to_client_s for t in prefill.times.last_token_s)
    times.num_output_tokens.extend(prefill.times.num_output_tokens)
    times.rejected.extend(sorted(rejected))
    times.itl_s = array("d", decode.times.itl_s)
    decode_rejected = set(decode.times.rejected)
    for d, (_, k) in enumerate(handoffs):
        if d in decode_rejected:
            times.rejected.append(k)
            continue
        times.itl_s.append(decode.times.first_token_s[d] - times.first_token_s[k])
        times.last_token_s[k] = decode.times.last_token_s[d]
        times.num_output_tokens[k] += decode.times.num_output_tokens[d]
    times.rejected.sort()
    assert len(times.first_token_s) == n and not any(math.isnan(t) for t in times.arrival_s)
    return SimResult(
        times,
        prefill.instances + decode.instances,
        prefill.wall_s + decode.wall_s,
        prefill.num_events + decode.num_events,
    )


def _with_front_end(fleet: FleetConfig, front_end: FrontEnd) -> FleetConfig:
    return replace(fleet, instance=replace(fleet.instance, front_end=front_end))
