"""One request never hurts another, and a failed step leaves nothing behind.

Faults are injected at the worker and the sampler; the neighbours' tokens
are held to HF transformers' greedy output on the same weights.
"""

from __future__ import annotations

import pytest
import torch

from kvos import LLM, SamplingParams
from kvos.core.engine_core import STEP_FAILED
from kvos.worker import sampler
from kvos.worker.worker import SAMPLING_FAILED
from tests.conftest import GreedyFn

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, "
    "a goldsmith from Mainz, combined a screw press with movable metal type and an oil-based ink"
)
OTHERS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
MAX_NEW = 8


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_memory_bytes=64 * 2**20, dtype="float32")


def greedy(max_tokens: int = MAX_NEW) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def test_a_failed_step_publishes_nothing_to_the_prefix_cache(
    llm: LLM, hf_smollm: GreedyFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = llm.engine
    ids = llm.tokenizer.encode(PROMPT)
    assert len(ids) > 16  # at least one full block would be cached
    worker = engine.core.worker
    real = worker.execute

    def crash_after_writing(plan):  # the forward pass ran (KV written), then the step failed
        real(plan)
        raise RuntimeError("device lost")

    monkeypatch.setattr(worker, "execute", crash_after_writing)
    (failed,) = llm.generate([ids], greedy(), use_tqdm=False)
    assert failed.error == STEP_FAILED and "device lost" not in failed.error
    monkeypatch.setattr(worker, "execute", real)
    assert engine.kv_manager.num_used_blocks == 0
    hits_before = engine.kv_manager.prefix_cache_stats()[1]
    (again,) = llm.generate([ids], greedy(), use_tqdm=False)
    # Nothing the failed step wrote was findable: the prompt was computed afresh, and right.
    assert again.num_cached_tokens == 0 and engine.kv_manager.prefix_cache_stats()[1] == hits_before
    assert again.outputs[0].token_ids == hf_smollm([ids], MAX_NEW)[0]


def test_a_request_whose_sampling_raises_fails_alone(
    llm: LLM, hf_smollm: GreedyFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sampler._sample_row

    def fragile(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
        if p.seed == 666:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, p, generator)

    monkeypatch.setattr(sampler, "_sample_row", fragile)
    prompts = [llm.tokenizer.encode(t) for t in OTHERS]
    params = [greedy(), SamplingParams(temperature=1.0, seed=666, max_tokens=MAX_NEW), greedy()]
    outputs = llm.generate([prompts[0], prompts[1], prompts[2]], params, use_tqdm=False)
    expected = hf_smollm(prompts, MAX_NEW)
    assert outputs[0].outputs[0].token_ids == expected[0] and outputs[0].error is None
    assert outputs[2].outputs[0].token_ids == expected[2] and outputs[2].error is None
    assert outputs[1].error == SAMPLING_FAILED and outputs[1].outputs[0].finish_reason == "abort"
    assert llm.engine.kv_manager.num_used_blocks == 0 and llm.engine.core.worker.num_requests == 0


def test_a_tiny_temperature_is_served_greedily_beside_others(llm: LLM, hf_smollm: GreedyFn) -> None:
    prompts = [llm.tokenizer.encode(t) for t in OTHERS]
    params = [greedy(), SamplingParams(temperature=1e-40, max_tokens=MAX_NEW), greedy()]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_smollm(prompts, MAX_NEW)
    assert all(o.error is None for o in outputs)


def test_n_siblings_share_the_prompts_blocks(llm: LLM) -> None:
    engine = llm.engine
    ids = llm.tokenizer.encode(PROMPT)
    engine.add_request("fan", ids, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=4))
    while len(engine.scheduler.running) < 3 and engine.has_unfinished_requests():
        engine.step()
    tables = [engine.kv_manager.block_table(r) for r in engine.scheduler.running]
    assert len(tables) == 3
    full_blocks = (len(ids) - 1) // 16
    # Every full prompt block is one physical block shared by all three sequences.
    assert full_blocks >= 1 and all(t[:full_blocks] == tables[0][:full_blocks] for t in tables)
    assert all(engine.kv_manager.allocator.blocks[b].ref_count == 3 for b in tables[0][:full_blocks])
    engine.abort_request("fan")
    assert engine.kv_manager.num_used_blocks == 0 and engine.core.worker.num_requests == 0


def test_quantized_kernels_are_refused_off_the_cpu() -> None:
    from kvos.config import ModelConfig

    with pytest.raises(ValueError, match="quantization='int8' runs CPU kernels only"):
        ModelConfig(quantization="int8", device="cuda")


def test_bad_logit_bias_is_refused_by_field(llm: LLM) -> None:
    from kvos.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="logit_bias token id 10000000") as refused:
        llm.engine.add_request("b", [1, 2], SamplingParams(logit_bias={10**7: 1.0}))
    assert refused.value.param == "logit_bias"
    assert not llm.engine.has_unfinished_requests()
