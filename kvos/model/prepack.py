"""bfloat16 linears on CPU with their weights reordered once, at start-up, for the GEMM that runs them.

`F.linear` in bfloat16 on a CPU runs oneDNN's matmul, which reorders the
weight into its blocked layout on every call. At the row counts of a decode
step (1 to 64) that reorder costs about as much as the multiply: the same
oneDNN kernel on a weight reordered once runs 1.3-2.3x faster there and gives
bit-identical outputs (the same kernel and blocking; measured in
BENCHMARKS.md, asserted in tests/model/test_prepack.py). Inductor's freezing
pass does the same for compiled graphs; this is the eager path's version.

On a CPU with AMX the weight is packed for kvos's own tile kernel instead
(`kvos.model.amx_linear`: 1.3-1.6x oneDNN's speed at 1 to 32 rows, about
even above). Its outputs differ from `F.linear`'s only in the order of float32
additions: none at 16 rows or fewer, one bfloat16 unit on a few outputs above.

Only bfloat16 is prepacked: float32 `F.linear` goes to a different GEMM
whose sums are ordered differently, and float32 is the dtype whose greedy
tokens must equal HF transformers' exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from kvos.model import amx_linear
from kvos.model.loader import return_freed_memory


class PrepackedLinear(nn.Module):
    """`nn.Linear` whose weight lives only in a GEMM's own layout: the AMX kernel's where the CPU has AMX
    and the shape fits it, oneDNN's blocked layout (an opaque mkldnn tensor) otherwise."""

    def __init__(self, linear: nn.Linear, batch_size_hint: int, use_amx: bool = True) -> None:
        """`use_amx=False` keeps oneDNN where the AMX kernel could run (to compare the two)."""
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.amx = use_amx and amx_linear.fits(self.out_features, self.in_features) and amx_linear.supported()
        # A plain attribute, not a buffer: a packed weight has no layout that state_dict, `.to` or
        # parameter counts could use, and nothing but this forward reads it.
        weight = linear.weight.detach()
        if self.amx:
            self.packed_weight = amx_linear.pack(weight)
        else:
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size_hint)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.amx:
            if rows.stride(1) != 1:
                rows = rows.contiguous()
            out = torch.ops.kvos_amx.linear(rows, self.packed_weight, self.bias)
        else:
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight back out of its packed layout."""
        return amx_linear.unpack(self.packed_weight) if self.amx else self.packed_weight.to_dense()


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """bfloat16 on a CPU whose torch has oneDNN with bfloat16 support."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def prepack_linears(model: nn.Module, batch_size_hint: int) -> int:
    """Swap every bfloat16 `nn.Linear` of `model` (a tied lm_head included: it gets its own packed
    copy, the embedding keeps the original) for a `PrepackedLinear`, in place. Returns how many."""
    if batch_size_hint < 1:
        raise ValueError(f"batch_size_hint must be >= 1, got {batch_size_hint}")
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16:
                setattr(module, name, PrepackedLinear(child, batch_size_hint))
                count += 1
    return_freed_memory()
    return count
