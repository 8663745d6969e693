"""What one step's attention needs to know, built once and shared by every layer.

The batch is a flat list of tokens from many requests (no padding in the
linear layers). The gather backend splits it: requests decoding one token are
run together as one padded batch; each prefill chunk is run on its own. The
contiguous backend reads each request's run of slots in place (`spans`); the
paged backend reads each request's blocks in place through its block table
(`paged`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    mask: torch.Tensor | None = None
    """(num_tokens, num_computed + num_tokens) bool, True where query i sees key j (up to position
    num_computed + i); None for a whole prompt, whose mask is plain causal. Built once per step."""


@dataclass(frozen=True)
class KVSpan:
    """One request in the step: its query rows and where its contiguous KV run starts."""

    token_start: int  # first row of the request's tokens in the flat batch
    num_tokens: int  # tokens computed this step (1 when decoding)
    kv_start: int  # flat cache slot of the request's position 0
    num_computed: int  # positions already in the cache before this step

    @property
    def kv_len(self) -> int:
        return self.num_computed + self.num_tokens


@dataclass
class PagedBatch:
    """Every request of the step for one paged-attention call per layer.

    On a CPU without AVX-512, or with AMX (`paged_cpu.prompts_to_sdpa`), requests
    computing `PROMPT_SDPA_MIN_TOKENS` or more tokens go to torch's SDPA instead
    (`prompts`), and the kernel gets the rest: a whole prompt (nothing cached
    before it) on the step's own K/V with a causal mask, a chunk over a cached
    prefix on its context gathered from the cache with the chunk's mask.
    """

    block_tables: torch.Tensor  # (S, max_blocks) int32, each request's table, padded with block 0
    seqs: torch.Tensor  # (S, 3) int64 rows of (token_start, num_tokens, num_computed); S may be 0
    block_size: int  # positions per table entry (a virtual row's length for the virtual cache)
    prompts: list[PrefillChunk] = field(default_factory=list)
    """The prompts and prompt chunks attended by SDPA."""


@dataclass(frozen=True)
class QueryTiles:
    """The Triton backend's programs along its launch's first axis: a request and a run of its query tokens."""

    tiles: torch.Tensor  # (N, 2) int32: (request index in PagedBatch.seqs, first query token of the tile)
    tokens: int  # query tokens per tile
    max_context: int  # the most positions any request of the step attends to


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) where each new token's K/V is written
    decode: DecodeBatch | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    spans: list[KVSpan] | None = None
    """Set by the contiguous backend instead of `decode` and `prefills`."""
    paged: PagedBatch | None = None
    """Set by the paged backends instead of `decode` and `prefills`."""
    tiles: QueryTiles | None = None
    """Set by the paged_triton backend beside `paged`."""
