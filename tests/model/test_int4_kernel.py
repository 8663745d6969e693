"""kvos's int4 kernel (AVX512-VNNI) against the formula it implements, computed naively in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kvos.model import int4_kernel
from kvos.model.quantization import Int4Linear

pytestmark = pytest.mark.skipif(not int4_kernel.supported(), reason="kvos's int4 kernel needs AVX512-VNNI")
GROUP = int4_kernel.GROUP_SIZE


def _weights(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, and float16-exact scales and minimums as a Q4_1 file holds them."""
    codes = torch.randint(0, 16, (n, k))
    scale = (torch.rand(n, k // GROUP) * 0.02 + 1e-3).half().float()
    low = (-8 * scale + torch.randn(n, k // GROUP) * 1e-3).half().float()
    return codes, scale, low


def _naive(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """sum_i x_i w_i per group with x_i ~ xq_i max|x| / 127 in the first term, xq_i = round(x_i 127 / max|x|).

    The codes are rounded from float32 products, as the kernel's are; the rest is float64.
    """
    rows, k = x.shape
    n = codes.shape[0]
    xg = x.float().view(rows, k // GROUP, GROUP)
    amax = xg.abs().amax(-1, keepdim=True)
    # 127 / amax as a division: torch's scalar / tensor multiplies by a reciprocal, which rounds differently.
    xq = torch.round(xg * torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0)).double()
    step = amax.double() / 127
    xg = xg.double()
    dots = torch.einsum("mgi,ngi->mng", xq, codes.double().view(n, k // GROUP, GROUP))
    return (dots * step.squeeze(-1)[:, None, :] * scale.double()[None]).sum(-1) + xg.sum(-1) @ low.double().T


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 12, 37])
@pytest.mark.parametrize("n, k", [(16, 32), (48, 576), (32, 1536)])
def test_kernel_computes_the_quantized_dot_products(rows: int, n: int, k: int) -> None:
    torch.manual_seed(rows * 1000 + n + k)
    codes, scale, low = _weights(n, k)
    x = torch.randn(rows, k).bfloat16()
    x[0, :GROUP] = 0  # a group of zeros has no scale to divide by
    got = int4_kernel.int4_linear(x, int4_kernel.pack(codes, scale, low), n)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    want = _naive(x, codes, scale, low)
    # Only float32 sums and the bfloat16 output's rounding (one unit in the last place: 2^-7) separate the two.
    assert torch.allclose(got.double(), want, rtol=2**-7, atol=1e-3 * want.abs().max().item())


def test_kernel_is_within_two_percent_of_the_exact_product() -> None:
    """The documented cost of rounding activations to int8: about 1% of the output's norm."""
    torch.manual_seed(0)
    codes, scale, low = _weights(960, 576)
    weight = (codes.view(960, -1, GROUP) * scale[..., None] + low[..., None]).view(960, 576)
    x = torch.randn(4, 576).bfloat16()
    exact = x.double() @ weight.double().T
    got = int4_kernel.int4_linear(x, int4_kernel.pack(codes, scale, low), 960).double()
    assert (got - exact).norm() / exact.norm() < 0.02


def test_unpack_gives_back_what_was_packed() -> None:
    codes, scale, low = _weights(48, 96)
    got_codes, got_scale, got_low = int4_kernel.unpack(int4_kernel.pack(codes, scale, low))
    assert torch.equal(got_codes.long(), codes) and torch.equal(got_scale, scale) and torch.equal(got_low, low)


def test_pack_names_a_shape_it_cannot_block() -> None:
    codes = torch.zeros(24, 64, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(24, 64\) weight"):
        int4_kernel.pack(codes, torch.ones(24, 2), torch.zeros(24, 2))


def test_kernel_names_a_wrong_activation_dtype() -> None:
    codes, scale, low = _weights(16, 32)
    packed = int4_kernel.pack(codes, scale, low)
    with pytest.raises(ValueError, match="x must be a bfloat16"):
        int4_kernel.int4_linear(torch.randn(1, 32), packed, 16)
    with pytest.raises(ValueError, match="x has 64 features, the weight 32"):
        int4_kernel.int4_linear(torch.randn(1, 64).bfloat16(), packed, 16)


def test_int4_linear_takes_the_kernel_on_this_cpu() -> None:
    assert Int4Linear(nn.Linear(64, 32, bias=False)).vnni
    assert not Int4Linear(nn.Linear(64, 32, bias=False), vnni=False).vnni


amx = pytest.mark.skipif(not int4_kernel.amx_supported(), reason="the int4 kernel's AMX path needs AMX")


@amx
@pytest.mark.parametrize("rows", [1, 7, 13, 16, 17, 33, 64, 100])
@pytest.mark.parametrize("n, k", [(32, 32), (96, 576), (64, 1536)])
def test_amx_kernel_multiplies_by_the_weights_rounded_to_bfloat16(rows: int, n: int, k: int) -> None:
    """x unrounded times w = d q + m rounded once to float32, then to bfloat16, summed in float32."""
    torch.manual_seed(rows * 1000 + n + k)
    codes, scale, low = _weights(n, k)
    x = torch.randn(rows, k).bfloat16()
    got = int4_kernel.int4_linear_amx(x, int4_kernel.pack(codes, scale, low), n)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    exact_w = codes.double().view(n, -1, GROUP) * scale.double()[..., None] + low.double()[..., None]
    weight = exact_w.view(n, k).float().bfloat16().double()  # float32 first, as the kernel's fma rounds
    exact = x.double() @ weight.T
    # The output's rounding (half a unit in the last place: 2^-8 relative) and float32 sums.
    magnitude = x.double().abs() @ weight.abs().T
    assert ((got.double() - exact).abs() <= 2**-8 * exact.abs() + 1e-6 * magnitude).all()


@amx
def test_amx_kernel_names_a_weight_it_cannot_pair() -> None:
    codes, scale, low = _weights(48, 64)
    with pytest.raises(ValueError, match="even number of row blocks"):
        int4_kernel.int4_linear_amx(torch.randn(16, 64).bfloat16(), int4_kernel.pack(codes, scale, low), 48)


@amx
def test_int4_linear_multiplies_unrounded_activations_from_amx_min_rows() -> None:
    """Below the threshold activations are rounded to int8 (about 1% off), from it on they are not."""
    torch.manual_seed(0)
    linear = nn.Linear(576, 960, bias=False)
    q = Int4Linear(linear)
    assert q.amx and q.weight_bf16 is None
    weight = q.dequantized_weight().double()
    for rows, within in [(int4_kernel.AMX_MIN_ROWS - 1, 0.02), (int4_kernel.AMX_MIN_ROWS, 2**-7)]:
        x = torch.randn(rows, 576).bfloat16()
        exact = x.double() @ weight.T
        error = ((q(x).double() - exact).norm() / exact.norm()).item()
        assert error < within and (rows < int4_kernel.AMX_MIN_ROWS) == (error > 2**-7), (rows, error)
    assert not Int4Linear(nn.Linear(64, 48, bias=False)).amx  # 48 outputs: no whole column pair
    assert not Int4Linear(linear, amx=False).amx
