"""The model's building blocks give the reference's numbers bit for bit, and fused weights load right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvos.model.layers import RMSNorm, RotaryEmbedding
from kvos.model.llama import fuse_projections


def test_rms_norm_equals_the_reference_formula_exactly() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = torch.randn(576)
    x = torch.randn(7, 576)
    reference = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.equal(norm(x), reference)


def test_rms_norm_in_bfloat16_normalises_in_float32_first() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-5).to(torch.bfloat16)
    x = torch.randn(3, 64).to(torch.bfloat16)
    xf = x.float()
    reference = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(norm(x), reference)


def test_rotary_tables_equal_rotate_half_exactly() -> None:
    torch.manual_seed(0)
    rotary = RotaryEmbedding(64, 128, 10000.0, None)
    positions = torch.tensor([0, 5, 17, 127])
    x = torch.randn(4, 12, 64)
    cos = torch.cat([rotary.cos[positions, :32]] * 2, -1).unsqueeze(1)
    sin = torch.cat([-rotary.sin_rotated[positions, :32], rotary.sin_rotated[positions, 32:]], -1).unsqueeze(1)
    rotate_half = torch.cat([-x[..., 32:], x[..., :32]], dim=-1)
    assert torch.equal(rotary.tables(positions).apply(x), x * cos + rotate_half * sin)
    # Position 0 is the identity.
    assert torch.equal(rotary.tables(torch.tensor([0])).apply(x[:1]), x[:1])


def test_fuse_projections_stacks_hf_weights_in_order() -> None:
    q, k, v = torch.randn(8, 4), torch.randn(2, 4), torch.randn(2, 4)
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    p = "model.layers.0."
    fused = fuse_projections(
        {
            p + "self_attn.q_proj.weight": q,
            p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.q_proj.bias": q[:, 0],
            p + "self_attn.k_proj.bias": k[:, 0],
            p + "self_attn.v_proj.bias": v[:, 0],
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            "model.norm.weight": torch.ones(4),
        }
    )
    assert sorted(fused) == sorted(
        [
            p + "self_attn.qkv_proj.weight",
            p + "self_attn.qkv_proj.bias",
            p + "mlp.gate_up_proj.weight",
            "model.norm.weight",
        ]
    )
    assert torch.equal(fused[p + "self_attn.qkv_proj.weight"], torch.cat([q, k, v]))
    assert torch.equal(fused[p + "self_attn.qkv_proj.bias"], torch.cat([q[:, 0], k[:, 0], v[:, 0]]))
    assert torch.equal(fused[p + "mlp.gate_up_proj.weight"], torch.cat([gate, up]))


def test_a_checkpoint_missing_a_projection_is_named(tmp_path) -> None:
    """Dropping v_proj leaves q/k unfused and qkv missing: the error names both sides."""
    from safetensors.torch import load_file

    from kvos.model.arch import ModelArch
    from kvos.model.llama import LlamaForCausalLM
    from tests.model.tiny_models import make_tiny_hf_model

    folder = Path(make_tiny_hf_model(str(tmp_path), "llama"))
    state = load_file(folder / "model.safetensors")
    del state["model.layers.0.self_attn.v_proj.weight"]
    arch = ModelArch.from_hf_config(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        model = LlamaForCausalLM(arch, 64)
    with pytest.raises(ValueError, match=r"missing \['model.layers.0.self_attn.qkv_proj.weight'\].*q_proj"):
        model.load_weights(state)
