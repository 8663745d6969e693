"""Prepacked bfloat16 linears: the same outputs as `F.linear`, bit for bit, and the engine's bfloat16 path uses them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kvos import LLM, SamplingParams
from kvos.model.prepack import PrepackedLinear, can_prepack, prepack_linears

pytestmark = pytest.mark.skipif(
    not can_prepack(torch.device("cpu"), torch.bfloat16), reason="this torch has no oneDNN bfloat16"
)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_prepacked_linear_equals_f_linear_bit_for_bit(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(576, 960, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, 576).to(torch.bfloat16)
    want = F.linear(x, linear.weight, linear.bias)
    got = PrepackedLinear(linear, batch_size_hint=64)(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 960)
    assert torch.equal(got, want)
    # Leading dimensions are kept.
    assert torch.equal(PrepackedLinear(linear, 64)(x.view(1, rows, 576)), want.view(1, rows, 960))


def test_prepack_swaps_only_bfloat16_linears() -> None:
    model = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16), nn.Linear(8, 8), nn.LayerNorm(8))
    assert prepack_linears(model, 4) == 1
    assert isinstance(model[0], PrepackedLinear) and isinstance(model[1], nn.Linear)
    with pytest.raises(ValueError, match="batch_size_hint must be >= 1, got 0"):
        prepack_linears(model, 0)


def test_bfloat16_engine_prepacks_and_keeps_its_greedy_tokens() -> None:
    """The engine's bfloat16 path (what `dtype="auto"` runs here) with and without prepacking: same tokens."""
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(dtype="bfloat16", kv_cache_memory_bytes=2**26)
    model = llm.engine.core.worker.model
    packed = [m for m in model.modules() if isinstance(m, PrepackedLinear)]
    assert len(packed) == 4 * 30 + 1  # qkv, o, gate_up, down per layer, and lm_head
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    # The same model with every layer's linears put back as nn.Linear on the same weights.
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, PrepackedLinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                plain.weight = nn.Parameter(child.packed_weight.to_dense(), requires_grad=False)
                plain.bias = child.bias
                setattr(module, name, plain)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert llm.engine.kv_manager.num_used_blocks == 0
