"""kvos's own bfloat16 linear on the AMX tile unit (`csrc/amx_linear.cpp`), for the decode step's row counts.

oneDNN's prepacked bfloat16 GEMM reads SmolLM2's weights at 7-10 GB/s for 16 to 64 rows on
the Intel Xeon of BENCHMARKS.md (its AMX kernels are tuned for bigger matrices). This kernel
packs each weight once into the pairs-of-k layout the tile instruction reads, streams every
column tile's weights once per call, and feeds each tile it loads to two products, so at 1 to
32 rows it ran 1.3-1.6x faster than oneDNN on the same weights, at 64 rows 1.0-1.4x, and at
128-512 rows within 10% either way (session 14). Every sum is float32 and the output is
rounded once, as oneDNN does; the two differ only in the order of float32 additions (at most
one bfloat16 unit in the last place on a few outputs, none at 16 rows or fewer).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from kvos.extensions import AMX_FLAGS, build_cpu_extension, cpu_flags

TILE = 32
"""The kernel packs weights whose input and output sizes are multiples of this."""
_SOURCE = Path(__file__).parent / "csrc" / "amx_linear.cpp"


@functools.cache
def supported() -> bool:
    """True on CPUs with AMX whose Linux lends this process the tile state (the kernel is built to ask)."""
    if not AMX_FLAGS <= cpu_flags():
        return False
    load()
    return bool(torch.ops.kvos_amx.available())


@functools.cache
def load() -> None:
    """Compile (first use on this machine) and load the kernel: torch.ops.kvos_amx.pack and .linear."""
    build_cpu_extension("kvos_amx_linear", _SOURCE, "bfloat16 linears on AMX")

    @torch.library.register_fake("kvos_amx::linear")
    def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return x.new_empty((x.shape[0], packed.shape[0] * 16))


def fits(out_features: int, in_features: int) -> bool:
    return out_features % TILE == 0 and in_features % TILE == 0


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) bfloat16 -> the kernel's layout, (out / 16, in x 16): per 16 output rows, each pair of
    inputs' 16 x 2 values side by side."""
    if not fits(*weight.shape):
        raise ValueError(f"the AMX kernel packs weights whose sizes are multiples of {TILE}, got {tuple(weight.shape)}")
    load()
    return torch.ops.kvos_amx.pack(weight)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The (out, in) weight that `pack` laid out."""
    tiles, width = packed.shape
    return packed.view(tiles, width // 32, 16, 2).permute(0, 2, 1, 3).reshape(tiles * 16, width // 16)
