"""dtype="bfloat16": how close its greedy tokens stay to float32's (the documented tolerance).

bfloat16 keeps 8 bits of mantissa, so activations and KV round at about 0.4%;
RMSNorm normalises in float32, attention accumulates its softmax in float32
(SDPA's CPU kernel and the paged kernel alike), and the logits GEMM
accumulates in float32 inside oneDNN before its output is rounded. Measured
on the default model over these 14 prompts x 16 tokens: gather_sdpa matched
float32 on every token, paged on all but the last 7 tokens of one prompt
(97%). The test asserts a looser bound: every prompt's first 8 tokens, and
90% of all 16-token positions.
"""

from __future__ import annotations

import pytest
import torch

from kvos import LLM, SamplingParams
from tests.engine.test_engine_equivalence import TEXTS
from tests.model.test_quantization import GOLDEN_TEXTS

PROMPTS = GOLDEN_TEXTS + TEXTS
NUM_TOKENS = 16
NUM_EQUAL_PREFIX = 8
MIN_MATCH_RATE = 0.90

PARAMS = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def float32_tokens() -> list[list[int]]:
    outputs = LLM(kv_cache_memory_bytes=2**26).generate(PROMPTS, PARAMS, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("backend", ["gather_sdpa", "paged"])
def test_bfloat16_greedy_tokens_track_float32(backend: str, float32_tokens: list[list[int]]) -> None:
    llm = LLM(dtype="bfloat16", attention_backend=backend, kv_cache_memory_bytes=2**26)
    worker = llm.engine.core.worker
    assert {p.dtype for p in worker.model.parameters()} == {torch.bfloat16}
    assert {t.dtype for pair in worker.kv_buffer.kv_caches for t in pair} == {torch.bfloat16}
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
    for prompt, want, have in zip(PROMPTS, float32_tokens, got):
        assert have[:NUM_EQUAL_PREFIX] == want[:NUM_EQUAL_PREFIX], prompt
    matches = sum(a == b for want, have in zip(float32_tokens, got) for a, b in zip(want, have))
    assert matches / (len(PROMPTS) * NUM_TOKENS) >= MIN_MATCH_RATE
    assert llm.engine.kv_manager.num_used_blocks == 0
