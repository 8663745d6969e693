"""kvos's own int4 matmul for small batches on AVX512-VNNI CPUs (`csrc/int4_linear.cpp`).

PyTorch's `_weight_int4pack_mm_for_cpu` converts each weight to floating point
before multiplying: at batch 1 on the 2-core EPYC of BENCHMARKS.md it reads
SmolLM2's int4 weights at about half the bandwidth a plain read reaches. This
kernel quantizes the few activation rows to int8 per group of 32 instead (as
llama.cpp does) and multiplies 4-bit codes by 8-bit activations with integer
dot-product instructions, so the weights stream at close to memory speed.

Above a few rows the integer products cost more than the 4-bit weights save in bytes. Where the
CPU has AMX, `int4_linear_amx` takes those batches: it dequantizes the weights to bfloat16 once
per call, a few output rows at a time into a buffer that stays in cache, and multiplies on the
tile unit (kvos/csrc/amx_gemm.h, the GEMM of kvos's bfloat16 linears), so no bfloat16 copy of
the weights is kept for them.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from kvos.extensions import AMX_FLAGS, build_cpu_extension, cpu_flags

GROUP_SIZE = 32
ROW_BLOCK = 16
"""Output rows per packed block: one per 32-bit lane of an AVX-512 register."""
AMX_MIN_ROWS = 13
"""Activation rows from which `int4_linear_amx` is the faster of the two (a forward pass's linears, weights
from memory, on the Intel Xeon of BENCHMARKS.md: 12 rows 1.12x slower, 16 rows 1.15x faster)."""
AMX_COLUMNS = 32
"""`int4_linear_amx` takes weights whose output size is a multiple of this (two row blocks a column pair)."""
_NEEDED_FLAGS = frozenset({"avx512f", "avx512bw", "avx512_vnni", "f16c"})
_SOURCE = Path(__file__).parent / "csrc" / "int4_linear.cpp"


def supported() -> bool:
    """True on CPUs with AVX512-VNNI (and the AVX-512 parts it builds on)."""
    return _NEEDED_FLAGS <= cpu_flags()


@functools.cache
def amx_supported() -> bool:
    """True where `int4_linear_amx` runs: a CPU with AMX whose Linux lends this process the tile state."""
    if not (supported() and AMX_FLAGS <= cpu_flags()):
        return False
    load()
    return bool(torch.ops.kvos.int4_amx_available())


@functools.cache
def load() -> None:
    """Compile (first use on this machine) and load the kernel: torch.ops.kvos.int4_linear and .int4_linear_amx."""
    build_cpu_extension("kvos_int4_linear", _SOURCE, "quantization='int4'")

    for op in ("kvos::int4_linear", "kvos::int4_linear_amx"):

        @torch.library.register_fake(op)
        def _(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
            return x.new_empty((x.shape[0], out_features))


def pack(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The kernel's layout of w = scale * code + low: codes (out, in) in 0..15, scale and low (out, in / 32).

    Returns uint8 (out / 16, in / 32, 320): per block of 16 output rows and group of 32 inputs, the
    codes as 4 chunks of 64 bytes (lane l holds row l's codes 8t+j in its low nibbles and 8t+4+j in
    its high ones), then the 16 scales and the 16 lows as float16. Loads the kernel (anyone with a
    packed weight is about to multiply by it).
    """
    load()
    out_features, in_features = codes.shape
    if out_features % ROW_BLOCK or in_features % GROUP_SIZE:
        raise ValueError(
            f"the int4 kernel packs {ROW_BLOCK}-row blocks of {GROUP_SIZE}-input groups; got a "
            f"({out_features}, {in_features}) weight"
        )
    blocks, groups = out_features // ROW_BLOCK, in_features // GROUP_SIZE
    # (block, lane, group, chunk t, half, j) with input = 32 group + 8 t + 4 half + j
    c = codes.to(torch.uint8).view(blocks, ROW_BLOCK, groups, 4, 2, 4)
    nibbles = c[..., 0, :] | (c[..., 1, :] << 4)  # (block, lane, group, t, j)
    code_bytes = nibbles.permute(0, 2, 3, 1, 4).reshape(blocks, groups, -1)

    def halves(v: torch.Tensor) -> torch.Tensor:
        per_block = v.to(torch.float16).view(blocks, ROW_BLOCK, groups).transpose(1, 2).contiguous()
        return per_block.view(torch.uint8).view(blocks, groups, 2 * ROW_BLOCK)

    return torch.cat([code_bytes, halves(scale), halves(low)], dim=-1).contiguous()


def unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pack`'s inverse: codes (out, in) uint8, scale and low (out, in / 32) float32."""
    blocks, groups, _ = packed.shape
    code_bytes = packed[..., : 4 * 64].reshape(blocks, groups, 4, ROW_BLOCK, 4).permute(0, 3, 1, 2, 4)
    codes = torch.stack([code_bytes & 0x0F, code_bytes >> 4], dim=-2)  # (block, lane, group, t, half, j)
    out_features = blocks * ROW_BLOCK

    def floats(start: int) -> torch.Tensor:
        halves = packed[..., start : start + 2 * ROW_BLOCK].contiguous().view(torch.float16)
        return halves.float().transpose(1, 2).reshape(out_features, groups)

    return codes.reshape(out_features, groups * GROUP_SIZE), floats(4 * 64), floats(4 * 64 + 2 * ROW_BLOCK)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x (rows, in) bfloat16 times the packed weight's transpose: (rows, out) bfloat16."""
    return torch.ops.kvos.int4_linear(x, packed, out_features)


def int4_linear_amx(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The same product on the tile unit, weights dequantized to bfloat16 and x as it is (`amx_supported()`
    only; out_features a multiple of 32)."""
    return torch.ops.kvos.int4_linear_amx(x, packed, out_features)
