"""Decode steps compiled with torch.compile: on a CPU, what CUDA graphs are on a GPU.

A decode step runs the same few hundred small ops every time, and in eager
PyTorch each pays Python and dispatcher overhead that, at batch 1, costs as
much as the matmuls. Inductor fuses the elementwise work (norms, residual
adds, rotary, SwiGLU) into a few generated C++ loops and leaves the matmuls
and attention to their kernels.

Guards: before each call dynamo re-checks what the graph assumed, by default
every parameter of every module (about 4,500 checks for SmolLM2, 0.5-0.8 ms a
step here). The weights and the KV cache tensors never change after start-up,
so only the guards on the step's own inputs (token ids, positions, attention
metadata) and on global state are kept. Without module guards, two models
must never share compiled code: dynamo files graphs under the code object of
the compiled function, so every model gets its own copy of `_decode_step`,
and `fullgraph=True` rules out graph breaks that would resume in code
objects shared between models.

Shapes: batch size and context length vary from step to step; weights and
caches never do. The warm-up steps mark just those two sizes dynamic, so a
few graphs cover every step (batch 1 is specialised; quantized linears branch
on their row limit), and `ModelRunner.warm_up_decode` compiles them at
start-up so no request waits for the compiler. The warm-up context is one
longer than the batch: equal sizes would be assumed equal forever. Inductor
caches the compiled code on disk; the graphs are specialised on the cache's
shape, which stays put across runs (the KV budget is rounded, see
`memory.factory`), so later start-ups take seconds, not minutes.
"""

from __future__ import annotations

import functools
import os
import shutil
import types
from collections.abc import Callable, Sequence

import torch

from kvos.attention.metadata import AttentionMetadata
from kvos.model.llama import KVCaches, LlamaForCausalLM

# Attention backends whose decode metadata the warm-up builds and marks dynamic.
COMPILED_BACKENDS = ("paged", "gather_sdpa")

# The forward's own arguments; guards on anything else (modules, weights, KV cache, globals) are dropped.
_GUARDED_INPUTS = ("input_ids", "positions", "meta")


def _keep_input_guards(entries: Sequence[object]) -> list[bool]:
    """Keep global-state guards (empty name) and guards on the step's inputs."""
    keep = []
    for entry in entries:
        name: str = entry.name  # type: ignore[attr-defined]
        keep.append(name == "" or name.split("[")[0].split(".")[0] in _GUARDED_INPUTS)
    return keep


def _decode_step(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    kv_caches: KVCaches,
    meta: AttentionMetadata,
) -> torch.Tensor:
    return model(input_ids, positions, kv_caches, meta)


def compile_decode(model: LlamaForCausalLM) -> Callable[..., torch.Tensor]:
    """`model.forward`, compiled for decode steps of this model alone (input guards only)."""
    device = next(model.parameters()).device
    compiler = os.environ.get("CXX", "g++")
    if device.type == "cpu" and shutil.which(compiler) is None:
        raise ValueError(
            f"compile=True on CPU needs a C++ compiler for torch.compile's Inductor backend; {compiler!r} "
            "is not on PATH (install g++, or set CXX)"
        )
    own_copy = types.FunctionType(_decode_step.__code__.replace(), _decode_step.__globals__, _decode_step.__name__)
    compiled = torch.compile(own_copy, fullgraph=True, options={"guard_filter_fn": _keep_input_guards})
    return functools.partial(compiled, model)


def mark_dynamic_sizes(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
    """Compile the next call for any batch size (when it is not 1) and any context length."""
    batch_dims = [(input_ids, 0), (positions, 0), (meta.slot_mapping, 0)]
    if meta.paged is not None:
        batch_dims += [(meta.paged.block_tables, 0), (meta.paged.seqs, 0)]
        context_dims = [(meta.paged.block_tables, 1)]
    else:
        assert meta.decode is not None
        batch_dims += [(meta.decode.kv_indices, 0), (meta.decode.mask, 0)]
        context_dims = [(meta.decode.kv_indices, 1), (meta.decode.mask, 3)]
    if input_ids.shape[0] > 1:
        for tensor, dim in batch_dims:
            torch._dynamo.mark_dynamic(tensor, dim)
    for tensor, dim in context_dims:
        torch._dynamo.mark_dynamic(tensor, dim)
