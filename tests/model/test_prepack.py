"""Prepacked bfloat16 linears: `F.linear`'s outputs (bit for bit through oneDNN, to a bfloat16 step through
the AMX kernel), and the engine's bfloat16 path uses them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kvos import LLM, SamplingParams
from kvos.model import amx_linear
from kvos.model.prepack import PrepackedLinear, can_prepack, prepack_linears

pytestmark = pytest.mark.skipif(
    not can_prepack(torch.device("cpu"), torch.bfloat16), reason="this torch has no oneDNN bfloat16"
)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 17, 33, 64, 300])
def test_prepacked_linear_matches_f_linear(rows: int, bias: bool) -> None:
    """oneDNN's prepacked weight gives `F.linear`'s outputs bit for bit. On a CPU with AMX the weight is
    packed for kvos's tile kernel instead, whose float32 sums run in another order: each output at
    most one bfloat16 step from `F.linear`'s, and as close to the exact product."""
    torch.manual_seed(rows)
    linear = nn.Linear(576, 960, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, 576).to(torch.bfloat16)
    want = F.linear(x, linear.weight, linear.bias)
    packed = PrepackedLinear(linear, batch_size_hint=64)
    assert packed.amx == amx_linear.supported()
    got = packed(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 960)
    if packed.amx:
        # The spacing of bfloat16 values near each output (or more), and float32's rounding of the sums
        # for outputs near 0 (a difference in the 6th decimal there is many bfloat16 steps).
        step = want.float().abs() * 2**-7 + 1e-5
        assert ((got.float() - want.float()).abs() <= step).all()
        exact = x.double() @ linear.weight.double().T + (linear.bias.double() if bias else 0.0)
        assert (got.double() - exact).abs().max() <= (want.double() - exact).abs().max() * 1.01
    else:
        assert torch.equal(got, want)
    # Leading dimensions are kept.
    assert torch.equal(packed(x.view(1, rows, 576)), got.view(1, rows, 960))
    assert torch.equal(packed.dense_weight(), linear.weight)


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
                plain.weight = nn.Parameter(child.dense_weight(), requires_grad=False)
                plain.bias = child.bias
                setattr(module, name, plain)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert llm.engine.kv_manager.num_used_blocks == 0
