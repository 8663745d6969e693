"""Weight-only int8 linear layers for fast small-batch decode on CPU.

Decode at small batch sizes is bound by reading the weights: float32 weights
cost 4 bytes per parameter per step, int8 ones 1. Each output channel gets one
symmetric scale (per-channel absmax / 127). The int8 kernel
(`aten._weight_int8pack_mm`) pays off only for a few rows at a time, so rows
above `max_int8_rows` (prompt chunks, big decode batches) run a bfloat16 GEMM on
the dequantized weight instead; both see the same rounded weights.

Quantized outputs are not bit-identical to float32: the tolerance is
documented and tested in tests/model/test_quantization.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Above this many rows the bfloat16 GEMM beats the int8 GEMV kernel (measured, see BENCHMARKS.md).
DEFAULT_MAX_INT8_ROWS = 8


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + b with q int8 per output channel."""

    def __init__(self, linear: nn.Linear, max_int8_rows: int = DEFAULT_MAX_INT8_ROWS) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        qweight = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", qweight)  # (out, in)
        self.register_buffer("scales", scales.to(torch.bfloat16))  # (out,)
        self.register_buffer("weight_bf16", (qweight.float() * scales[:, None]).to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.max_int8_rows = max_int8_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_bf16 = x.to(torch.bfloat16)
        if x.shape[0] <= self.max_int8_rows:
            y = torch.ops.aten._weight_int8pack_mm(x_bf16, self.qweight, self.scales)
        else:
            y = F.linear(x_bf16, self.weight_bf16)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias


def quantize_int8(model: nn.Module, max_int8_rows: int = DEFAULT_MAX_INT8_ROWS) -> None:
    """Swap every nn.Linear of `model` (lm_head included) for an Int8Linear, in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child, max_int8_rows))
