"""What one step's attention needs to know, built once and shared by every layer.

The batch is a flat list of tokens from many requests (no padding in the
linear layers). Attention splits it: requests decoding one token are run
together as one padded batch; each prefill chunk is run on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvos.attention.contiguous import KVSpan


@dataclass
class DecodeBatch:
    """Requests computing a single token this step, attended as one batch."""

    token_rows: torch.Tensor  # (B,) rows of the flat batch holding their query
    kv_indices: torch.Tensor  # (B, L_max) flat cache slots of each request's context, padded
    mask: torch.Tensor  # (B, 1, 1, L_max) True where a key is part of the context
    all_rows: bool  # every token of the step is one of these decodes, in order (token_rows == arange(B))


@dataclass
class PrefillChunk:
    """A run of prompt tokens of one request, attending to its cached prefix too."""

    token_start: int  # first row in the flat batch
    num_tokens: int
    num_computed: int  # tokens already in the cache before this chunk
    kv_indices: torch.Tensor  # (num_computed + num_tokens,) flat cache slots


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) where each new token's K/V is written
    decode: DecodeBatch | None
    prefills: list[PrefillChunk]
    # Set when the KV manager keeps each request's KV contiguous (virtual cache):
    # attention then reads every request's run in place instead of `decode`/`prefills`.
    spans: list[KVSpan] | None = None
