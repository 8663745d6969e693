"""Paged attention on CPU that reads KV in place: a C++ kernel walks each request's block table.

The gather backend copies every request's context out of the blocks before
attending (about 200 ms of a 480 ms decode step at batch 64); this one hands
the kernel the block tables instead, so each key and value is read once,
where it lies. One call per layer covers the whole batch, decodes and prompt
chunks alike (see `csrc/paged_attention.cpp` for the walk and the online
softmax). It reads the paged cache and the virtual cache alike: a virtual
request's table is one entry, its row, with the row length as block size.

    worker: SeqLayout(block_table, block_size) per request
        -> PagedBatch(block_tables (S, max_blocks) int32, seqs (S, 3) int64, block_size)
    layer:  write the step's K/V at slot_mapping, then torch.ops.kvos.paged_attention

The kernel is compiled on first use for the machine's own instruction set and
cached (`kvos.extensions`). It is registered as a torch operator with a fake
(shape-only) implementation, so torch.compile can trace through it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvos.attention.backend import SeqLayout, slot_mapping
from kvos.attention.gather_sdpa import gather_slots, prefill_chunk, write_kv
from kvos.attention.metadata import AttentionMetadata, PagedBatch
from kvos.extensions import build_cpu_extension, cpu_flags

_SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"

PROMPT_SDPA_MIN_TOKENS = 32
"""On the CPUs `prompts_to_sdpa` names, requests computing at least this many tokens in a step go
to torch's SDPA: whole prompts on the step's own K/V, chunks over a cached prefix on their context."""
_EXTENSION_NAME = "kvos_paged_attention"


class PagedCPUBackend:
    name: ClassVar[str] = "paged"
    needs_contiguous_kv: ClassVar[bool] = False

    def __init__(self) -> None:
        # Built (or loaded from the cache) now, at start-up, so a missing compiler is
        # reported before any request, and so the operator exists before torch.compile traces.
        load_kernel()
        self.sdpa_for_prompts = prompts_to_sdpa(torch.cpu._is_avx512_supported(), cpu_flags())

    def build_metadata(self, seqs: list[SeqLayout], num_tokens: int, device: torch.device) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=slot_mapping(seqs), paged=paged_batch(seqs, device, self.sdpa_for_prompts)
        )

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
        """q: (T, H, D); k, v: (T, KV, D); caches: (num_slots, KV, D), strided views allowed. Returns (T, H, D)."""
        if meta.paged is None:
            raise ValueError("the paged backend needs metadata built by its own build_metadata")
        if torch.compiler.is_compiling():
            write_kv(k_cache, v_cache, meta.slot_mapping, k, v)  # Inductor fuses it into its own loop
        else:
            # One pass, where index_put costs a kernel launch and an index check per tensor.
            torch.ops.kvos.write_kv(k_cache, v_cache, meta.slot_mapping, k, v)
        p = meta.paged
        # The kernel takes float32 queries (small: T x H x D) and accumulates in float32 for any cache dtype.
        if p.seqs.shape[0] > 0:
            out = torch.ops.kvos.paged_attention(
                q.float(), k_cache, v_cache, p.block_tables, p.seqs, p.block_size, scale
            )
        else:
            out = q.new_empty(q.shape, dtype=torch.float32)
        for chunk in p.prompts:
            # In the cache's dtype, as the kernel reads the keys; SDPA's flash kernel is GEMM-tiled,
            # where the kernel's prompt tiles are dot products (BENCHMARKS.md).
            rows = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
            q_p = q[rows].to(k_cache.dtype).transpose(0, 1).unsqueeze(0)
            if chunk.mask is None:  # a whole prompt: its keys are the step's own
                k_p, v_p = (x[rows].to(k_cache.dtype).transpose(0, 1).unsqueeze(0) for x in (k, v))
            else:  # over a cached prefix: its context, this step's keys included, out of the cache
                k_p, v_p = (gather_slots(c, chunk.kv_indices).transpose(0, 1).unsqueeze(0) for c in (k_cache, v_cache))
            o = F.scaled_dot_product_attention(
                q_p,
                k_p,
                v_p,
                attn_mask=chunk.mask,
                is_causal=chunk.mask is None,
                scale=scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )
            out[rows] = o.squeeze(0).transpose(0, 1)
        return out.to(q.dtype)


def prompts_to_sdpa(avx512: bool, flags: frozenset[str]) -> bool:
    """Whether prompts run faster through SDPA's GEMM-tiled flash kernel than through the kernel's tiles.

    Measured per layer (docs/attention.md): without AVX-512 the kernel's generic tiles (one dot product
    per key) ran 3x slower than SDPA on whole prompts. With AVX-512 on an AMD EPYC (no AMX) its tiles
    matched SDPA in float32 and beat it 1.3-2x in bfloat16, and beat a gather and SDPA on a chunk over a
    cached prefix. On an Intel Xeon with AMX, SDPA was 1.3-2x faster in float32 and 1.5-4x in bfloat16
    on whole prompts from about 77 tokens up, and a gather and SDPA 1.5-3.4x faster on bfloat16 chunks of
    32-480 tokens over 32-900 cached (0.50 against 0.43 ms for 100 over 16). So: SDPA without AVX-512,
    or with AMX.
    """
    return not avx512 or "amx_tile" in flags


def paged_batch(seqs: list[SeqLayout], device: torch.device, sdpa_for_prompts: bool) -> PagedBatch:
    """The step's block tables, padded into one int32 tensor, and each request's rows and lengths.

    With `sdpa_for_prompts`, requests computing `PROMPT_SDPA_MIN_TOKENS` or more tokens (whole
    prompts and chunks over a cached prefix) are left out of the tables and listed in `prompts`.
    """
    if not seqs:
        raise ValueError("paged attention needs at least one request in the step")
    block_sizes = {s.block_size for s in seqs}
    if None in block_sizes or any(s.block_table is None for s in seqs):
        raise ValueError("the paged backend needs every SeqLayout's block_table and block_size")
    if len(block_sizes) != 1:
        raise ValueError(f"one step's requests must share a block size, got {sorted(block_sizes)}")  # type: ignore[type-var]
    block_size = int(next(iter(block_sizes)))  # type: ignore[arg-type]
    tables = []
    kernel_seqs = []
    prompts = []
    for i, s in enumerate(seqs):
        assert s.block_table is not None
        needed = -(-(s.num_computed + s.num_tokens) // block_size)
        if s.block_table.numel() < needed:
            raise ValueError(
                f"request {i} has {s.num_computed + s.num_tokens} positions but its block table "
                f"covers {s.block_table.numel()} blocks of {block_size}"
            )
        if sdpa_for_prompts and s.num_tokens >= PROMPT_SDPA_MIN_TOKENS:
            prompts.append(prefill_chunk(s, device))
            continue
        kernel_seqs.append(s)
        table = s.block_table if s.block_table.numel() == needed else s.block_table[:needed]
        tables.append(table.to(torch.int32))
    if tables:
        block_tables = pad_rows(tables)
    else:  # every request is a whole prompt for SDPA
        block_tables = torch.zeros(0, 2, dtype=torch.int32)
    if block_tables.shape[1] < 2:
        # At least two entries: a compiled decode step marks the width dynamic, and a width
        # of 1 would be specialised (a recompile in the middle of serving).
        block_tables = torch.nn.functional.pad(block_tables, (0, 2 - block_tables.shape[1]))
    block_tables = block_tables.to(device)
    rows = torch.tensor(
        [[s.token_start, s.num_tokens, s.num_computed] for s in kernel_seqs], dtype=torch.long, device=device
    ).view(-1, 3)
    return PagedBatch(block_tables=block_tables, seqs=rows, block_size=block_size, prompts=prompts)


def pad_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """1-D tensors of different lengths as the rows of one tensor, zero-padded at the end.

    `pad_sequence` copies row by row (316 us for 256 tables of 4-40 blocks here); one concatenation
    and one indexed write take 130 us, and on a GPU two launches instead of one per row. The indices
    are worked out on the CPU, so a GPU is never waited for.
    """
    lengths = [row.numel() for row in rows]
    width = max(lengths)
    if min(lengths) == width:
        return torch.stack(rows)
    counts = torch.tensor(lengths)
    starts = torch.cumsum(counts, 0) - counts
    # An element's place in the padded rows: its row's start there, plus its offset within its row.
    row_ids = torch.repeat_interleave(torch.arange(len(rows)), counts)
    offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(starts, counts)
    out = torch.zeros(len(rows) * width, dtype=rows[0].dtype, device=rows[0].device)
    out[(row_ids * width + offsets).to(out.device)] = torch.cat(rows)
    return out.view(len(rows), width)


@functools.cache
def load_kernel() -> None:
    """Compile (first use on this machine) and load the kernel: torch.ops.kvos.paged_attention and write_kv."""
    build_cpu_extension(_EXTENSION_NAME, _SOURCE, "attention_backend='paged'")

    @torch.library.register_fake("kvos::paged_attention")
    def _(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seqs: torch.Tensor,
        block_size: int,
        scale: float,
    ) -> torch.Tensor:
        return q.new_empty(q.shape, dtype=torch.float32)
