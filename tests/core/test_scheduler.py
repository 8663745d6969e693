"""Scheduling decisions with a real paged manager and no model."""

from __future__ import annotations

import pickle

from kvos.config import SchedulerConfig
from kvos.core.plan import SampledToken, StepOutput, TableUpdate
from kvos.core.request import Request, RequestStatus
from kvos.core.scheduler import Scheduler
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.memory.tiers.disk import DiskBlockIndex
from kvos.sampling_params import SamplingParams

EOS = 99


def make(num_blocks: int, budget: int, max_seqs: int = 8) -> Scheduler:
    kv = PagedKVCacheManager(num_blocks=num_blocks, block_size=4, max_model_len=1000, enable_prefix_caching=False)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs), kv, frozenset({EOS}), 1000)


def request(req_id: str, n: int) -> Request:
    return Request(req_id=req_id, prompt_token_ids=list(range(n)), params=SamplingParams(max_tokens=8))


def run_step(s: Scheduler, token: int = 0) -> dict[str, int]:
    """Schedule, then pretend the model ran: every request that samples gets `token`."""
    plan = s.schedule()
    sampled = {c.req_id: SampledToken(token) for c in plan.scheduled if c.sample}
    s.update_from_output(plan, StepOutput(plan.step_id, sampled))
    return {c.req_id: len(c.new_token_ids) for c in plan.scheduled}


def test_long_prompt_is_chunked_and_decodes_are_not_stalled() -> None:
    s = make(num_blocks=64, budget=8)
    s.add(request("short", 3))
    assert run_step(s) == {"short": 3}
    s.add(request("long", 20))
    # The decode goes first; the long prompt takes what is left of the budget.
    assert run_step(s) == {"short": 1, "long": 7}
    assert run_step(s) == {"short": 1, "long": 7}
    assert run_step(s) == {"short": 1, "long": 6}
    assert run_step(s) == {"short": 1, "long": 1}


def test_max_num_seqs_limits_admission_fcfs() -> None:
    s = make(num_blocks=64, budget=100, max_seqs=2)
    for i in range(3):
        s.add(request(f"r{i}", 4))
    assert list(run_step(s)) == ["r0", "r1"]
    s.abort("r0")
    assert list(run_step(s)) == ["r1", "r2"]


def test_out_of_memory_preempts_most_recent_and_requeues_it_first() -> None:
    s = make(num_blocks=4, budget=100)
    a, b = request("a", 8), request("b", 4)
    s.add(a)
    s.add(b)
    assert run_step(s) == {"a": 8, "b": 4}
    # a needs a new block for its 9th token; the only way is to evict b.
    plan = s.schedule()
    assert plan.preempted_req_ids == ["b"]
    assert [c.req_id for c in plan.scheduled] == ["a"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.waiting.peek() is b
    assert s.num_preemptions == 1
    assert s.kv.num_used_blocks == 3


def test_plan_round_trips_through_pickle_and_names_placement() -> None:
    s = make(num_blocks=64, budget=6)
    s.add(request("a", 10))
    plan = s.schedule()
    again = pickle.loads(pickle.dumps(plan))
    assert again == plan
    (chunk,) = again.scheduled
    assert chunk.new_token_ids == list(range(6)) and chunk.num_computed_tokens == 0 and not chunk.sample
    assert chunk.table_update is not None and chunk.table_update.start == 0
    assert list(chunk.table_update.block_ids) == s.kv.block_table(s.requests["a"])
    assert [d.req_id for d in again.new_requests] == ["a"]


def test_update_from_output_finishes_on_eos_stop_token_and_max_tokens() -> None:
    s = make(num_blocks=64, budget=100)
    eos = request("eos", 3)
    stop = Request("stop", [1, 2], SamplingParams(max_tokens=8, stop_token_ids=[7]))
    short = Request("short", [1, 2], SamplingParams(max_tokens=2))
    for r in (eos, stop, short):
        s.add(r)
    plan = s.schedule()
    tokens = {"eos": EOS, "stop": 7, "short": 5}
    s.update_from_output(plan, StepOutput(plan.step_id, {k: SampledToken(v) for k, v in tokens.items()}))
    assert (eos.finish_reason, eos.stop_reason) == ("stop", EOS)
    assert (stop.finish_reason, stop.stop_reason) == ("stop", 7)
    assert short.status == RequestStatus.RUNNING
    run_step(s, token=5)
    assert short.finish_reason == "length" and short.output_token_ids == [5, 5]
    assert s.kv.num_used_blocks == 0 and not s.has_unfinished()
    # The worker hears of every ended request in the next plan.
    assert sorted(s.schedule().finished_req_ids) == ["short"]


def test_n_siblings_obey_max_num_seqs_and_the_token_budget() -> None:
    s = make(num_blocks=64, budget=100, max_seqs=2)
    params = SamplingParams(max_tokens=4)
    s.add(Request("p", [1, 2, 3, 4, 5, 6], params))
    for i in (1, 2):
        s.add(Request(f"p#{i}", [1, 2, 3, 4, 5, 6], params, fork_of="p", seed_offset=i))
    assert run_step(s) == {"p": 6}  # siblings wait until the prompt is computed
    # One slot is left: one sibling forks (computing only the last prompt token), the other waits.
    assert run_step(s) == {"p": 1, "p#1": 1}
    assert len(s.running) == 2 and [r.req_id for r in s.waiting] == ["p#2"]
    parent, child = s.requests["p"], s.requests["p#1"]
    # The child shares the parent's first full block and has its own copy of the partial one.
    assert s.kv.block_table(child)[0] == s.kv.block_table(parent)[0]
    assert s.kv.block_table(child)[1] != s.kv.block_table(parent)[1]


def test_fork_plans_a_copy_on_write_of_the_shared_partial_block() -> None:
    s = make(num_blocks=64, budget=100)
    params = SamplingParams(max_tokens=4)
    s.add(Request("p", [1, 2, 3, 4, 5, 6], params))
    s.add(Request("p#1", [1, 2, 3, 4, 5, 6], params, fork_of="p", seed_offset=1))
    run_step(s)
    plan = s.schedule()
    parent_tail = s.kv.block_table(s.requests["p"])[1]
    child_tail = s.kv.block_table(s.requests["p#1"])[1]
    (copy,) = plan.copies
    assert (copy.src_slot, copy.dst_slot, copy.num_slots) == (parent_tail * 4, child_tail * 4, 4)
    (child_chunk,) = [c for c in plan.scheduled if c.req_id == "p#1"]
    assert child_chunk.num_computed_tokens == 5 and child_chunk.new_token_ids == [6] and child_chunk.sample


def test_a_parent_resumed_on_blocks_this_step_writes_is_not_forked_until_they_are_written() -> None:
    """The parent comes back after a preemption (prompt and first output token known) and finds its whole
    prompt as prefix hits on blocks that `q`, planned first in the same step, is writing. Forking it in
    that step would copy its shared tail block before the forward pass fills it: the sibling would
    decode from garbage."""
    kv = PagedKVCacheManager(num_blocks=16, block_size=4, max_model_len=1000)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=8), kv, frozenset({EOS}), 1000)
    prompt, params = [1, 2, 3, 4, 5, 6, 7, 8], SamplingParams(max_tokens=4)
    s.add(Request("q", [*prompt, 20, 21], params))
    s.add(Request("p", list(prompt), params, output_token_ids=[9]))
    s.add(Request("p#1", list(prompt), params, fork_of="p", seed_offset=1))
    plan = s.schedule()
    q_blocks = kv.block_table(s.requests["q"])[:2]
    assert kv.block_table(s.requests["p"])[:2] == q_blocks  # p's prompt: hits on what q writes now
    written = {q_blocks[0], q_blocks[1]}
    assert not any(copy.src_slot // 4 in written for copy in plan.copies)
    assert [c.req_id for c in plan.scheduled] == ["q", "p"]  # the sibling waits for the blocks to be written
    s.update_from_output(plan, StepOutput(plan.step_id, {c.req_id: SampledToken(0) for c in plan.scheduled}))
    plan = s.schedule()
    (copy,) = plan.copies  # now written: the sibling forks, copying the shared tail
    assert copy.src_slot == q_blocks[1] * 4 and [c.req_id for c in plan.scheduled] == ["q", "p", "p#1"]


def test_waiting_requests_prefetches_give_way_to_the_head_when_nothing_runs() -> None:
    """`w` prefetched its prefix from disk into two of the pool's four blocks, then `h` (more urgent) came
    and needs all four. Nothing runs, so unless `w` lets go, neither ever runs."""
    kv = PagedKVCacheManager(num_blocks=4, block_size=4, max_model_len=1000, disk=DiskBlockIndex(8))
    keys = kv.block_hashes_of(list(range(8)))
    kv.disk = DiskBlockIndex(8, keys)  # as a restarted engine finds them
    config = SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=8, policy="priority")
    s = Scheduler(config, kv, frozenset({EOS}), 1000)
    s.add(Request("w", [*range(8), 99], SamplingParams(max_tokens=2), priority=1))
    plan = s.schedule()
    assert not plan.scheduled and len(plan.disk_loads) == 2 and kv.num_used_blocks == 2
    s.update_from_output(plan, StepOutput(plan.step_id, disk_loaded=[op.key for op in plan.disk_loads]))
    s.add(Request("h", list(range(100, 113)), SamplingParams(max_tokens=3), priority=0))
    assert run_step(s) == {"h": 13}
    for _ in range(8):  # h decodes and ends; w prefetches again (h evicted its blocks) and runs
        plan = s.schedule()
        sampled = {c.req_id: SampledToken(5) for c in plan.scheduled if c.sample}
        s.update_from_output(plan, StepOutput(plan.step_id, sampled, disk_loaded=[op.key for op in plan.disk_loads]))
    assert not s.has_unfinished() and kv.num_used_blocks == 0


def test_a_migrated_in_request_gets_its_whole_table_with_its_first_scheduled_chunk() -> None:
    """`a` arrives by live migration (12 tokens of KV copied into reserved blocks) while `long`, ahead of it,
    prefills in chunks that take the whole token budget, so the plan that introduces `a` to the worker
    cannot schedule it. Its whole table must still reach the worker, with the first chunk it does run."""
    s = make(num_blocks=16, budget=4)
    s.add(request("long", 12))
    run_step(s)
    a = Request("a", list(range(10)), SamplingParams(max_tokens=8), output_token_ids=[5, 6, 7])
    a.num_computed_tokens = 12  # the last sampled token is computed here, as after any decode step
    assert s.kv.reserve(a, 12) is not None  # type: ignore[attr-defined]
    s.attach(a)
    plan = s.schedule()
    assert [d.req_id for d in plan.new_requests] == ["a"] and [c.req_id for c in plan.scheduled] == ["long"]
    s.update_from_output(plan, StepOutput(plan.step_id))
    assert run_step(s) == {"long": 4}
    plan = s.schedule()
    (chunk,) = [c for c in plan.scheduled if c.req_id == "a"]
    assert chunk.table_update == TableUpdate(0, tuple(s.kv.block_table(a)))


def test_token_slice_equals_slicing_all_token_ids() -> None:
    r = Request("r", [1, 2, 3, 4], SamplingParams(max_tokens=8))
    r.output_token_ids.extend([5, 6, 7])
    every = r.all_token_ids
    for start in range(8):
        for end in range(start, 8):
            assert r.token_slice(start, end) == every[start:end]
