"""A bfloat16 decoder layer's elementwise work on CPU in C++: one call per op (`csrc/layer_ops.cpp`).

In eager PyTorch a bfloat16 RMSNorm is four kernels, SwiGLU two and rotary
four; at a decode step's row counts each pays dispatch and a pass over memory
of its own: with the KV write, 15-30 ms of a 50-140 ms decode step at 16-64
requests (BENCHMARKS.md, round 2, session 11). The kernels compute the same formulas with the same roundings
to bfloat16 in between. Like the prepacked linears, they replace the model's
modules after loading, for eager bfloat16 on a CPU; a compiled model keeps
torch's ops, which Inductor fuses itself, and float32 keeps them too, bit for
bit the reference's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kvos.extensions import build_cpu_extension
from kvos.model.layers import RMSNorm, RotaryEmbedding, RotaryTables, SiluAndMul

_SOURCE = Path(__file__).parent / "csrc" / "layer_ops.cpp"


@functools.cache
def load() -> None:
    """Compile (first use on this machine) and load the kernels: torch.ops.kvos.rms_norm, silu_mul, rotary."""
    build_cpu_extension("kvos_layer_ops", _SOURCE, "bfloat16 on CPU")


@dataclass(frozen=True)
class LayerOps:
    """One implementation of the three ops: the C++ kernels here (`cpp_ops()`), Triton's for a GPU
    (`kvos.model.triton_layers.TRITON_OPS`). The modules below run whichever they are given."""

    name: str
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    silu_mul: Callable[[torch.Tensor], torch.Tensor]
    rotary: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@functools.cache
def cpp_ops() -> LayerOps:
    """The C++ kernels (loaded, built on first use), as the torch operators themselves: no Python frame
    between a module and its kernel."""
    load()
    return LayerOps("C++", torch.ops.kvos.rms_norm, torch.ops.kvos.silu_mul, torch.ops.kvos.rotary)


class KernelRMSNorm(nn.Module):
    def __init__(self, norm: RMSNorm, ops: LayerOps) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class KernelSiluAndMul(nn.Module):
    def __init__(self, ops: LayerOps) -> None:
        super().__init__()
        self.ops = ops

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.ops.silu_mul(gate_up)


@dataclass(frozen=True)
class KernelRotaryTables(RotaryTables):
    ops: LayerOps

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rotary(x, self.cos, self.sin_rotated)


class KernelRotaryEmbedding(nn.Module):
    """The same tables as the `RotaryEmbedding` it replaces, applied by the kernel."""

    cos: torch.Tensor
    sin_rotated: torch.Tensor

    def __init__(self, rotary: RotaryEmbedding, ops: LayerOps) -> None:
        super().__init__()
        self.register_buffer("cos", rotary.cos, persistent=False)
        self.register_buffer("sin_rotated", rotary.sin_rotated, persistent=False)
        self.ops = ops

    def tables(self, positions: torch.Tensor) -> RotaryTables:
        return KernelRotaryTables(self.cos[positions].unsqueeze(1), self.sin_rotated[positions].unsqueeze(1), self.ops)


def can_use_layer_kernels(device: torch.device, dtype: torch.dtype) -> bool:
    """Eager bfloat16 on a CPU (the caller leaves compiled models to Inductor)."""
    return device.type == "cpu" and dtype == torch.bfloat16


def use_layer_kernels(model: nn.Module) -> int:
    """Swap `model`'s RMSNorms, SwiGLU activations and rotary embedding for the kernels', in place.

    The model must compute in bfloat16 on a CPU (`can_use_layer_kernels`). Returns how many modules were swapped.
    """
    swaps = layer_swaps(model, cpp_ops())
    for module, name, swapped in swaps:
        setattr(module, name, swapped)
    return len(swaps)


def layer_swaps(model: nn.Module, ops: LayerOps) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, replacement) for each of `model`'s bfloat16 RMSNorms, SwiGLU activations and rotary
    embedding, running `ops`; ValueError names a norm that does not hold bfloat16."""
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, RMSNorm):
                if child.weight.dtype != torch.bfloat16:
                    raise ValueError(
                        f"the {ops.name} layer kernels compute in bfloat16; {name} holds {child.weight.dtype}"
                    )
                swaps.append((module, name, KernelRMSNorm(child, ops)))
            elif isinstance(child, SiluAndMul):
                swaps.append((module, name, KernelSiluAndMul(ops)))
            elif isinstance(child, RotaryEmbedding):
                swaps.append((module, name, KernelRotaryEmbedding(child, ops)))
    return swaps
