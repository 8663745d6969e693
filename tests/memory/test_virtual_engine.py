"""The engine on the virtual KV cache: the same greedy tokens, memory given back.

The golden set is HF transformers' greedy output, which the paged cache is held
to in tests/engine/test_engine_equivalence.py on the same prompts, so matching
it here means matching the paged backend token for token.
"""

from __future__ import annotations

import pytest

from kvos import LLM, SamplingParams
from kvos.memory.virtual import VirtualKVCacheManager
from tests.conftest import GreedyFn
from tests.engine.test_engine_equivalence import MAX_NEW, TEXTS, greedy

BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4  # SmolLM2-135M, fp32


@pytest.fixture(scope="module")
def virtual() -> LLM:
    # 4 slots for 9 prompts: later requests must reuse rows of finished ones.
    return LLM(kv_cache="virtual", kv_cache_memory_bytes=64 * 2**20, max_num_seqs=4, dtype="float32")


@pytest.fixture(scope="module")
def prompts(virtual: LLM) -> list[list[int]]:
    return [virtual.tokenizer.encode(t) for t in TEXTS]


def kv_of(llm: LLM) -> VirtualKVCacheManager:
    kv = llm.engine.kv_manager
    assert isinstance(kv, VirtualKVCacheManager)
    return kv


def test_greedy_tokens_match_hf_with_slot_reuse(virtual: LLM, prompts: list[list[int]], hf_smollm: GreedyFn) -> None:
    outputs = virtual.generate(prompts, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_smollm(prompts, MAX_NEW)
    kv = kv_of(virtual)
    assert kv.num_used_blocks == 0
    # Every page still committed belongs to an idle row, kept for its next tenant.
    assert kv.num_deferred_pages == kv.num_committed_pages > 0
    assert kv.region.rss_bytes() == kv.committed_bytes
    assert kv.release_idle_pages() > 0
    assert kv.num_committed_pages == 0 and kv.region.rss_bytes() == 0


def test_decode_crosses_pages_and_keeps_the_page_map_exact(virtual: LLM, prompts: list[list[int]]) -> None:
    engine = virtual.engine
    kv = kv_of(virtual)
    engine.add_request("long", prompts[4], greedy(16))
    engine.step()  # prefill
    request = engine.scheduler.running[0]
    row = kv.row_of(request)
    needed = [kv.table.needed[row]]
    while engine.has_unfinished_requests():
        engine.step()
        if engine.has_unfinished_requests():
            needed.append(kv.table.needed[row])
            kv.wait_for_mapper()
            assert kv.region.rss_bytes() == kv.committed_bytes
    assert needed[-1] > needed[0]  # pages were committed between decode steps
    assert kv.num_used_blocks == 0


def test_tight_budget_reclaims_preempts_and_still_matches_hf(prompts: list[list[int]], hf_smollm: GreedyFn) -> None:
    # Room for 100 tokens; these need 26 + 31 + 49 + 30: requests get preempted, and
    # rows are refilled only by reclaiming pages that finished requests left mapped.
    budget = 100 * BYTES_PER_TOKEN
    llm = LLM(kv_cache="virtual", kv_cache_memory_bytes=budget, max_num_seqs=4, dtype="float32")
    outputs = llm.generate(prompts[3:7], greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_smollm(prompts, MAX_NEW)[3:7]
    kv = kv_of(llm)
    assert kv.table.num_reclaimed_pages > 0
    assert llm.engine.stats().num_preemptions > 0
    assert kv.num_used_blocks == 0 and kv.committed_bytes <= budget


def test_n_greater_than_one_forks_a_copy_of_the_prompt(
    virtual: LLM, prompts: list[list[int]], hf_smollm: GreedyFn
) -> None:
    kv = kv_of(virtual)
    queried_before, _ = kv.prefix_cache_stats()
    params = SamplingParams(n=2, temperature=0.0, max_tokens=6)
    (out,) = virtual.generate([prompts[0]], params, use_tqdm=False)
    expected = hf_smollm([prompts[0]], MAX_NEW)[0][:6]
    assert [c.token_ids for c in out.outputs] == [expected] * 2
    # Only the first sequence was admitted with its prompt; the sibling got a copy of its KV.
    assert kv.prefix_cache_stats()[0] - queried_before == len(prompts[0])
    assert kv.num_used_blocks == 0


def test_over_long_request_is_refused_with_a_clear_error(virtual: LLM) -> None:
    engine = virtual.engine
    capacity = engine.kv_manager.capacity_tokens  # 64 MiB of 46080-byte tokens
    with pytest.raises(ValueError, match=rf"needs {capacity + 1} tokens of KV cache.*at most {capacity} fit"):
        engine.add_request("x", list(range(10, 20)), SamplingParams(max_tokens=capacity - 9))
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        engine.add_request("y", [1, 2, 3], SamplingParams(max_tokens=engine.max_model_len))
    assert not engine.has_unfinished_requests()


def test_close_gives_the_region_back(prompts: list[list[int]]) -> None:
    with LLM(kv_cache="virtual", kv_cache_memory_bytes=16 * 2**20, max_num_seqs=2, dtype="float32") as llm:
        llm.generate(prompts[:2], greedy(4), use_tqdm=False)
        kv = kv_of(llm)
        assert kv.region.rss_bytes() > 0
    assert kv.region.rss_bytes() == 0  # closed: every committed page released
    llm.close()  # twice is fine
