"""Weight-only int8 and int4 linear layers for fast small-batch decode on CPU.

Decode at small batch sizes is bound by reading the weights: float32 weights
cost 4 bytes per parameter per step, int8 ones 1, int4 ones about 0.56 (a
float16 scale and minimum per group of 32). PyTorch ships CPU kernels for both
(`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`) on bfloat16
activations; they pay off only for a few rows at a time, so above
`max_quantized_rows` (prompt chunks, big decode batches) a bfloat16 GEMM runs
on a dequantized copy of the weight instead (the same codes, rounded to
bfloat16). On AVX512-VNNI CPUs int4 runs kvos's own kernels
(`kvos.model.int4_kernel`) at every batch size and keeps no copy: integer dot
products for a few rows, and where the CPU has AMX, above that, the tile unit
on weights dequantized to bfloat16 in cache.

int8: one symmetric scale per output channel (absmax / 127).
int4: per group of 32 inputs an asymmetric range, w = scale * q + min with q
in 0..15 -- the layout of GGUF's Q4_1 blocks, so re-quantizing weights that
were dequantized from a Q4_1 file recovers the file's 4-bit codes (and, in
kvos's kernel, its float16 scales and minimums).

Outputs come back in bfloat16: the model adds them to its float32 residual
stream, which promotes them, so no layer pays for a cast back. They are not
bit-identical to float32; the tolerance is documented and tested in
tests/model/test_quantization.py.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kvos.model import int4_kernel
from kvos.model.loader import return_freed_memory

Quantization = Literal["int8", "int4"]
INT4_GROUP_SIZE = 32

# Rows at and below which the quantized kernel beats a bfloat16 GEMM on the
# dequantized weight (measured on the 2-core AMD EPYC of BENCHMARKS.md).
DEFAULT_MAX_QUANTIZED_ROWS: dict[str, int] = {"int8": 8, "int4": 12}


class QuantizedLinear(nn.Module):
    """y = x @ dequant(W).T + b, with W stored quantized; subclasses pick the format."""

    weight_bf16: torch.Tensor | None
    """The dequantized weight, for batches too large for the quantized kernel (a buffer); None where
    the kernel is the faster one at every batch size."""

    def __init__(self, linear: nn.Linear, max_quantized_rows: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.max_quantized_rows = max_quantized_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        if self.weight_bf16 is None or x.shape[0] <= self.max_quantized_rows:
            y = self.quantized_matmul(x)
        else:
            y = F.linear(x, self.weight_bf16)
        return y if self.bias is None else y + self.bias

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (rows, in) bfloat16 through the quantized kernel."""
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer multiplies by, (out, in) bfloat16."""
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    """Per-output-channel symmetric int8."""

    def __init__(self, linear: nn.Linear, max_quantized_rows: int = DEFAULT_MAX_QUANTIZED_ROWS["int8"]) -> None:
        super().__init__(linear, max_quantized_rows)
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        qweight = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", qweight)  # (out, in)
        self.register_buffer("scales", scales.to(torch.bfloat16))  # (out,)
        self.register_buffer("weight_bf16", (qweight.float() * scales[:, None]).to(torch.bfloat16))

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)

    def dequantized_weight(self) -> torch.Tensor:
        assert self.weight_bf16 is not None
        return self.weight_bf16


class Int4Linear(QuantizedLinear):
    """Asymmetric int4 in groups of 32 input channels (GGUF Q4_1's layout).

    On AVX512-VNNI CPUs every batch runs kvos's own kernels (`kvos.model.int4_kernel`), so no
    dequantized copy is kept: activations quantized to int8 per group and integer dot products,
    measured at least as fast as a bfloat16 GEMM from 1 to 512 rows on the AMD EPYC of BENCHMARKS.md;
    where the CPU also has AMX (`amx`), batches of `int4_kernel.AMX_MIN_ROWS` rows or more run on
    the tile unit instead, on the weights dequantized to bfloat16 in cache: even with a bfloat16
    copy on AMX at 13 rows, 0.67-0.94x of it at 16-256 once that copy's GEMM prefetched its weights
    (the Intel Xeon of BENCHMARKS.md, session 16), a copy's 2 bytes per parameter not kept for that. Elsewhere
    PyTorch's int4 kernel takes up to `max_quantized_rows` rows and a bfloat16 GEMM on a
    dequantized copy the rest. `vnni` and `amx` force the choices (None: by the CPU).
    """

    packed: torch.Tensor

    def __init__(
        self,
        linear: nn.Linear,
        max_quantized_rows: int = DEFAULT_MAX_QUANTIZED_ROWS["int4"],
        vnni: bool | None = None,
        amx: bool | None = None,
    ) -> None:
        super().__init__(linear, max_quantized_rows)
        out_features, in_features = linear.weight.shape
        if in_features % INT4_GROUP_SIZE or out_features % int4_kernel.ROW_BLOCK:
            raise ValueError(
                f"int4 needs in_features divisible by {INT4_GROUP_SIZE} and out_features by "
                f"{int4_kernel.ROW_BLOCK}; this linear is {in_features} -> {out_features} (use quantization='int8')"
            )
        groups = linear.weight.detach().float().view(out_features, in_features // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
        low = groups.amin(dim=-1, keepdim=True)
        scale = ((groups.amax(dim=-1, keepdim=True) - low) / 15.0).clamp(min=1e-12)
        codes = torch.round((groups - low) / scale).clamp(0, 15)
        if vnni is None:
            vnni = int4_kernel.supported() and _fits_float16(scale, low)
        self.vnni = vnni
        if amx is None:
            amx = vnni and out_features % int4_kernel.AMX_COLUMNS == 0 and int4_kernel.amx_supported()
        if amx and not vnni:
            raise ValueError("Int4Linear: the AMX path multiplies the VNNI kernel's packed weights; amx needs vnni")
        self.amx = amx
        if vnni:
            # w = scale * q + low with float16 scale and low, as GGUF stores Q4_1.
            packed = int4_kernel.pack(codes.view(out_features, in_features), scale.half().float(), low.half().float())
            self.register_buffer("packed", packed)
            self.register_buffer("weight_bf16", None)
            return
        # PyTorch's convention: w = (q - 8) * scale + zero, with bfloat16 scales and zeros.
        scale_bf16 = scale.to(torch.bfloat16)
        zero_bf16 = (low + 8 * scale).to(torch.bfloat16)
        int_codes = codes.to(torch.int32).view(out_features, in_features)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(int_codes, 1))
        # (in / 32, out, 2): scale and zero of every group.
        self.register_buffer(
            "scales_and_zeros", torch.cat([scale_bf16, zero_bf16], dim=-1).transpose(0, 1).contiguous()
        )
        dequantized = (codes - 8) * scale_bf16.float() + zero_bf16.float()
        self.register_buffer("weight_bf16", dequantized.view(out_features, in_features).to(torch.bfloat16))

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.amx and x.shape[0] >= int4_kernel.AMX_MIN_ROWS:
            return int4_kernel.int4_linear_amx(x, self.packed, self.out_features)
        if self.vnni:
            return int4_kernel.int4_linear(x, self.packed, self.out_features)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, INT4_GROUP_SIZE, self.scales_and_zeros)

    def dequantized_weight(self) -> torch.Tensor:
        if self.weight_bf16 is not None:
            return self.weight_bf16
        codes, scale, low = int4_kernel.unpack(self.packed)
        weight = codes.float().view(self.out_features, -1, INT4_GROUP_SIZE) * scale[..., None] + low[..., None]
        return weight.view(self.out_features, self.in_features).to(torch.bfloat16)


def _fits_float16(*tensors: torch.Tensor) -> bool:
    """float16 holds these scales and minimums (real weights' always; a huge random init's might not)."""
    return all(bool(torch.isfinite(t.half()).all()) for t in tensors)


_FORMATS: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "int4": Int4Linear}


def quantize(model: nn.Module, method: Quantization, max_quantized_rows: int | None = None) -> None:
    """Swap every nn.Linear of `model` (lm_head included) for a quantized one, in place."""
    if method not in _FORMATS:
        raise ValueError(f"quantization must be one of {sorted(_FORMATS)}, got {method!r}")
    rows = DEFAULT_MAX_QUANTIZED_ROWS[method] if max_quantized_rows is None else max_quantized_rows
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, _FORMATS[method](child, rows))
    return_freed_memory()
