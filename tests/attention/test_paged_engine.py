"""The paged C++ backend inside the engine: HF transformers' greedy tokens, on both KV caches."""

from __future__ import annotations

from kvos import LLM
from tests.conftest import GreedyFn
from tests.engine.test_engine_equivalence import SHARED, TEXTS, check_against_hf


def test_paged_backend_matches_hf(hf_smollm: GreedyFn) -> None:
    llm = LLM(attention_backend="paged", kv_cache_memory_bytes=64 * 2**20, dtype="float32")
    check_against_hf(llm, TEXTS, hf_smollm)


def test_paged_backend_chunked_prefill_and_shared_prefix_match_hf(hf_smollm: GreedyFn) -> None:
    """Prompt chunks over a cached prefix (their own earlier chunks, and other requests' blocks)."""
    llm = LLM(attention_backend="paged", max_num_batched_tokens=16, kv_cache_memory_bytes=64 * 2**20, dtype="float32")
    outputs = check_against_hf(llm, TEXTS + SHARED, hf_smollm)
    assert max(len(o.prompt_token_ids) for o in outputs) > 16
    assert sum(o.num_cached_tokens > 0 for o in outputs) >= 7


def test_paged_backend_on_the_virtual_cache_matches_hf(hf_smollm: GreedyFn) -> None:
    """Each request's table is one entry, its row: the same kernel, a block as long as the row."""
    llm = LLM(attention_backend="paged", kv_cache="virtual", kv_cache_memory_bytes=64 * 2**20, dtype="float32")
    check_against_hf(llm, TEXTS, hf_smollm)
