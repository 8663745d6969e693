"""Paged attention for GPUs: a Triton kernel that reads each request's KV through its block table.

The GPU counterpart of `paged_cpu`: one launch per layer covers the whole
batch (decodes, whole prompts and prompt chunks over a cached prefix), reads
keys and values where they lie in the pool (no gather copy), masks causally
within a chunk, and maps grouped query heads (GQA) onto their kv head. It
reads the virtual cache too: a virtual request's table is one entry, its row,
with the row length as block size.

    build_metadata: PagedBatch (block tables, (token_start, num_tokens, num_computed) per request)
                    + QueryTiles: (request, first token) per program, `tokens` query tokens each
    forward:        write the step's K/V at slot_mapping, then one launch over (tile, kv head)

A program takes up to `tokens` query tokens of one request and every query
head of one kv head as the rows of its tile (token-major: row r is token
r // group, head r % group), walks the request's positions up to its last
row's in steps of `BLOCK_N` with an online softmax (FlashAttention's), and
accumulates in float32. A decode-only step uses one token per tile (the
rows are the group's heads), other steps 16. When that leaves the GPU's
multiprocessors idle (few programs, contexts past `PARTITION`: a handful of
long decodes), each context is split into runs of `PARTITION` positions,
one program each, and a second launch merges their partial results
(flash-decoding); `num_splits` decides.

On a machine without a GPU the kernel runs under Triton's interpreter
(`TRITON_INTERPRET=1`, numpy on the CPU, set before Triton is first
imported): slow, but the same program, which is how the tests check it
against a naive softmax(QK^T)V and HF's tokens (tests/conftest.py sets it
where there is no GPU).
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, ClassVar

import torch

from kvos.attention.backend import SeqLayout, slot_mapping
from kvos.attention.gather_sdpa import write_kv
from kvos.attention.metadata import AttentionMetadata, QueryTiles
from kvos.attention.paged_cpu import paged_batch

PROMPT_TILE_TOKENS = 16
"""Query tokens per program when the step has prompt tokens (a decode's tile holds its one token)."""
BLOCK_N = 32
"""Positions per step of a program's walk over its request's KV."""
PARTITION = 512
"""Positions per program when a launch splits contexts (`num_splits`); a multiple of BLOCK_N."""


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (on the CPU) instead of compiling them for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class PagedTritonBackend:
    name: ClassVar[str] = "paged_triton"
    needs_contiguous_kv: ClassVar[bool] = False

    def __init__(self) -> None:
        # At start-up, so a missing Triton is reported (and "auto" falls back) before any request.
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise ValueError("attention_backend='paged_triton' needs the triton package") from exc

    def build_metadata(self, seqs: list[SeqLayout], num_tokens: int, device: torch.device) -> AttentionMetadata:
        paged = paged_batch(seqs, device, sdpa_for_prompts=False)
        return AttentionMetadata(slot_mapping=slot_mapping(seqs), paged=paged, tiles=query_tiles(seqs, device))

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
        """q: (T, H, D); k, v: (T, KV, D); caches: (num_slots, KV, D), last dim contiguous. Returns (T, H, D)."""
        if meta.paged is None or meta.tiles is None:
            raise ValueError("the paged_triton backend needs metadata built by its own build_metadata")
        if q.device.type != "cuda" and not interpreted():
            raise ValueError(
                f"attention_backend='paged_triton' runs on a CUDA device (or under TRITON_INTERPRET=1), "
                f"got tensors on {q.device}"
            )
        write_kv(k_cache, v_cache, meta.slot_mapping, k, v)
        return paged_attention(q, k_cache, v_cache, meta, scale)


def query_tiles(seqs: list[SeqLayout], device: torch.device) -> QueryTiles:
    """One tile per `tokens` query tokens of each request, in the order of `paged_batch`'s rows."""
    tokens = 1 if all(s.num_tokens == 1 for s in seqs) else PROMPT_TILE_TOKENS
    tiles = [(i, first) for i, s in enumerate(seqs) for first in range(0, s.num_tokens, tokens)]
    max_context = max((s.num_computed + s.num_tokens for s in seqs), default=0)
    return QueryTiles(torch.tensor(tiles, dtype=torch.int32, device=device).view(-1, 2), tokens, max_context)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    partition: int | None = None,
    block_n: int = BLOCK_N,
) -> torch.Tensor:
    """Attention of every query row over its request's cached context (the step's K/V already written).

    `partition` splits each context into runs of that many positions, one program each, merged by a
    second launch (flash-decoding); None lets `num_splits` decide (`PARTITION` where the launch would
    leave the GPU's multiprocessors idle). `block_n` is the positions per key step (a power of two, at
    least 16), for the GPU check that times other sizes than the default.
    """
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two of at least 16, got {block_n}")
    assert meta.paged is not None and meta.tiles is not None
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group evenly over {num_kv_heads} kv heads")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the paged_triton kernel needs each cached head's dims contiguous")
    group = num_heads // num_kv_heads
    tiles = meta.tiles
    dtype = q.dtype
    q = q.to(k_cache.dtype).contiguous()
    out = torch.empty_like(q)
    num_tiles = tiles.tiles.shape[0]
    if num_tiles == 0:
        return out.to(dtype)
    # tl.dot takes tiles of at least 16 along each side; float32 runs in full precision (not TF32),
    # so float32 steps keep HF's greedy tokens.
    block_m = max(16, next_power_of_2(tiles.tokens * group))
    block_d = max(16, next_power_of_2(head_dim))
    table = meta.paged.block_tables
    if partition is None:
        partition = PARTITION
        splits = num_splits(num_tiles * num_kv_heads, tiles.max_context, q.device)
    else:
        if partition < block_n or partition % block_n:
            raise ValueError(f"partition must be a positive multiple of {block_n}, got {partition}")
        splits = -(-tiles.max_context // partition)
    split = splits > 1
    # Scratch for the partitions (one float32 row per query row, and its max and sum); unused without.
    part = torch.empty((num_tiles * num_kv_heads * splits * block_m, block_d) if split else (1,), device=q.device)
    ml = torch.empty((num_tiles * num_kv_heads * splits * block_m, 2) if split else (1,), device=q.device)
    kernel, merge = _kernels()
    kernel[(num_tiles, num_kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        out,
        part,
        ml,
        table,
        meta.paged.seqs,
        tiles.tiles,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        table.stride(0),
        meta.paged.block_size,
        min(k_cache.shape[0], v_cache.shape[0]),
        GROUP=group,
        ROWS=tiles.tokens * group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        # Triton 3.9's interpreter multiplies bfloat16 tiles as raw integers; it gets float32 tiles.
        DOT_DTYPE=_dot_dtypes()[torch.float32 if interpreted() else k_cache.dtype],
        PARTITION=partition,
        SPLIT=split,
    )
    if split:
        merge[(num_tiles, num_kv_heads)](
            out,
            part,
            ml,
            meta.paged.seqs,
            tiles.tiles,
            splits,
            q.stride(0),
            q.stride(1),
            GROUP=group,
            ROWS=tiles.tokens * group,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_M=block_m,
        )
    return out.to(dtype)


def num_splits(num_programs: int, max_context: int, device: torch.device) -> int:
    """Partitions per context: one, unless the launch has fewer programs than twice the GPU's
    multiprocessors and a context longer than `PARTITION` (a few long decodes), then enough to cover it."""
    if max_context <= PARTITION or device.type != "cuda":
        return 1
    if num_programs >= 2 * torch.cuda.get_device_properties(device).multi_processor_count:
        return 1
    return -(-max_context // PARTITION)


@functools.cache
def _dot_dtypes() -> dict[torch.dtype, Any]:
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (Triton's block sizes; 1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """The jitted kernels, imported on first use (so importing kvos never imports Triton)."""
    module = importlib.import_module("kvos.attention.paged_triton_kernel")
    return module.paged_attention_kernel, module.merge_kernel
