"""Greedy tokens from kvos equal HF transformers', batched, in every scheduling regime."""

from __future__ import annotations

import pytest

from kvos import LLM, SamplingParams
from tests.conftest import GreedyFn, hf_greedy_fn

MAX_NEW = 12

TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about memory pages.",
    "1, 2, 3, 4, 5,",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Translate to French: The weather is nice today and I would like to go for a walk in the park "
    "with my friends, then have dinner at a small restaurant near the river.",
    "Q: What is the boiling point of water at sea level in Celsius?\nA:",
    "Here is a list of the planets of the solar system, in order from the sun: " * 4,
    "Hi",
]

SHARED_PREFIX = (
    "You are a careful assistant. Answer briefly and precisely, and never invent facts. "
    "If you are unsure, say so. Keep the answer to one sentence. Question: "
)
SHARED = [
    SHARED_PREFIX + q
    for q in [
        "Why is the sky blue?",
        "What is a prime number?",
        "Who wrote Hamlet?",
        "What is rust?",
        "How do bees make honey?",
        "What is DNA?",
        "Why do we sleep?",
        "What is an atom?",
    ]
]


def greedy(max_tokens: int = MAX_NEW) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def check_against_hf(llm: LLM, texts: list[str], hf: GreedyFn) -> list:
    prompts = [llm.tokenizer.encode(t) for t in texts]
    outputs = llm.generate(prompts, greedy(), use_tqdm=False)
    expected = hf(prompts, MAX_NEW)
    for out, want in zip(outputs, expected):
        assert out.outputs[0].token_ids == want
    assert llm.engine.kv_manager.num_used_blocks == 0
    return outputs


def test_smollm_batch_matches_hf(hf_smollm: GreedyFn) -> None:
    llm = LLM(kv_cache_memory_bytes=64 * 2**20, dtype="float32")
    check_against_hf(llm, TEXTS, hf_smollm)


def test_smollm_chunked_prefill_matches_hf(hf_smollm: GreedyFn) -> None:
    llm = LLM(max_num_batched_tokens=16, kv_cache_memory_bytes=64 * 2**20, dtype="float32")
    outputs = check_against_hf(llm, TEXTS, hf_smollm)
    assert max(len(o.prompt_token_ids) for o in outputs) > 16  # some prompt really was chunked


def test_smollm_shared_prefix_hits_cache_and_matches_hf(hf_smollm: GreedyFn) -> None:
    llm = LLM(kv_cache_memory_bytes=64 * 2**20, max_num_batched_tokens=64, dtype="float32")
    # The first request computes the prefix; later ones must reuse its blocks.
    outputs = check_against_hf(llm, SHARED, hf_smollm)
    queries, hits = llm.engine.kv_manager.prefix_cache_stats()
    assert hits >= 7 * 16
    assert sum(o.num_cached_tokens > 0 for o in outputs) >= 7


def test_smollm_preemption_under_tiny_kv_budget_matches_hf(hf_smollm: GreedyFn) -> None:
    bytes_per_token = 2 * 30 * 3 * 64 * 4
    # Room for ~140 tokens: the batch cannot run at once, so requests get preempted and recomputed.
    llm = LLM(kv_cache_memory_bytes=144 * bytes_per_token, enable_prefix_caching=False, dtype="float32")
    check_against_hf(llm, TEXTS, hf_smollm)
    assert llm.engine.stats().num_preemptions > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_random_models_match_hf(arch: str, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from tests.model.tiny_models import make_tiny_hf_model

    folder = make_tiny_hf_model(str(tmp_path), arch)
    hf = hf_greedy_fn(AutoModelForCausalLM.from_pretrained(folder).eval())
    bytes_per_token = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 kv heads, head_dim 16, fp32
    plain = LLM(folder, block_size=4, dtype="float32")
    check_against_hf(plain, TEXTS, hf)
    chunked = LLM(folder, block_size=4, max_num_batched_tokens=8, dtype="float32")
    check_against_hf(chunked, TEXTS, hf)
    tight = LLM(
        folder, block_size=4, kv_cache_memory_bytes=100 * bytes_per_token, enable_prefix_caching=False, dtype="float32"
    )
    check_against_hf(tight, TEXTS, hf)
    assert tight.engine.stats().num_preemptions > 0
