"""Block copies between KV tensors on CPU, by kvos's C++ kernel (`csrc/kv_copy.cpp`): why, there."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch

from kvos.extensions import build_cpu_extension

_SOURCE = Path(__file__).parent / "csrc" / "kv_copy.cpp"


@functools.cache
def load() -> None:
    """Compile (first use on this machine) and load the kernel: defines torch.ops.kvos.copy_blocks."""
    build_cpu_extension("kvos_kv_copy", _SOURCE, "the host KV tier")


def copy_blocks(
    src: Sequence[torch.Tensor], dst: Sequence[torch.Tensor], runs: Sequence[tuple[int, int, int]], block_size: int
) -> None:
    """For each tensor pair and each run (source block, destination block, blocks): copy those blocks' rows.

    Block b of a tensor is rows [b * block_size, (b + 1) * block_size); pairs share dtype and row size.
    ValueError names a run outside either tensor.
    """
    load()
    table = torch.tensor(runs, dtype=torch.long).view(-1, 3)
    torch.ops.kvos.copy_blocks(list(src), list(dst), table, block_size)
