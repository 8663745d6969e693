"""kvos's block-copy kernel against slice copies done one block at a time, and its refusals."""

from __future__ import annotations

import pytest
import torch

from kvos.worker.kv_copy import copy_blocks

BLOCK = 4


def tensors(num_blocks: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(num_blocks * BLOCK, 3, 8, generator=g).to(dtype) for _ in range(4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runs_land_where_a_block_by_block_copy_puts_them(dtype: torch.dtype) -> None:
    src, dst = tensors(10, dtype, 0), tensors(6, dtype, 1)
    expected = [t.clone() for t in dst]
    runs = [(7, 0, 2), (0, 5, 1), (3, 2, 3)]  # scattered sources, a run of several, the last block
    for s, e in zip(src, expected):
        for first, target, count in runs:
            for b in range(count):
                e[(target + b) * BLOCK : (target + b + 1) * BLOCK] = s[(first + b) * BLOCK : (first + b + 1) * BLOCK]
    copy_blocks(src, dst, runs, BLOCK)
    for got, want in zip(dst, expected):
        assert torch.equal(got, want)


def test_rows_that_lie_apart_are_copied_row_by_row() -> None:
    """Rows with a stride of their own (a layer's slice of an interleaved buffer), on both sides."""
    wide_src, wide_dst = torch.randn(8 * BLOCK, 2, 3, 8), torch.zeros(5 * BLOCK, 2, 3, 8)
    src, dst = [wide_src[:, 1]], [wide_dst[:, 0]]
    copy_blocks(src, dst, [(6, 1, 2)], BLOCK)
    assert torch.equal(wide_dst[BLOCK : 3 * BLOCK, 0], wide_src[6 * BLOCK : 8 * BLOCK, 1])
    assert wide_dst[:, 1].abs().sum() == 0 and wide_dst[:BLOCK].abs().sum() == 0


def test_a_run_outside_either_tensor_is_refused_before_anything_moves() -> None:
    src, dst = tensors(4, torch.float32, 0), tensors(2, torch.float32, 1)
    before = [t.clone() for t in dst]
    with pytest.raises(ValueError, match=r"run 1 \(3 -> 1, 2 blocks\) is outside 4 source or 2 destination"):
        copy_blocks(src, dst, [(0, 0, 1), (3, 1, 2)], BLOCK)
    with pytest.raises(ValueError, match="tensor pair 0 must be CPU tensors of rows, each row contiguous"):
        copy_blocks(src[:1], [dst[0].transpose(1, 2)], [(0, 0, 1)], BLOCK)
    with pytest.raises(ValueError, match="tensor pair 0 differs in dtype or row size"):
        copy_blocks(src[:1], [dst[0].to(torch.bfloat16)], [(0, 0, 1)], BLOCK)
    with pytest.raises(ValueError, match="2 source tensors but 1 destinations"):
        copy_blocks(src[:2], dst[:1], [(0, 0, 1)], BLOCK)
    assert all(torch.equal(a, b) for a, b in zip(before, dst))  # run 0 was valid, yet nothing moved
