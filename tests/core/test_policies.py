"""Scheduling policies with a real paged manager and hand-built step outputs (no model, no timing)."""

from __future__ import annotations

import itertools

import pytest

from kvos import LLM
from kvos.config import SchedulerConfig, parse_tenant_weights
from kvos.core.plan import SampledToken, StepOutput
from kvos.core.policies.fair import FairPolicy
from kvos.core.request import Request, RequestStatus
from kvos.core.scheduler import Scheduler
from kvos.errors import InvalidRequestError
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.sampling_params import SamplingParams
from tests.conftest import GreedyFn

EOS = 99999
_clock = itertools.count()


def make(policy: str, num_blocks: int = 256, budget: int = 64, max_seqs: int = 8, **options: object) -> Scheduler:
    kv = PagedKVCacheManager(num_blocks=num_blocks, block_size=4, max_model_len=10_000, enable_prefix_caching=False)
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, policy=policy, **options)
    return Scheduler(config, kv, frozenset({EOS}), 10_000)


def request(req_id: str, prompt: int, max_tokens: int = 4, priority: int = 0, tenant: str = "") -> Request:
    # Arrival times from a counter: the order is deterministic and ties never happen.
    return Request(
        req_id,
        [1] * prompt,
        SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        arrival_time=float(next(_clock)),
        priority=priority,
        tenant=tenant,
    )


def step(s: Scheduler) -> list[str]:
    plan = s.schedule()
    sampled = {c.req_id: SampledToken(7) for c in plan.scheduled if c.sample}
    s.update_from_output(plan, StepOutput(plan.step_id, sampled))
    return [c.req_id for c in plan.scheduled]


# -- priority ------------------------------------------------------------------------------


def test_priority_orders_admission_by_priority_then_arrival() -> None:
    s = make("priority", max_seqs=1)
    for name, prio in [("late-low", 5), ("urgent", -1), ("normal-1", 0), ("normal-2", 0)]:
        s.add(request(name, 4, priority=prio))
    assert [r.req_id for r in s.waiting] == ["urgent", "normal-1", "normal-2", "late-low"]


def test_priority_victim_under_kv_pressure_is_least_urgent_then_latest() -> None:
    s = make("priority", num_blocks=6, budget=100)
    for name, prio in [("a", 0), ("b", 2), ("c", 1)]:
        s.add(request(name, 8, max_tokens=8, priority=prio))
    step(s)  # all three admitted: 6 blocks, full
    plan = s.schedule()
    assert plan.preempted_req_ids == ["b"]
    assert s.requests["b"].status == RequestStatus.PREEMPTED


def test_priority_takes_a_slot_after_the_quantum_and_low_priority_is_not_starved() -> None:
    s = make("priority", max_seqs=1, preemption_quantum_steps=3)
    s.add(request("batch", 4, max_tokens=50, priority=5))
    assert step(s) == ["batch"]
    s.add(request("urgent", 4, max_tokens=3, priority=0))
    # The batch job has run 1 step: it keeps its slot until it has run 3.
    assert step(s) == ["batch"]
    assert step(s) == ["batch"]
    assert step(s) == ["urgent"]  # displaced: the urgent request takes the slot
    assert s.requests["batch"].status == RequestStatus.PREEMPTED
    assert step(s) == ["urgent"] and step(s) == ["urgent"]
    # Urgent load over: the batch job resumes (recomputing its prompt and tokens so far).
    assert step(s) == ["batch"]
    while s.has_unfinished():
        step(s)
    assert s.kv.num_used_blocks == 0


def test_equal_priority_never_displaces() -> None:
    s = make("priority", max_seqs=1, preemption_quantum_steps=0)
    s.add(request("first", 4, max_tokens=5))
    step(s)
    s.add(request("second", 4, max_tokens=5))
    assert [step(s) for _ in range(4)] == [["first"]] * 4


# -- fair (VTC) ----------------------------------------------------------------------------


def gap(policy: FairPolicy, a: str, b: str) -> float:
    return abs(policy.counters.get(a, 0.0) - policy.counters.get(b, 0.0))


def test_two_backlogged_tenants_stay_within_vtcs_bound() -> None:
    budget, w_in, w_out = 64, 1.0, 2.0
    s = make("fair", budget=budget, max_seqs=4)
    policy = s.waiting
    assert isinstance(policy, FairPolicy)
    sizes = {"heavy": (48, 16), "light": (8, 4)}  # (prompt, output) per request
    ids = itertools.count()
    bound = 2 * max(w_in * max(p for p, _ in sizes.values()), w_out * budget)
    worst = 0.0
    for _ in range(300):
        for tenant, (prompt, out) in sizes.items():
            while sum(1 for r in s.waiting if r.tenant == tenant) < 3:  # always backlogged
                s.add(request(f"{tenant}-{next(ids)}", prompt, max_tokens=out, tenant=tenant))
        step(s)
        worst = max(worst, gap(policy, "heavy", "light"))
        assert gap(policy, "heavy", "light") <= bound
    assert policy.counters["light"] > 1000 and policy.counters["heavy"] > 1000  # both were served
    assert worst > 0


def test_weighted_tenants_converge_to_their_weights() -> None:
    s = make("fair", budget=32, max_seqs=2, tenant_weights=parse_tenant_weights("alice=2,bob=1"))
    ids = itertools.count()
    service = {"alice": 0, "bob": 0}
    for _ in range(600):
        for tenant in service:
            while sum(1 for r in s.waiting if r.tenant == tenant) < 2:
                s.add(request(f"{tenant}-{next(ids)}", 8, max_tokens=8, tenant=tenant))
        plan = s.schedule()
        sampled = {c.req_id: SampledToken(7) for c in plan.scheduled if c.sample}
        for c in plan.scheduled:
            service[s.requests[c.req_id].tenant] += len(c.new_token_ids) + (c.req_id in sampled)
        s.update_from_output(plan, StepOutput(plan.step_id, sampled))
    assert 1.7 < service["alice"] / service["bob"] < 2.3


def test_an_idle_tenant_gets_no_burst_of_credit() -> None:
    s = make("fair", budget=32, max_seqs=1)
    policy = s.waiting
    assert isinstance(policy, FairPolicy)
    ids = itertools.count()
    for _ in range(100):  # alice alone for a long time
        if not len(s.waiting):
            s.add(request(f"alice-{next(ids)}", 8, max_tokens=4, tenant="alice"))
        step(s)
    s.add(request("bob-0", 8, max_tokens=4, tenant="bob"))
    # Bob's counter starts where alice's is, not at zero: he does not get the next 100 steps to himself.
    assert policy.counters["bob"] >= policy.counters["alice"] - 2 * 32 * 2
    order = []
    for _ in range(40):
        for tenant in ("alice", "bob"):
            if not any(r.tenant == tenant for r in s.waiting):
                s.add(request(f"{tenant}-{next(ids)}", 8, max_tokens=4, tenant=tenant))
        order += [s.requests[r].tenant for r in step(s) if r in s.requests]
    assert order.count("alice") > 10 and order.count("bob") > 10


# -- configuration ---------------------------------------------------------------------------


def test_bad_policy_options_are_named() -> None:
    with pytest.raises(ValueError, match="policy must be one of fcfs, priority, fair, got 'lottery'"):
        SchedulerConfig(policy="lottery")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot read 'bob'"):
        parse_tenant_weights("alice=2,bob")
    with pytest.raises(ValueError, match="cannot read 'carol=-1'"):
        parse_tenant_weights("carol=-1")
    with pytest.raises(ValueError, match="tenant weight of 'x' must be > 0"):
        SchedulerConfig(tenant_weights=(("x", 0.0),))


# -- policies reorder, never alter -------------------------------------------------------------


@pytest.mark.parametrize("policy", ["fcfs", "priority", "fair"])
def test_greedy_tokens_are_identical_under_every_policy(policy: str, hf_smollm: GreedyFn) -> None:
    texts = ["The capital of France is", "def fibonacci(n):", "Water boils at", "My favourite colour is"]
    with LLM(policy=policy, max_num_seqs=2, kv_cache_memory_bytes=32 * 2**20, dtype="float32") as llm:
        prompts = [llm.tokenizer.encode(t) for t in texts]
        priority = [3, 0, 2, 1] if policy == "priority" else None
        outputs = llm.generate(
            prompts, SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False, priority=priority
        )
        assert [o.outputs[0].token_ids for o in outputs] == hf_smollm(prompts, 6)


def test_priority_under_fcfs_is_refused_naming_the_flag() -> None:
    with LLM(kv_cache_memory_bytes=16 * 2**20, dtype="float32") as llm:
        with pytest.raises(InvalidRequestError, match="needs --scheduling-policy priority") as refused:
            llm.generate(["Hi"], priority=[1], use_tqdm=False)
        assert refused.value.param == "priority"


def test_fair_preemption_hands_a_starved_tenant_a_slot() -> None:
    s = make("fair", budget=64, max_seqs=1, fair_preemption_lead=20.0, preemption_quantum_steps=2)
    s.add(request("hog", 8, max_tokens=200, tenant="hog"))
    for _ in range(10):
        step(s)  # the hog runs alone and piles up service
    s.add(request("starved", 8, max_tokens=2, tenant="newcomer"))
    # The newcomer was lifted to the hog's counter on arrival: no lead yet, no preemption.
    assert step(s) == ["hog"]
    for _ in range(12):
        if "starved" in step(s):
            break
    else:
        raise AssertionError("the starved tenant never got a slot")
    assert s.requests["hog"].status == RequestStatus.PREEMPTED
    assert s.preemptions_by_reason["displaced"] == 1


def test_without_fair_preemption_a_starved_tenant_waits_for_a_free_slot() -> None:
    s = make("fair", budget=64, max_seqs=1)
    s.add(request("hog", 8, max_tokens=30, tenant="hog"))
    step(s)
    s.add(request("starved", 8, max_tokens=2, tenant="newcomer"))
    ran = [step(s) for _ in range(29)]
    assert all(r == ["hog"] for r in ran)
    assert step(s) == ["starved"]


def test_a_sibling_queued_ahead_of_its_preempted_parent_does_not_stall() -> None:
    s = make("priority", max_seqs=1, preemption_quantum_steps=1)
    parent = request("p", 6, max_tokens=3)
    s.add(parent)
    s.add(
        Request(
            "p#1",
            list(parent.prompt_token_ids),
            parent.params,
            arrival_time=parent.arrival_time,
            fork_of="p",
            seed_offset=1,
        )
    )
    step(s)
    s.add(request("urgent", 4, max_tokens=2, priority=-1))
    for _ in range(40):  # the urgent one displaces the parent, which requeues behind its sibling
        if not s.has_unfinished():
            break
        step(s)
    assert not s.has_unfinished() and s.kv.num_used_blocks == 0
