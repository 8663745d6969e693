"""Decode steps replayed from CUDA graphs: on a GPU, what `model.compiled_decode` is on a CPU.

An eager decode step launches every kernel of every layer from Python, about
fifteen per layer. At batch 1 the GPU waits on those launches: a
Llama-3-8B-shaped model decoded 61.6 tokens/s on an H200 whose memory
bandwidth allows 274 (BENCHMARKS.md). A CUDA graph records one step's
launches once, and one call replays them all.

A graph replays fixed shapes at fixed addresses, so:

- Batch sizes come in buckets (`graph_batch_sizes`). A step is padded up to
  its bucket with copies of its last request. A copy writes that request's
  K/V to the same slot with the same values (the same input row through the
  same matmuls), reads the same context, and its output row is dropped. No
  slot has to be set aside for padding.
- The step's inputs are copied into buffers the graph reads: token ids,
  positions, slots, each request's number of cached positions and its block
  table (as wide as the longest context the engine allows). A decode step's
  kernel tiles are (request i, token 0) for every row, so they are fixed per
  bucket.
- The Triton kernel's partition count (`paged_triton.num_splits`: how many
  programs share a long context when the batch is too small to fill the
  GPU) is part of the launch. Small buckets get a graph per power of two of
  partitions, up to what the longest context the engine allows needs; a step
  replays the one with the fewest that covers its longest context. A
  partition past a request's context stores an empty result that the merge
  weighs at zero.

The graphs are captured at start-up, largest bucket first, sharing one
memory pool, and only for the Triton kernel on the paged cache: the
capture's warm-up step writes slot 0, which the virtual cache has not
mapped. Prompt steps run eagerly, as does any step the graphs do not cover.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from kvos.attention import paged_triton
from kvos.attention.metadata import AttentionMetadata, PagedBatch, QueryTiles
from kvos.model.llama import KVCaches, LlamaForCausalLM

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE as Pool
else:
    Pool = object

Replay = Callable[[], torch.Tensor]
"""Runs the captured step again on the current buffer contents; returns its (bucket, hidden) output."""
Capture = Callable[[Callable[[], torch.Tensor], Pool | None], tuple[Replay, Pool | None]]
"""Records a step (and runs it once first) into the pool; hands back its replay and the pool."""


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to and including `max_num_seqs` (vLLM's buckets)."""
    sizes = {b for b in (1, 2, 4, 8) if b <= max_num_seqs}
    sizes.update(range(16, max_num_seqs + 1, 16))
    sizes.add(max_num_seqs)
    return sorted(sizes)


def capture(forward: Callable[[], torch.Tensor], pool: Pool | None) -> tuple[Replay, Pool | None]:
    """Run `forward` once (Triton compiles, cuBLAS picks its kernels), then record it into a graph."""
    forward()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = forward()

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return replay, graph.pool()


class DecodeGraphs:
    """One captured decode step per (batch bucket, partition count), and the buffers they read."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: KVCaches,
        block_size: int,
        max_model_len: int,
        batch_sizes: Sequence[int],
        device: torch.device,
    ) -> None:
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"batch sizes must be positive, got {list(batch_sizes)}")
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.num_kv_heads = model.arch.num_key_value_heads
        self.batch_sizes = sorted(batch_sizes)
        largest = self.batch_sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.splits = {size: _split_counts(self._num_splits(size, max_model_len)) for size in self.batch_sizes}
        """The partition counts captured per bucket: 1 where the bucket fills the GPU, else 1, 2, 4, ..."""
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slots = torch.zeros(largest, dtype=torch.long, device=device)
        self.tables = torch.zeros(largest, self.max_blocks, dtype=torch.int32, device=device)
        rows = torch.arange(largest, device=device)
        # (token_start, num_tokens, num_computed) per request: row i, one token; the last column is the step's.
        self.seqs = torch.stack([rows, torch.ones_like(rows), torch.zeros_like(rows)], dim=1)
        self.tiles = torch.stack([rows, torch.zeros_like(rows)], dim=1).to(torch.int32)
        self._replays: dict[tuple[int, int], Replay] = {}

    def capture_all(self, capture_one: Capture = capture) -> None:
        """Capture every (bucket, partition count), largest first, into one pool (replays never overlap).

        `capture_one` records a step; the tests pass one that runs it eagerly instead (no GPU there)."""
        start = time.monotonic()
        pool = None
        with torch.inference_mode():
            for size in reversed(self.batch_sizes):
                for splits in reversed(self.splits[size]):
                    meta = self._metadata(size, splits)

                    def forward(size: int = size, meta: AttentionMetadata = meta) -> torch.Tensor:
                        return self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, meta)

                    self._replays[size, splits], pool = capture_one(forward, pool)
        logger.info("decode steps captured as %d CUDA graphs in %.1fs", len(self._replays), time.monotonic() - start)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """The step's hidden states (T, hidden) from its bucket's graph; None when no graph covers it."""
        num_seqs = input_ids.shape[0]
        size = next((b for b in self.batch_sizes if b >= num_seqs), None)
        paged, tiles = meta.paged, meta.tiles
        if size is None or paged is None or tiles is None or paged.prompts or paged.block_size != self.block_size:
            return None
        width = paged.block_tables.shape[1]
        needed = self._num_splits(size, tiles.max_context)
        splits = next((s for s in self.splits[size] if s >= needed), None)
        if width > self.max_blocks or splits is None:
            return None
        self._fill(self.input_ids, input_ids, size)
        self._fill(self.positions, positions, size)
        self._fill(self.slots, meta.slot_mapping, size)
        self._fill(self.seqs[:, 2], paged.seqs[:, 2], size)
        self._fill(self.tables[:, :width], paged.block_tables, size)
        return self._replays[size, splits]()[:num_seqs]

    def _num_splits(self, size: int, max_context: int) -> int:
        return paged_triton.num_splits(size * self.num_kv_heads, max_context, self.device)

    @staticmethod
    def _fill(buffer: torch.Tensor, values: torch.Tensor, size: int) -> None:
        """`values` into the buffer's first rows; the rest of the bucket repeats the last of them."""
        n = values.shape[0]
        buffer[:n].copy_(values)
        if size > n:
            buffer[n:size].copy_(values[n - 1 :].expand(size - n, *values.shape[1:]))

    def _metadata(self, size: int, splits: int) -> AttentionMetadata:
        # A longest context of `splits` partitions makes the kernel launch that many (one: no split).
        tiles = QueryTiles(self.tiles[:size], tokens=1, max_context=splits * paged_triton.PARTITION)
        paged = PagedBatch(block_tables=self.tables[:size], seqs=self.seqs[:size], block_size=self.block_size)
        return AttentionMetadata(slot_mapping=self.slots[:size], paged=paged, tiles=tiles)


def _split_counts(most: int) -> list[int]:
    """1, 2, 4, ... up to and including `most`."""
    counts = [1]
    while counts[-1] < most:
        counts.append(min(2 * counts[-1], most))
    return counts
