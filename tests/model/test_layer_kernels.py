"""The bfloat16 layer kernels against the formulas computed naively in float64, and the engine's use of them.

Each formula is checked for both implementations: the C++ kernels (`layer_kernels`, a CPU's) and the Triton
ones (`triton_layers`, a GPU's, here in Triton's interpreter)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from kvos import LLM, SamplingParams
from kvos.attention import paged_triton
from kvos.attention.paged_cpu import load_kernel
from kvos.model import layer_kernels, triton_layers
from kvos.model.layers import RMSNorm, RotaryEmbedding, SiluAndMul

BF16 = torch.bfloat16


def bf16(x: torch.Tensor) -> torch.Tensor:
    """Round to bfloat16 (nearest even) and widen back: what an eager bfloat16 op hands the next one."""
    return x.to(BF16).double()


def assert_within_one_ulp(got: torch.Tensor, want: torch.Tensor, min_exact: float) -> None:
    """Equal as bfloat16, but for a few values whose float32 sums round the other way (one ulp apart)."""
    assert got.dtype == BF16 and got.shape == want.shape
    want_bf16 = want.to(BF16)
    exact = (got == want_bf16).double().mean().item()
    assert exact >= min_exact, f"only {exact:.4%} of the values are exact"
    ulp = (want_bf16.float().abs() * 2.0**-7).clamp_min(2.0**-126)
    assert ((got.float() - want_bf16.float()).abs() <= ulp).all()


@pytest.fixture
def cpp() -> None:
    layer_kernels.load()


OPS = {"cpp": layer_kernels.cpp_ops, "triton": lambda: triton_layers.TRITON_OPS}
"""Each implementation's ops (the C++ ones loaded on first use)."""
ON_GPU = torch.cuda.is_available() and not paged_triton.interpreted()


def device_for(impl: str) -> torch.device:
    """The C++ kernels' CPU; for Triton a GPU when there is one (the GPU script runs these tests there, with
    `-k triton`), else the CPU in Triton's interpreter."""
    return torch.device("cuda" if impl == "triton" and ON_GPU else "cpu")


@pytest.mark.parametrize("impl", list(OPS))
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_rms_norm_is_the_formula_with_the_eager_roundings(rows: int, impl: str) -> None:
    torch.manual_seed(rows)
    x = (torch.randn(rows, 576) * 4).to(BF16)
    weight = torch.randn(576).to(BF16)
    norm = RMSNorm(576, 1e-5).to(BF16)
    norm.weight = nn.Parameter(weight, requires_grad=False)
    device = device_for(impl)
    got = layer_kernels.KernelRMSNorm(norm.to(device), OPS[impl]())(x.to(device)).cpu()
    xd = x.double()
    normed = bf16(xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert_within_one_ulp(got, weight.double() * normed, min_exact=0.999)


def test_rms_norm_reads_strided_rows_and_refuses_other_dtypes(cpp: None) -> None:
    x = torch.randn(6, 1000).to(BF16)
    weight = torch.ones(576, dtype=BF16)
    got = torch.ops.kvos.rms_norm(x[:, :576], weight, 1e-6)
    assert torch.equal(got, torch.ops.kvos.rms_norm(x[:, :576].contiguous(), weight, 1e-6))
    with pytest.raises(ValueError, match="rms_norm: expects a bfloat16 \\(rows, features\\) tensor"):
        torch.ops.kvos.rms_norm(x.float()[:, :576], weight, 1e-6)
    with pytest.raises(ValueError, match="weight must be a contiguous bfloat16 \\(576,\\) tensor"):
        torch.ops.kvos.rms_norm(x[:, :576], torch.ones(575, dtype=BF16), 1e-6)


@pytest.mark.parametrize("impl", list(OPS))
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_silu_mul_is_the_formula_with_the_eager_roundings(rows: int, impl: str) -> None:
    torch.manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * 1536) * 6).to(BF16)
    gate_up[0, :8] = torch.tensor([0.0, -0.0, 80.0, -80.0, 200.0, -200.0, 1e-30, -1e-30]).to(BF16)
    device = device_for(impl)
    got = layer_kernels.KernelSiluAndMul(OPS[impl]())(gate_up.to(device)).cpu()
    g, up = gate_up.double()[:, :1536], gate_up.double()[:, 1536:]
    want = bf16(g / (1 + torch.exp(-g))) * up
    assert_within_one_ulp(got, want, min_exact=0.998)


def test_silu_mul_refuses_an_odd_width(cpp: None) -> None:
    with pytest.raises(ValueError, match="silu_mul: the row width 7 must be even"):
        torch.ops.kvos.silu_mul(torch.ones(2, 7, dtype=BF16))


@pytest.mark.parametrize("impl", list(OPS))
@pytest.mark.parametrize("tokens", [1, 5, 200])
def test_rotary_is_rotate_half_with_the_eager_roundings(tokens: int, impl: str) -> None:
    torch.manual_seed(tokens)
    rotary = RotaryEmbedding(64, 4096, 10000.0, None).to(BF16)
    positions = torch.randint(0, 4096, (tokens,))
    qkv = torch.randn(tokens, 15 * 64).to(BF16)
    device = device_for(impl)
    qk = qkv.to(device)[:, : 12 * 64].view(tokens, 12, 64)  # the layer's view: token stride 15 heads
    got = (
        layer_kernels.KernelRotaryEmbedding(rotary.to(device), OPS[impl]()).tables(positions.to(device)).apply(qk).cpu()
    )
    # Hugging Face's form, from the angles: x * cos + rotate_half(x) * sin, each product rounded.
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    angles = torch.outer(positions.double(), inv_freq).repeat(1, 2).unsqueeze(1)
    cos, sin = bf16(angles.cos()), bf16(angles.sin())
    x = qk.cpu().double()
    rotated_half = torch.cat([-x[..., 32:], x[..., :32]], dim=-1)
    want = bf16(x * cos) + bf16(rotated_half * sin)
    assert got.dtype == BF16 and torch.equal(got, want.to(BF16))


def test_write_kv_stores_each_token_at_its_slot_in_the_cache_dtype() -> None:
    load_kernel()
    torch.manual_seed(0)
    for cache_dtype in (torch.float32, BF16):
        for source_dtype in (torch.float32, BF16):
            k_cache = torch.zeros(40, 3, 64, dtype=cache_dtype)
            v_cache = torch.zeros(40, 3, 64, dtype=cache_dtype)
            qkv = torch.randn(5, 15, 64).to(source_dtype)
            k, v = qkv[:, 9:12], qkv[:, 12:]  # strided, as the layer hands them over
            slots = torch.tensor([7, 0, 39, 12, 13])
            torch.ops.kvos.write_kv(k_cache, v_cache, slots, k, v)
            for t, slot in enumerate(slots.tolist()):
                assert torch.equal(k_cache[slot], k[t].to(cache_dtype))
                assert torch.equal(v_cache[slot], v[t].to(cache_dtype))
            untouched = torch.ones(40, dtype=torch.bool)
            untouched[slots] = False
            assert (k_cache[untouched] == 0).all() and (v_cache[untouched] == 0).all()


def test_write_kv_names_a_slot_outside_the_cache_and_writes_nothing() -> None:
    load_kernel()
    k_cache, v_cache = torch.zeros(8, 1, 4), torch.zeros(8, 1, 4)
    kv = torch.ones(2, 1, 4)
    with pytest.raises(IndexError, match="write_kv: token 1's slot 8 is outside a cache of 8 slots"):
        torch.ops.kvos.write_kv(k_cache, v_cache, torch.tensor([3, 8]), kv, kv)
    with pytest.raises(IndexError, match="slot -1"):
        torch.ops.kvos.write_kv(k_cache, v_cache, torch.tensor([-1, 2]), kv, kv)
    assert (k_cache == 0).all() and (v_cache == 0).all()
    with pytest.raises(ValueError, match="k and v must be float32 or bfloat16 \\(2, 1, 4\\)"):
        torch.ops.kvos.write_kv(k_cache, v_cache, torch.tensor([3, 4]), kv[:1], kv)


def test_use_layer_kernels_swaps_bfloat16_modules_and_refuses_float32(cpp: None) -> None:
    model = nn.Sequential(RMSNorm(8, 1e-6).to(BF16), SiluAndMul(), nn.Linear(8, 8))
    assert layer_kernels.use_layer_kernels(model) == 2
    assert isinstance(model[0], layer_kernels.KernelRMSNorm) and isinstance(model[1], layer_kernels.KernelSiluAndMul)
    with pytest.raises(ValueError, match="the C\\+\\+ layer kernels compute in bfloat16; 0 holds torch.float32"):
        layer_kernels.use_layer_kernels(nn.Sequential(RMSNorm(8, 1e-6)))


def test_use_triton_layers_swaps_a_bfloat16_model_and_keeps_its_outputs() -> None:
    """The swapped modules compute what torch's ops compute (to the sum-order ulp); float32 is refused."""
    torch.manual_seed(0)
    device = device_for("triton")
    model = nn.Sequential(RMSNorm(64, 1e-6), nn.Linear(64, 128), SiluAndMul(), RMSNorm(64, 1e-6)).to(device, BF16)
    x = torch.randn(5, 64).to(device, BF16)
    want = model(x)
    assert triton_layers.use_triton_layers(model) == 3
    assert [type(m).__name__ for m in model] == ["KernelRMSNorm", "Linear", "KernelSiluAndMul", "KernelRMSNorm"]
    assert all(m.ops is triton_layers.TRITON_OPS for m in model if not isinstance(m, nn.Linear))
    got = model(x)
    assert (got.float() - want.float()).abs().max() <= 2 * 2.0**-7 * want.float().abs().max()
    with pytest.raises(ValueError, match="the Triton layer kernels compute in bfloat16; 0 holds torch.float32"):
        triton_layers.use_triton_layers(nn.Sequential(RMSNorm(8, 1e-6)))


def test_triton_layers_that_fail_on_the_device_leave_torchs_ops(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(triton_layers, "TRITON_OPS", dataclasses.replace(triton_layers.TRITON_OPS, silu_mul=broken))
    device = device_for("triton")
    model = nn.Sequential(RMSNorm(64, 1e-6), SiluAndMul()).to(device, BF16)
    assert triton_layers.use_triton_layers(model) == 0
    assert isinstance(model[0], RMSNorm) and isinstance(model[1], SiluAndMul)
    assert f"the Triton layer kernels failed on {device}; the model keeps torch's ops" in caplog.text


def test_the_bfloat16_engine_runs_the_kernels_and_float32_does_not() -> None:
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for dtype, expected in (("bfloat16", 30 * 2 + 1 + 30 + 1), ("float32", 0)):
        llm = LLM(dtype=dtype, kv_cache_memory_bytes=2**26)
        model = llm.engine.core.worker.model
        kernel_modules = (layer_kernels.KernelRMSNorm, layer_kernels.KernelSiluAndMul)
        swapped = [m for m in model.modules() if isinstance(m, kernel_modules)]
        swapped += [m for m in model.modules() if isinstance(m, layer_kernels.KernelRotaryEmbedding)]
        assert len(swapped) == expected, dtype
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 8 for o in outputs)
        assert llm.engine.kv_manager.num_used_blocks == 0
