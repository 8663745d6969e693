"""Scheduling decisions with a real paged manager and no model."""

from __future__ import annotations

import torch

from kvos.config import SchedulerConfig
from kvos.engine.request import Request, RequestStatus
from kvos.engine.scheduler import Scheduler
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.sampling_params import SamplingParams


def make(num_blocks: int, budget: int, max_seqs: int = 8) -> Scheduler:
    kv = PagedKVCacheManager(
        num_blocks=num_blocks, block_size=4, num_layers=1, num_kv_heads=1, head_dim=2,
        dtype=torch.float32, device="cpu", max_model_len=1000, enable_prefix_caching=False,
    )
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs), kv)


def request(req_id: str, n: int) -> Request:
    return Request(req_id=req_id, prompt_token_ids=list(range(n)), params=SamplingParams(max_tokens=8))


def run_step(s: Scheduler) -> dict[str, int]:
    """Schedule, then pretend the model ran: advance counters, sample token 0."""
    out = s.schedule()
    for c in out.chunks:
        done = c.completes_known_tokens
        c.request.num_computed_tokens += c.num_tokens
        if done:
            c.request.output_token_ids.append(0)
    return {c.request.req_id: c.num_tokens for c in out.chunks}


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
    s.remove(s.running[0])
    assert list(run_step(s)) == ["r1", "r2"]


def test_out_of_memory_preempts_most_recent_and_requeues_it_first() -> None:
    s = make(num_blocks=4, budget=100)
    a, b = request("a", 8), request("b", 4)
    s.add(a)
    s.add(b)
    assert run_step(s) == {"a": 8, "b": 4}
    # a needs a new block for its 9th token; the only way is to evict b.
    out = s.schedule()
    assert [r.req_id for r in out.preempted] == ["b"]
    assert [c.request.req_id for c in out.chunks] == ["a"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.waiting[0] is b
    assert s.num_preemptions == 1
    assert s.kv.num_used_blocks == 3
