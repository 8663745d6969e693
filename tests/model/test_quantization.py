"""Weight-only int8 and int4: how close they stay to float32 (the documented tolerance)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kvos import LLM, SamplingParams
from kvos.model import int4_kernel
from kvos.model.quantization import (
    INT4_GROUP_SIZE,
    Int4Linear,
    Int8Linear,
    QuantizedLinear,
    quantize,
)

GOLDEN_TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "1, 2, 3, 4, 5,",
    "Once upon a time, there was a little robot who",
    "Write a haiku about memory pages.",
]
INT4_EQUAL_TOKENS = 2
"""int4's documented tolerance: the first greedy tokens of every golden prompt that equal float32's."""


@pytest.mark.parametrize("rows", [1, 4, 64])
def test_int8_linear_is_within_one_percent_of_float32(rows: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536, bias=True)
    q = Int8Linear(linear, max_quantized_rows=8)
    x = torch.randn(rows, 576)
    want = linear(x)
    got = q(x)
    assert got.dtype == torch.float32  # the float32 bias promotes the bfloat16 product
    assert (got - want).norm() / want.norm() < 0.01


@pytest.mark.parametrize("rows", [1, 4, 64])
def test_int4_linear_is_within_ten_percent_of_float32(rows: int) -> None:
    """Gaussian weights are the hard case for 4 bits: ~8% error (the int4 kernel and the GEMM agree)."""
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536, bias=False)
    q = Int4Linear(linear, max_quantized_rows=12)
    x = torch.randn(rows, 576)
    want = linear(x)
    got = q(x)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).norm() / want.norm() < 0.10


def test_int4_kernel_and_bfloat16_gemm_see_the_same_weights() -> None:
    """Without VNNI small batches use PyTorch's int4 kernel, big ones the GEMM on the dequantized
    weight: same answer."""
    torch.manual_seed(0)
    q = Int4Linear(nn.Linear(576, 960, bias=False), max_quantized_rows=12, vnni=False)
    x = torch.randn(16, 576)
    by_kernel = torch.cat([q(x[i : i + 4]) for i in range(0, 16, 4)]).float()
    by_gemm = q(x).float()
    assert (by_kernel - by_gemm).norm() / by_gemm.norm() < 0.01


def test_int4_with_vnni_keeps_no_dequantized_copy() -> None:
    """kvos's kernel takes every batch size, so the 2 bytes per parameter of a bfloat16 copy are not kept."""
    if not int4_kernel.supported():
        pytest.skip("kvos's int4 kernel needs AVX512-VNNI")
    q = Int4Linear(nn.Linear(576, 960, bias=False))
    assert q.weight_bf16 is None
    assert sum(b.numel() * b.element_size() for b in q.buffers()) == 960 * 576 * (0.5 + 4 / 32)


@pytest.mark.parametrize("vnni", [False, True])
def test_int4_recovers_weights_already_on_its_grid(vnni: bool) -> None:
    """Weights dequantized from 4-bit blocks (as from a Q4_1 GGUF) come back exactly, up to bfloat16 scales."""
    if vnni and not int4_kernel.supported():
        pytest.skip("kvos's int4 kernel needs AVX512-VNNI")
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (64, 128)).float()
    codes[:, ::INT4_GROUP_SIZE] = 0  # every group spans the whole 0..15 range, as Q4_1 blocks do
    codes[:, 1::INT4_GROUP_SIZE] = 15
    scale = torch.full((64, 128 // INT4_GROUP_SIZE, 1), 0.0625)  # exact in bfloat16
    low = torch.full((64, 128 // INT4_GROUP_SIZE, 1), -0.5)
    weight = (codes.view(64, -1, INT4_GROUP_SIZE) * scale + low).view(64, 128)
    linear = nn.Linear(128, 64, bias=False)
    linear.weight.data.copy_(weight)
    q = Int4Linear(linear, vnni=vnni)
    assert torch.equal(q.dequantized_weight().float(), weight)
    x = torch.randn(20, 128)  # above PyTorch's kernel's 12 rows too
    exact = x @ weight.T
    assert (q(x).float() - exact).norm() / exact.norm() < (0.02 if vnni else 0.01)


def test_int4_rejects_a_width_it_cannot_group() -> None:
    with pytest.raises(ValueError, match="divisible by 32 and out_features by 16; this linear is 48 -> 16"):
        Int4Linear(nn.Linear(48, 16))
    with pytest.raises(ValueError, match="this linear is 64 -> 24"):
        Int4Linear(nn.Linear(64, 24))


@pytest.mark.parametrize("method, cls", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantize_swaps_every_linear(method: str, cls: type[QuantizedLinear]) -> None:
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 64)))
    quantize(model, method)  # type: ignore[arg-type]
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, cls) for m in model.modules()) == 2


def test_quantize_names_an_unknown_method() -> None:
    with pytest.raises(ValueError, match="'int3'"):
        quantize(nn.Linear(32, 32), "int3")  # type: ignore[arg-type]


@pytest.mark.parametrize("method, num_equal", [("int8", 8), ("int4", INT4_EQUAL_TOKENS)])
def test_quantized_greedy_tokens_track_float32_on_the_golden_prompts(method: str, num_equal: int) -> None:
    """Tolerance: on every golden prompt the first `num_equal` greedy tokens equal float32's.

    int4 starts from the GGUF's own Q4_1 codes, so it differs from float32
    only by roundings: bfloat16 activations, and int8 ones in decode steps of
    up to 12 rows (VNNI kernel) or bfloat16 weights in bigger batches (AMX).
    Measured with the AMX path: "The capital of France is" keeps float32's
    first 2 tokens, the other four golden prompts their first 6 or more; with
    two requests a step (so prompts run below the AMX path's 13 rows) "Once
    upon a time..." keeps 2 as well.
    """
    params = SamplingParams(temperature=0, max_tokens=num_equal, ignore_eos=True)
    exact = LLM(kv_cache_memory_bytes=2**26, dtype="float32").generate(GOLDEN_TEXTS, params, use_tqdm=False)
    llm = LLM(kv_cache_memory_bytes=2**26, quantization=method, dtype="float32")
    approx = llm.generate(GOLDEN_TEXTS, params, use_tqdm=False)
    for a, b in zip(exact, approx):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
    assert llm.engine.kv_manager.num_used_blocks == 0
