"""The attention backend interface and the registry that picks one by name.

A backend declares the KV layout it needs, builds its per-step metadata from
fields every step has (`SeqLayout`), and runs attention for every layer with
that metadata. The model calls the backend chosen at start-up
(`--attention-backend`), never a hard-coded function, so a new kernel is one
file here plus its test.

    worker: plan -> [SeqLayout per request] -> backend.build_metadata() -> AttentionMetadata
    model:  every layer -> backend.forward(q, k, v, k_cache, v_cache, metadata)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from kvos.attention.metadata import AttentionMetadata


@dataclass(slots=True)
class SeqLayout:
    """One request's part of the step, in the terms every backend understands.

    Built per request per step, so slotted and not frozen (a frozen dataclass's `__init__` costs 2.4x)."""

    token_start: int
    """First row of the request's tokens in the flat batch."""
    num_tokens: int
    """Tokens computed this step (1 when decoding)."""
    num_computed: int
    """Positions already in the KV cache before this step."""
    context_slots: torch.Tensor
    """(num_computed + num_tokens,) int64 flat cache slot of every position of its context."""
    block_table: torch.Tensor | None = None
    """int32 ids of the blocks holding its context, in position order (for backends that walk tables)."""
    block_size: int | None = None
    """Positions per block of `block_table`: slot = block_table[p // block_size] * block_size + p % block_size."""

    @property
    def kv_start(self) -> int:
        """Flat slot of position 0: the start of the run when the KV is contiguous."""
        return int(self.context_slots[0])


class AttentionBackend(Protocol):
    name: ClassVar[str]
    needs_contiguous_kv: ClassVar[bool]
    """True when each request's KV must be one run of slots (the virtual cache)."""

    def build_metadata(self, seqs: list[SeqLayout], num_tokens: int, device: torch.device) -> AttentionMetadata:
        """Everything the layers need for this step, built once and shared by all of them."""
        ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """q: (T, H, D); k, v: (T, KV, D); caches: (num_slots, KV, D) flat. Writes k, v; returns (T, H, D)."""
        ...


def backend_names() -> tuple[str, ...]:
    return ("gather_sdpa", "contiguous", "paged", "paged_triton")


def make_backend(name: str) -> AttentionBackend:
    """The backend called `name` (see `backend_names`)."""
    if name == "gather_sdpa":
        from kvos.attention.gather_sdpa import GatherSDPABackend

        return GatherSDPABackend()
    if name == "contiguous":
        from kvos.attention.contiguous import ContiguousBackend

        return ContiguousBackend()
    if name == "paged":
        from kvos.attention.paged_cpu import PagedCPUBackend

        return PagedCPUBackend()
    if name == "paged_triton":
        from kvos.attention.paged_triton import PagedTritonBackend

        return PagedTritonBackend()
    raise ValueError(f"unknown attention backend {name!r}; kvos has {', '.join(backend_names())}")


def slot_mapping(seqs: list[SeqLayout]) -> torch.Tensor:
    """(T,) where each new token's K and V are written, in batch order."""
    return torch.cat([s.context_slots[s.num_computed :] for s in seqs])
