"""The contract every KV cache manager honours (paged and virtual alike).

The scheduler decides how many tokens each request computes in a step; the
manager only answers whether the memory for them exists. `allocate_slots`
returning False is the signal to preempt, and leaves nothing half-allocated.

Layout seen by attention: each layer has a K and a V tensor viewed as
`[num_slots, num_kv_heads, head_dim]`, and a request's token at position p
lives at flat slot `kv_indices(request, p + 1)[p]`. A paged manager derives the
index from its block table; a virtual manager from the request's row in a
contiguous buffer.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kvos.engine.request import Request


class KVCacheManager(Protocol):
    """Narrow API between the scheduler, the model runner and KV memory."""

    block_size: int
    """Allocation granularity, in tokens."""

    capacity_tokens: int
    """How many tokens fit in the cache at once (all requests together)."""

    max_tokens_per_request: int
    """The longest sequence one request may ever hold."""

    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    """Per layer (K, V), each `[num_slots, num_kv_heads, head_dim]`."""

    def lookup_prefix(self, request: Request) -> int:
        """Tokens of `request` already in the cache (prefix hits), without taking them.

        Always leaves at least one token to compute, so the step yields logits.
        """
        ...

    def allocate_slots(self, request: Request, num_new_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Make room for `num_new_tokens` more tokens after the computed ones.

        On a request's first allocation `num_cached_tokens` (from
        `lookup_prefix`) are taken from the prefix cache as already computed.
        Returns False, changing nothing, when memory is short.
        """
        ...

    def fork(self, parent: Request, child: Request) -> bool:
        """Give `child` the KV of `parent`'s computed tokens (shared copy-on-write where possible).

        Returns False, changing nothing, when memory is short: the child then
        waits and recomputes its prompt instead.
        """
        ...

    def free(self, request: Request) -> None:
        """Give back everything `request` holds. Safe to call twice."""
        ...

    def check_fits(self, num_tokens: int) -> None:
        """Raise ValueError (naming the length and the capacity) if a request of
        `num_tokens` could never fit, even alone in an empty cache."""
        ...

    def kv_indices(self, request: Request, num_tokens: int) -> torch.Tensor:
        """Flat slot index (int64) of each of the request's first `num_tokens` positions."""
        ...

    @property
    def num_used_blocks(self) -> int:
        """Blocks (or pages) held by live requests; zero once all have ended."""
        ...

    @property
    def num_free_blocks(self) -> int:
        ...

    def prefix_cache_stats(self) -> tuple[int, int]:
        """(queried tokens, hit tokens) since start, for the hit rate."""
        ...
