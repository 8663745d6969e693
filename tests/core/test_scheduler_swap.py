"""Preemption by swap: the plans the scheduler emits (exact ops), progress restored, no leaks."""

from __future__ import annotations

import pytest

from kvos.config import SchedulerConfig
from kvos.core.plan import LoadFromHost, SampledToken, SaveToHost, StepOutput, StepPlan
from kvos.core.request import Request, RequestStatus
from kvos.core.scheduler import KV_LOAD_FAILED, Scheduler
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.memory.tiers.host import HostBlockPool
from kvos.memory.tiers.swap import PreemptionRule, SwapCost
from kvos.sampling_params import SamplingParams

EOS = 99


def make(num_blocks: int, num_host_blocks: int, mode: str = "swap", prefix_caching: bool = False) -> Scheduler:
    kv = PagedKVCacheManager(
        num_blocks=num_blocks,
        block_size=4,
        max_model_len=1000,
        enable_prefix_caching=prefix_caching,
        host=HostBlockPool(num_host_blocks),
    )
    rule = PreemptionRule("swap") if mode == "swap" else PreemptionRule("recompute")
    return Scheduler(SchedulerConfig(max_num_batched_tokens=100), kv, frozenset({EOS}), 1000, preemption=rule)


def request(req_id: str, n: int, max_tokens: int = 8) -> Request:
    return Request(req_id=req_id, prompt_token_ids=list(range(n)), params=SamplingParams(max_tokens=max_tokens))


def finish_step(s: Scheduler, plan: StepPlan, token: int = 0) -> None:
    sampled = {c.req_id: SampledToken(token) for c in plan.scheduled if c.sample}
    # As the worker does: a waiting request's loads are done by the end of the step.
    s.update_from_output(
        plan, StepOutput(plan.step_id, sampled, kv_loaded=[(k.req_id, plan.step_id) for k in plan.kv_loads])
    )


def test_out_of_memory_swaps_the_victim_out_and_back_in_with_its_progress() -> None:
    s = make(num_blocks=4, num_host_blocks=8)
    a, b = request("a", 8), request("b", 4)
    s.add(a)
    s.add(b)
    finish_step(s, s.schedule())
    b_block = s.kv.block_table(b)[0]
    # a takes the last free block for its 9th token; b needs a second block for its 5th and is the victim.
    plan = s.schedule()
    assert plan.preempted_req_ids == ["b"]
    assert plan.saves == [SaveToHost(b_block, 0)]
    assert b.status == RequestStatus.PREEMPTED and b.num_swapped_tokens == 4 and b.num_computed_tokens == 0
    assert s.preemptions_by_mode == {"swap": 1, "recompute": 0}
    finish_step(s, plan)
    s.abort("a")  # room again
    plan = s.schedule()
    (resumed,) = plan.scheduled
    assert resumed.req_id == "b"
    assert resumed.num_computed_tokens == 4 and resumed.new_token_ids == [0]  # only the sampled token: no recompute
    assert resumed.table_update is not None and len(resumed.table_update.block_ids) == 2
    assert plan.loads == [LoadFromHost(0, resumed.table_update.block_ids[0])]
    assert [n.req_id for n in plan.new_requests] == ["b"]
    assert b.num_cached_tokens == 0  # a swap-in is not a prefix-cache hit
    finish_step(s, plan)
    assert b.num_computed_tokens == 5 and b.num_swapped_tokens == 0


def test_recompute_mode_frees_the_victim_and_moves_nothing() -> None:
    s = make(num_blocks=4, num_host_blocks=8, mode="recompute")
    s.add(request("a", 8))
    s.add(request("b", 4))
    finish_step(s, s.schedule())
    plan = s.schedule()
    assert plan.preempted_req_ids == ["b"] and plan.saves == [] and plan.loads == []
    assert s.preemptions_by_mode == {"swap": 0, "recompute": 1}


def test_full_host_tier_falls_back_to_recompute() -> None:
    s = make(num_blocks=4, num_host_blocks=1)
    s.add(request("a", 8))
    s.add(request("b", 8))
    finish_step(s, s.schedule())
    plan = s.schedule()  # b holds two blocks: the host tier has room for one
    assert plan.preempted_req_ids == ["b"] and plan.saves == []
    assert s.preemptions_by_mode == {"swap": 0, "recompute": 1}


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_every_tier_returns_to_baseline_when_all_requests_end(prefix_caching: bool) -> None:
    s = make(num_blocks=6, num_host_blocks=12, prefix_caching=prefix_caching)
    for i in range(6):
        s.add(request(f"r{i}", 3 + 2 * i, max_tokens=6 + i))
    for _ in range(200):
        if not s.has_unfinished():
            break
        finish_step(s, s.schedule(), token=1)
    assert not s.has_unfinished()
    assert s.preemptions_by_mode["swap"] > 0
    kv = s.kv
    assert isinstance(kv, PagedKVCacheManager) and kv.host is not None
    assert kv.num_used_blocks == 0 and kv.host.num_held_blocks == 0 and kv.num_host_copies == 0
    # What stays is cache (findable by digest), and only with prefix caching on.
    assert (kv.host.num_idle_cached_blocks > 0) == prefix_caching


def test_auto_swaps_when_the_copy_is_cheaper_than_recompute() -> None:
    cost = SwapCost(
        copy_bytes_per_s=1e9, flops_per_s=1e9, bytes_per_token=2000, num_parameters=1000, num_layers=1, q_dim=8
    )
    rule = PreemptionRule("auto", cost)
    # swap: 2 x n x 2000 B / 1e9 B/s = 4n us; recompute: (2 x 1000 x n + 2 x 8 x n^2) / 1e9 = (2n + 0.016 n^2) us:
    # recompute wins below n = 125 tokens, swap above (attention's quadratic term).
    assert not rule.chooses_swap(100)
    assert rule.chooses_swap(200)
    assert not PreemptionRule("swap").chooses_swap(0)  # nothing computed: nothing to save
    assert PreemptionRule("swap").chooses_swap(1) and not PreemptionRule("recompute").chooses_swap(1000)


def test_auto_without_a_cost_model_is_refused() -> None:
    with pytest.raises(ValueError, match="auto"):
        PreemptionRule("auto")


def swapped_b_beside_running_c() -> tuple[Scheduler, Request, Request]:
    """b swapped out (4 tokens) while a and c ran; a ends, so b resumes while c keeps decoding."""
    s = make(num_blocks=5, num_host_blocks=8)
    a, b, c = request("a", 8), request("b", 4), request("c", 3, max_tokens=20)
    for r in (c, a, b):
        s.add(r)
    finish_step(s, s.schedule())
    plan = s.schedule()  # a and c grow; b is the victim
    assert plan.preempted_req_ids == ["b"] and b.num_swapped_tokens == 4
    finish_step(s, plan)
    s.abort("a")
    return s, b, c


def test_a_swap_in_loads_while_the_others_compute_and_runs_once_reported() -> None:
    s, b, c = swapped_b_beside_running_c()
    d = request("d", 2)
    s.add(d)  # queued behind b
    plan = s.schedule()
    assert [x.req_id for x in plan.scheduled] == ["c"]  # b computes nothing while its KV comes up
    (kv_load,) = plan.kv_loads
    assert kv_load.req_id == "b" and b.status == RequestStatus.LOADING
    assert kv_load.loads == (LoadFromHost(0, kv_load.table_update.block_ids[0]),) and plan.loads == []
    assert [n.req_id for n in plan.new_requests] == ["b"]  # d is not admitted in b's loading step
    # The worker has not finished the copy: b keeps waiting in its own state, c goes on.
    s.update_from_output(plan, StepOutput(plan.step_id, {"c": SampledToken(0)}))
    plan2 = s.schedule()
    assert [x.req_id for x in plan2.scheduled] == ["c", "d"] and b.status == RequestStatus.LOADING
    sampled = {x.req_id: SampledToken(0) for x in plan2.scheduled if x.sample}
    s.update_from_output(plan2, StepOutput(plan2.step_id, sampled, kv_loaded=[("b", plan.step_id)]))
    assert b.status == RequestStatus.RUNNING
    plan3 = s.schedule()
    resumed = next(x for x in plan3.scheduled if x.req_id == "b")
    assert resumed.num_computed_tokens == 4 and resumed.new_token_ids == [0]  # no recompute
    assert resumed.table_update is None  # the worker took b's table with the loads


def test_aborting_a_loading_request_gives_back_every_tier() -> None:
    s, b, c = swapped_b_beside_running_c()
    plan = s.schedule()
    assert plan.kv_loads and b.status == RequestStatus.LOADING
    s.abort("b")
    assert "b" not in s.loading and b.status == RequestStatus.FINISHED
    # A late report of the aborted request's load changes nothing.
    s.update_from_output(plan, StepOutput(plan.step_id, {"c": SampledToken(0)}, kv_loaded=[("b", plan.step_id)]))
    assert all(r is not b for r in s.running)
    s.abort("c")
    kv = s.kv
    assert isinstance(kv, PagedKVCacheManager) and kv.host is not None
    assert kv.num_used_blocks == 0 and kv.host.num_held_blocks == 0 and kv.num_host_copies == 0


def test_a_failed_load_ends_that_request_alone_with_a_message() -> None:
    s, b, c = swapped_b_beside_running_c()
    plan = s.schedule()
    updates = s.update_from_output(
        plan, StepOutput(plan.step_id, {"c": SampledToken(0)}, kv_load_failed=[("b", plan.step_id, "OSError: x")])
    )
    (failed,) = [u for u in updates if u.req_id == "b"]
    assert failed.finish_reason == "abort" and failed.error == KV_LOAD_FAILED
    assert c.status == RequestStatus.RUNNING and "b" not in s.requests


def test_a_failed_step_sends_its_loading_requests_back_to_recompute() -> None:
    s, b, c = swapped_b_beside_running_c()
    plan = s.schedule()
    assert plan.kv_loads
    s.fail_step(plan, "boom")
    assert b.status == RequestStatus.PREEMPTED and b.num_swapped_tokens == 0 and "b" not in s.loading
    assert "c" not in s.requests  # c was in the failed forward pass
    plan = s.schedule()
    (rerun,) = plan.scheduled
    assert rerun.req_id == "b" and rerun.num_computed_tokens == 0  # recomputed from the start
    kv = s.kv
    assert isinstance(kv, PagedKVCacheManager) and kv.host is not None and kv.host.num_held_blocks == 0


def test_a_victim_whose_swap_out_was_never_written_computes_its_kv_again() -> None:
    s, b, c = swapped_b_beside_running_c()
    kv = s.kv
    assert isinstance(kv, PagedKVCacheManager) and kv.host is not None
    (host_block,) = kv._host_copies["b"].host_block_ids
    # The worker reports the swap-out's save failed (with the output of a later step).
    s.update_from_output(StepPlan(99), StepOutput(99, host_save_failed=[host_block]))
    assert b.status == RequestStatus.PREEMPTED and b.num_swapped_tokens == 0
    assert kv.host.num_held_blocks == 0 and kv.num_host_copies == 0
    plan = s.schedule()
    rerun = next(x for x in plan.scheduled if x.req_id == "b")
    assert rerun.num_computed_tokens == 0 and rerun.new_token_ids == [0, 1, 2, 3, 0]  # prompt and its token
    assert not plan.kv_loads and not plan.loads


def test_a_request_loading_from_a_block_never_written_goes_back_to_recompute() -> None:
    s, b, c = swapped_b_beside_running_c()
    plan = s.schedule()
    assert plan.kv_loads and b.status == RequestStatus.LOADING
    (host_block,) = (op.host_block_id for op in plan.kv_loads[0].loads)
    # The failure is heard while b's load is still in flight; the load's own report (failed) comes later.
    s.update_from_output(plan, StepOutput(plan.step_id, {"c": SampledToken(0)}, host_save_failed=[host_block]))
    assert b.status == RequestStatus.PREEMPTED and "b" not in s.loading and b.num_swapped_tokens == 0
    plan2 = s.schedule()
    late = [("b", plan.step_id, "UnwrittenHostBlock: host block 0's save failed")]
    sampled = {x.req_id: SampledToken(0) for x in plan2.scheduled if x.sample}
    updates = s.update_from_output(plan2, StepOutput(plan2.step_id, sampled, kv_load_failed=late))
    assert all(u.error is None for u in updates)  # the stale report ends nobody
    rerun = next(x for x in plan2.scheduled if x.req_id == "b")
    assert rerun.num_computed_tokens == 0 and b.status == RequestStatus.RUNNING


def test_a_host_block_never_written_is_found_by_no_prefix_lookup() -> None:
    s = make(num_blocks=3, num_host_blocks=4, prefix_caching=True)
    kv = s.kv
    assert isinstance(kv, PagedKVCacheManager) and kv.host is not None
    s.add(request("a", 9, max_tokens=1))
    finish_step(s, s.schedule())  # a ends; its two full blocks stay cached in the pool
    s.add(Request("b", list(range(100, 109)), SamplingParams(max_tokens=1)))
    plan = s.schedule()  # b needs the pool: a's blocks are written back to the host tier
    again = request("again", 9)
    assert sum(op.num_blocks for op in plan.saves) == 2 and kv.tier_hits(again)["host"] == 8
    first = kv.host.lookup(kv.block_hashes(again)[0])
    assert first is not None
    finish_step(s, plan)
    s.update_from_output(StepPlan(99), StepOutput(99, host_save_failed=[first]))
    assert kv.tier_hits(again) == {"primary": 0, "host": 0, "disk": 0}  # the chain breaks at its first block
    assert kv.host.lookup(kv.block_hashes(again)[1]) is not None  # the second block's save was fine


def test_a_request_failed_by_the_worker_publishes_nothing_it_computed() -> None:
    s = make(num_blocks=8, num_host_blocks=4, prefix_caching=True)
    s.add(request("a", 9))
    plan = s.schedule()
    updates = s.update_from_output(plan, StepOutput(plan.step_id, failed={"a": "its KV was not its own"}))
    assert [(u.req_id, u.finish_reason, u.error) for u in updates] == [("a", "abort", "its KV was not its own")]
    assert s.kv.lookup_prefix(request("again", 9)) == 0
