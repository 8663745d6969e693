"""One layer's decode attention, backend against backend, on the same KV.

For each batch size B and context C, B requests each decode one token over a
context of C positions (the step's own K/V included). Every backend gets the
same numbers in its own layout:

- gather_sdpa and paged: a paged pool (block size 16 by default) whose block
  tables are a random permutation, as after a while of serving;
- contiguous: each request's KV in one row of a virtual-cache-like pool
  (`row * row_tokens + position`), the layout that backend needs.

Timed: `backend.forward` (writing the step's K/V, then attention), the median
of `--iters` calls after warm-up; metadata is built once outside the timing,
as the worker builds it once per step for every layer. Reported: time per
call, each backend's ratio to the paged kernel, and the KV read rate as a
percentage of the machine's read bandwidth from `benchmarks.roofline`
(cached in ~/.cache/kvos; bytes = B x C x kv_heads x head_dim x 2 x element size,
the least any kernel must read).

FlexAttention: torch 2.13 runs `flex_attention` on CPU only compiled (Inductor's
CPU template), and it reads a paged pool through a BlockMask converted from
logical to physical blocks (`torch.nn.attention.experimental._paged_attention`,
a private API). The `flex` column is that variant: the pool is viewed as one
long sequence, each request's block table becomes its page table, and one
compiled call per shape covers the batch. Its output is checked against the
paged kernel's before it is timed. It compiles once per grid point (tens of
seconds each); `--no-flex` skips it.

Do not trust timings from a machine that is running anything else.

Usage: python -m benchmarks.attention_kernels [--batches 1,8,64] [--contexts 256,1024,4096]
       [--dtype float32|bfloat16] [--block-size 16] [--heads 9 --kv-heads 3 --head-dim 64]
       [--iters 20] [--threads N] [--no-flex] [--smoke] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from kvos.attention.backend import SeqLayout, make_backend
from kvos.attention.metadata import AttentionMetadata

BACKENDS = ("gather_sdpa", "contiguous", "paged")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int


@dataclass
class Point:
    batch: int
    context: int
    seconds: dict[str, float]
    kv_bytes: int
    bandwidth_pct: dict[str, float]


@dataclass
class Step:
    """One decode step's inputs, in the paged layout and the contiguous (row) layout."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    paged_cache: tuple[torch.Tensor, torch.Tensor]
    paged_seqs: list[SeqLayout]
    row_cache: tuple[torch.Tensor, torch.Tensor]
    row_seqs: list[SeqLayout]


def make_step(batch: int, context: int, shape: Shape, generator: torch.Generator) -> Step:
    """B requests at position context - 1, the same K/V values in both layouts."""
    bs, kv, d = shape.block_size, shape.num_kv_heads, shape.head_dim
    blocks_per_seq = -(-context // bs)
    num_blocks = batch * blocks_per_seq
    order = torch.randperm(num_blocks, generator=generator)
    keys = torch.randn(batch, context, kv, d, generator=generator).to(shape.dtype)
    values = torch.randn(batch, context, kv, d, generator=generator).to(shape.dtype)

    k_paged = torch.zeros(num_blocks * bs, kv, d, dtype=shape.dtype)
    v_paged = torch.zeros_like(k_paged)
    row_tokens = blocks_per_seq * bs
    k_rows = torch.zeros(batch * row_tokens, kv, d, dtype=shape.dtype)
    v_rows = torch.zeros_like(k_rows)
    paged_seqs, row_seqs = [], []
    for b in range(batch):
        table = order[b * blocks_per_seq : (b + 1) * blocks_per_seq].to(torch.int32)
        slots = (table[:, None].long() * bs + torch.arange(bs)).flatten()[:context]
        k_paged[slots], v_paged[slots] = keys[b], values[b]
        paged_seqs.append(SeqLayout(b, 1, context - 1, slots, table, bs))
        row = torch.arange(b * row_tokens, b * row_tokens + context)
        k_rows[row], v_rows[row] = keys[b], values[b]
        row_seqs.append(SeqLayout(b, 1, context - 1, row, torch.tensor([b], dtype=torch.int32), row_tokens))
    return Step(
        q=torch.randn(batch, shape.num_heads, d, generator=generator).to(shape.dtype),
        k=keys[:, -1].clone(),
        v=values[:, -1].clone(),
        paged_cache=(k_paged, v_paged),
        paged_seqs=paged_seqs,
        row_cache=(k_rows, v_rows),
        row_seqs=row_seqs,
    )


def backend_call(name: str, step: Step, scale: float) -> Callable[[], torch.Tensor]:
    backend = make_backend(name)
    seqs, (k_cache, v_cache) = (
        (step.row_seqs, step.row_cache) if backend.needs_contiguous_kv else (step.paged_seqs, step.paged_cache)
    )
    meta: AttentionMetadata = backend.build_metadata(seqs, len(seqs), torch.device("cpu"))
    return lambda: backend.forward(step.q, step.k, step.v, k_cache, v_cache, meta, scale)


def flex_call(step: Step, shape: Shape, scale: float) -> Callable[[], torch.Tensor]:
    """FlexAttention over the paged pool, compiled for this shape; the pool read in place through page tables."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch = len(step.paged_seqs)
    bs = shape.block_size
    k_cache, v_cache = step.paged_cache
    num_pages = k_cache.shape[0] // bs
    context = step.paged_seqs[0].num_computed + 1
    logical_len = -(-context // bs) * bs

    pages = PagedAttention(num_pages, bs, batch, device="cpu")
    for b, seq in enumerate(step.paged_seqs):
        assert seq.block_table is not None
        table = seq.block_table.long()
        pages.page_table[b, : table.numel()] = table
        pages.physical_to_logical[b, table] = torch.arange(table.numel())
        pages.capacity[b] = table.numel() * bs
    lengths = torch.full((batch,), context)

    def visible(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return kv_idx < lengths[b]

    logical = create_block_mask(visible, batch, None, 1, logical_len, device="cpu", BLOCK_SIZE=(1, bs))
    block_mask = pages.convert_logical_block_mask(logical)
    # The pool as one sequence per request: (1, KV, num_slots, D) views, expanded over the batch.
    k_pool = k_cache.permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
    v_pool = v_cache.permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
    compiled = torch.compile(flex_attention, dynamic=False)
    slots = torch.stack([s.context_slots[-1] for s in step.paged_seqs])

    def run() -> torch.Tensor:
        k_cache[slots] = step.k
        v_cache[slots] = step.v
        out = compiled(step.q.unsqueeze(2), k_pool, v_pool, block_mask=block_mask, scale=scale, enable_gqa=True)
        return out.squeeze(2)

    return run


def median_seconds(run: Callable[[], object], iters: int) -> float:
    for _ in range(2):
        run()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(smoke: bool) -> float:
    """Bytes/s the machine reads: the roofline's cached measurement, or a tiny rough one for --smoke."""
    if smoke:
        big = torch.ones(1 << 22)
        seconds = median_seconds(big.sum, 5)
        return big.numel() * big.element_size() / seconds
    from benchmarks.roofline import load_or_measure

    return load_or_measure("cpu").read_bandwidth


def run_grid(
    batches: Sequence[int], contexts: Sequence[int], shape: Shape, iters: int, flex: bool, bandwidth: float
) -> list[Point]:
    scale = shape.head_dim**-0.5
    generator = torch.Generator().manual_seed(0)
    points = []
    for context in contexts:
        for batch in batches:
            step = make_step(batch, context, shape, generator)
            calls = {name: backend_call(name, step, scale) for name in BACKENDS}
            if flex:
                # Each grid point compiles its own graph; dynamo's per-function recompile limit (8)
                # would otherwise send the ninth point to the unfused fallback, which materialises
                # every score and runs out of memory at B=64 x C=4096.
                torch._dynamo.reset()
                calls["flex"] = flex_call(step, shape, scale)
                want = calls["paged"]().float()
                error = (calls["flex"]().float() - want).abs().max().item()
                if error > (1e-3 if shape.dtype == torch.float32 else 5e-2):
                    raise RuntimeError(f"flex differs from the paged kernel by {error} at B={batch} C={context}")
            seconds = {name: median_seconds(call, iters) for name, call in calls.items()}
            kv_bytes = batch * context * shape.num_kv_heads * shape.head_dim * 2 * shape.dtype.itemsize
            pct = {name: 100.0 * kv_bytes / s / bandwidth for name, s in seconds.items()}
            points.append(Point(batch, context, seconds, kv_bytes, pct))
            print(format_point(points[-1]), flush=True)
    return points


def format_point(p: Point) -> str:
    paged = p.seconds["paged"]
    cells = [f"B={p.batch:<3d} C={p.context:<5d} KV {p.kv_bytes / 2**20:8.1f} MiB"]
    for name, s in p.seconds.items():
        cells.append(f"{name} {s * 1e3:8.3f} ms (time {s / paged:5.2f}x paged, {p.bandwidth_pct[name]:5.1f}% bw)")
    return " | ".join(cells)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--contexts", default="256,1024,4096")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--heads", type=int, default=9, help="query heads (SmolLM2-135M: 9)")
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-flex", action="store_true", help="skip the compiled FlexAttention variant")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--json", default=None, help="write the points here")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    iters = args.iters
    if args.smoke:
        batches, contexts, iters = [1, 3], [40], 2
    if args.heads % args.kv_heads:
        raise ValueError(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    shape = Shape(args.heads, args.kv_heads, args.head_dim, _DTYPES[args.dtype], args.block_size)
    bandwidth = read_bandwidth(args.smoke)
    print(
        f"attention_kernels: torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
        f"heads {shape.num_heads}/{shape.num_kv_heads} x {shape.head_dim}, block {shape.block_size}, "
        f"read bandwidth {bandwidth / 1e9:.1f} GB/s, median of {iters}"
    )
    with torch.inference_mode():
        points = run_grid(batches, contexts, shape, iters, not args.no_flex, bandwidth)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([asdict(p) for p in points], f, indent=2)


if __name__ == "__main__":
    main()
