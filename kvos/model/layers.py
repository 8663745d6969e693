"""Building blocks shared by the model families: RMSNorm, SwiGLU's activation and rotary embeddings."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused call; bit-identical to the reference's weight * (x * rsqrt(mean(x^2) + eps)).
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Narrower dtypes: normalise in float32 and round before the weight, as the reference does.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class SiluAndMul(nn.Module):
    """SwiGLU's activation: silu(gate) * up over a fused gate | up projection's two halves."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        half = gate_up.shape[-1] // 2
        return F.silu(gate_up[..., :half]) * gate_up[..., half:]


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 long-context scaling: slow down low frequencies, keep high ones."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the Hugging Face (rotate-half) layout.

    cos/sin are precomputed for every position so a step only gathers rows.
    They are made on the CPU explicitly, so they are real even when the model
    around them is built on the meta device.
    """

    cos: torch.Tensor
    sin_rotated: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling or {})
        elif rope_type == "linear":
            inv_freq = inv_freq / float((scaling or {})["factor"])
        elif rope_type not in ("default", None):
            raise ValueError(f"unsupported rope_scaling type {rope_type!r} (supported: default, linear, llama3)")
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64, device="cpu"), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        half = head_dim // 2
        sin_rotated = torch.cat([-emb[:, :half].sin(), emb[:, half:].sin()], dim=-1)
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin_rotated", sin_rotated.float(), persistent=False)

    def tables(self, positions: torch.Tensor) -> RotaryTables:
        """The rows for this step's positions, gathered once and shared by every layer."""
        return RotaryTables(self.cos[positions].unsqueeze(1), self.sin_rotated[positions].unsqueeze(1))


@dataclass(frozen=True)
class RotaryTables:
    """cos and sign-folded sin for one step's tokens, each (T, 1, head_dim).

    Rotate-half is x * cos + cat(-x2, x1) * sin. Folding the minus sign into
    the first half of sin makes it x * cos + roll(x, half) * sin_rotated:
    the same products and sums, bit for bit, in four calls instead of seven.
    """

    cos: torch.Tensor
    sin_rotated: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, heads, head_dim) -> rotated, in the tables' dtype (a narrower x is promoted)."""
        return x * self.cos + x.roll(x.shape[-1] // 2, -1) * self.sin_rotated
