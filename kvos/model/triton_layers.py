"""A bfloat16 decoder layer's elementwise work on a GPU in Triton: one kernel per op.

The GPU's counterpart of `kvos.model.layer_kernels` (C++ on a CPU), with the
same formulas and the same roundings to bfloat16 between them:

    rms_norm(x, w)      w * bf16(x * rsqrt(mean(x^2) + eps))      the sum in float32
    silu_mul(gate_up)   bf16(bf16(silu(gate)) * up)               gate | up halves of each row
    rotary(x, cos, sin) bf16(bf16(x * cos) + bf16(roll(x, D/2) * sin))

Why: eager bfloat16 PyTorch runs an RMSNorm as four kernels, SwiGLU as two
and rotary as four (layer_kernels.py counts them): with a layer's two norms,
fourteen kernels besides the matmuls and attention, which these make four. Inside a CUDA graph the launches
are gone, but each kernel still costs a pass over memory and a few
microseconds: on the H200, session 25's batch-1 decode graph of the
Llama-3-8B shape took 5.97 ms a token against a 3.4 ms weight-read bound.
What these kernels save there is measured by `scripts/gpu_targets.py`'s
decode check, with and without them; no GPU has run them yet.

Only the float32 sum of squares may be added in another order than eager's
(and, compiled for a GPU, its reciprocal square root is the hardware's), so a
value can round one bfloat16 ulp the other way; every other result is
rounded where the eager ops round. Tested against the formulas in float64 on
the CPU in Triton's interpreter (`tests/model/test_layer_kernels.py`, beside
the C++ kernels), and compiled on a lent GPU by `scripts/gpu_targets.py`'s
kernel check.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from typing import Any

import torch
from torch import nn

from kvos.attention.paged_triton import next_power_of_2
from kvos.model.layer_kernels import LayerOps, layer_swaps

logger = logging.getLogger(__name__)

_SILU_BLOCK = 1024


@functools.cache
def _kernels() -> Any:
    """The jitted kernels, imported on first use (so importing kvos never imports Triton)."""
    return importlib.import_module("kvos.model.triton_layers_kernel")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (rows, features) bfloat16, each row contiguous."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, features = x.shape
    out = torch.empty((rows, features), dtype=torch.bfloat16, device=x.device)
    block = next_power_of_2(features)
    _kernels().rms_norm_kernel[(rows,)](
        x, weight, out, x.stride(0), out.stride(0), features, eps, BLOCK=block, num_warps=min(16, max(1, block // 256))
    )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: (rows, 2 * width) bfloat16, each row contiguous -> (rows, width)."""
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    rows, width = gate_up.shape
    if width % 2:
        raise ValueError(f"silu_mul: the row width {width} must be even (gate | up)")
    half = width // 2
    out = torch.empty((rows, half), dtype=torch.bfloat16, device=gate_up.device)
    grid = (rows, -(-half // _SILU_BLOCK))
    _kernels().silu_mul_kernel[grid](gate_up, out, gate_up.stride(0), out.stride(0), half, BLOCK=_SILU_BLOCK)
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin_rotated: torch.Tensor) -> torch.Tensor:
    """x: (tokens, heads, head_dim) bfloat16 with contiguous head dims; cos, sin_rotated: (tokens, 1, head_dim)."""
    tokens, heads, head_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin_rotated = cos.contiguous(), sin_rotated.contiguous()
    out = torch.empty((tokens, heads, head_dim), dtype=torch.bfloat16, device=x.device)
    _kernels().rotary_kernel[(tokens, heads)](
        x,
        cos,
        sin_rotated,
        out,
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        cos.stride(0),
        head_dim,
        BLOCK=next_power_of_2(head_dim),
    )
    return out


TRITON_OPS = LayerOps("Triton", rms_norm, silu_mul, rotary)


def can_use_triton_layers(device: torch.device, dtype: torch.dtype) -> bool:
    """Eager bfloat16 on a CUDA device with Triton installed (the caller leaves compiled models to Inductor)."""
    return device.type == "cuda" and dtype == torch.bfloat16 and importlib.util.find_spec("triton") is not None


def use_triton_layers(model: nn.Module) -> int:
    """Swap `model`'s bfloat16 RMSNorms, SwiGLU activations and rotary embedding for the kernels', in place.

    Returns how many modules were swapped. Each kernel first runs once on a few rows on the model's
    device; if one fails there (a Triton that cannot compile it for this GPU), the error is logged and
    nothing is swapped: the model runs torch's ops, as without Triton.
    """
    swaps = layer_swaps(model, TRITON_OPS)
    if not swaps:
        return 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        probe = torch.ones(2, 64, dtype=torch.bfloat16, device=device)
        TRITON_OPS.rms_norm(probe, probe[0], 1e-6)
        TRITON_OPS.silu_mul(probe)
        TRITON_OPS.rotary(probe.view(2, 1, 64), probe.view(2, 1, 64), probe.view(2, 1, 64))
    except Exception:
        logger.exception("the Triton layer kernels failed on %s; the model keeps torch's ops", device)
        return 0
    for module, name, swapped in swaps:
        setattr(module, name, swapped)
    return len(swaps)
