"""Weight-only int8: how close it stays to float32 (the documented tolerance)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kvos import LLM, SamplingParams
from kvos.model.quantization import Int8Linear, quantize_int8


@pytest.mark.parametrize("rows", [1, 4, 64])
def test_int8_linear_is_within_one_percent_of_float32(rows: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536, bias=True)
    q = Int8Linear(linear, max_int8_rows=8)
    x = torch.randn(rows, 576)
    want = linear(x)
    got = q(x)
    assert got.dtype == torch.float32
    rel = (got - want).norm() / want.norm()
    assert rel < 0.01


def test_quantize_int8_swaps_every_linear() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)))
    quantize_int8(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2


def test_int8_greedy_tokens_track_float32_on_the_golden_prompts() -> None:
    """Tolerance: on every golden prompt the first 8 greedy tokens equal float32's."""
    texts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4, 5,",
             "Once upon a time, there was a little robot who", "Write a haiku about memory pages."]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    exact = LLM(kv_cache_memory_bytes=2**26).generate(texts, params, use_tqdm=False)
    llm = LLM(kv_cache_memory_bytes=2**26, quantization="int8")
    approx = llm.generate(texts, params, use_tqdm=False)
    for a, b in zip(exact, approx):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
    assert llm.engine.kv_manager.num_used_blocks == 0
