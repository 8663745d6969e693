"""kvos's cluster routers inside the simulator: the load they read, and chats kept where their history is."""

from __future__ import annotations

import random

import pytest

from kvos.cluster.instance import InstanceLoad
from kvos.config import SchedulerConfig
from kvos.core.request import Request
from kvos.sampling_params import SamplingParams
from kvos.sim.simulator import FleetConfig, InstanceConfig, SimInstance, Simulator
from kvos.sim.step_model import LinearStepModel
from kvos.sim.workload import SimRequest, SimSession, SimTurn

STEP_MODEL = LinearStepModel(
    prefill_intercept=0.02,
    decode_intercept=0.01,
    per_prefill_token=1e-4,
    per_attention_pair=0.0,
    per_context_token=0.0,
    per_decode=1e-3,
)


def request(req_id: str, prompt_tokens: int, first_token: int, max_tokens: int = 8) -> Request:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(req_id, [first_token] + [0] * (prompt_tokens - 1), params)


def test_a_simulated_instance_reports_the_load_a_cluster_instance_reports() -> None:
    """After a step, by hand: 10 blocks of 16, one running request holding 3, one waiting behind it."""
    config = InstanceConfig(
        scheduler=SchedulerConfig(max_num_seqs=1), kv_capacity_tokens=10 * 16, block_size=16, max_model_len=128
    )
    instance = SimInstance(config, STEP_MODEL, reports=True)
    assert instance.load == InstanceLoad(free_tokens=160, head_demand_tokens=0, num_running=0, num_waiting=0)
    instance.inbox += [request("a", 40, 1), request("b", 20, 2)]
    assert instance.start_step(0.0) is not None
    instance.finish_step()
    # a's 40 prompt tokens took ceil(40 / 16) = 3 blocks; b (20 tokens) heads the queue.
    assert instance.load == InstanceLoad(free_tokens=7 * 16, head_demand_tokens=20, num_running=1, num_waiting=1)
    assert instance.load.freeness == (112 - 20) / 1
    # Routed since the report: counted as the cluster core counts it until the next report.
    instance.routed_tokens, instance.routed_requests = 30, 1
    view = instance.view(3, [], 1.0)
    assert (view.instance_id, view.load.free_tokens, view.load.num_running, view.cached_prefix_blocks) == (3, 82, 2, 0)
    # a's two full prompt blocks were published: the view counts a prompt's leading digests it holds.
    digests = instance.kv.block_hashes_of([1] + [0] * 47)
    assert instance.view(0, digests, 1.0).cached_prefix_blocks == 2


def test_inside_a_decode_run_a_view_is_the_report_of_the_last_step_that_ended() -> None:
    """A run keeps the books as they were until it ends; the views in between, by hand.

    Pool of 5 blocks of 16. b (20 tokens, 1 output) runs and ends first: its full first block stays
    cached, and the LRU free list is then blocks 2, 3, 4, 1, 0. a (40 tokens) takes 2, 3, 4, and its
    decode run takes a block at step 9 (position 48) and at step 25 (position 64): block 1, then
    block 0, which evicts b's cached prefix."""
    config = InstanceConfig(kv_capacity_tokens=5 * 16, block_size=16, max_model_len=256)
    instance = SimInstance(config, STEP_MODEL, reports=True)
    instance.inbox.append(request("b", 20, 2, max_tokens=1))
    assert instance.start_step(0.0) is not None
    assert [u.finish_reason for u in instance.finish_step()] == ["length"]
    instance.inbox.append(request("a", 40, 1, max_tokens=100))
    end = instance.start_step(1.0)
    assert end is not None and instance.run is None  # a's prompt: an ordinary step
    instance.finish_step()
    assert instance.load.free_tokens == 2 * 16
    assert instance.start_step(end) is not None and instance.run is not None
    ends = instance.run.ends
    b_prefix = instance.kv.block_hashes_of([2] + [0] * 19)
    assert len(b_prefix) == 1

    def seen(now: float) -> tuple[int, int, int]:
        view = instance.view(0, b_prefix, now)
        return view.load.free_tokens, view.load.num_running, view.cached_prefix_blocks

    assert seen(ends[0] / 2 + ends[1] / 2) == (32, 1, 1)
    assert seen(ends[8]) == (32, 1, 1)  # step 9 ends at this instant: not reported before the arrival
    assert seen(ends[8] / 2 + ends[9] / 2) == (16, 1, 1)
    assert seen(ends[24] / 2 + ends[25] / 2) == (0, 1, 0)


def chats(num: int, tenants: bool) -> list[SimSession]:
    """Three-turn chats a second apart, each turn's prompt its history plus 20 new tokens."""
    sessions = []
    for j in range(num):
        turns, history = [], 0
        for t in range(3):
            prompt = history + 20 + 7 * j
            output = 10 + t
            turns.append(SimTurn(prompt, output, 0.0 if t == 0 else 0.5))
            history = prompt + output
        sessions.append(SimSession(0.05 * j, tuple(turns), tenant=f"user{j}" if tenants else ""))
    return sessions


def history_hit_tokens(sessions: list[SimSession]) -> int:
    """What the prefix cache gives later turns if each finds its whole history: the previous turn's
    computed tokens (its prompt and replies but the last, never fed back) in full blocks of 16."""
    total = 0
    for session in sessions:
        for before in session.turns[:-1]:
            total += (before.prompt_tokens + before.output_tokens - 1) // 16 * 16
    return total


def traffic() -> list[SimRequest]:
    """Unrelated requests (no shared prefixes) beside the chats, so the instances' loads differ."""
    rng = random.Random(1)
    requests = [SimRequest(rng.uniform(0, 3), rng.randint(100, 300), rng.randint(20, 60)) for _ in range(40)]
    return sorted(requests, key=lambda r: r.arrival_s)


@pytest.mark.parametrize("router", ["prefix-aware", "session", "least-load", "round-robin", "least-requests"])
def test_prefix_aware_and_session_routers_keep_each_chat_where_its_history_is(router: str) -> None:
    sessions = chats(3, tenants=router == "session")
    instance = InstanceConfig(kv_capacity_tokens=4096, max_model_len=512)
    result = Simulator(FleetConfig(instance, num_instances=4, router=router), STEP_MODEL).run(traffic(), sessions)
    assert not result.times.rejected
    hits = sum(i.kv.counters.primary_hit_tokens for i in result.instances)
    if router in ("prefix-aware", "session"):
        # Every later turn lands where its history is and finds all of it.
        assert hits == history_hit_tokens(sessions)
    else:
        # Routed by load or in turn, some later turns land elsewhere and compute their history again.
        assert hits < history_hit_tokens(sessions)
    assert sum(i.num_runs for i in result.instances) > 0


def test_an_unknown_router_is_named_with_the_choices() -> None:
    with pytest.raises(ValueError, match="router must be one of round-robin, least-load, prefix-aware, session, "):
        FleetConfig(router="least_load")
