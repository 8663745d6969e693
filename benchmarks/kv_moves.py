"""Host-tier KV moves on CPU: kvos's `copy_blocks` kernel against torch copies, block by block.

The host tier moves scattered blocks: write-backs of cached blocks the pool
reuses, prefix hits brought back, swaps. Each move is a run of blocks in
every layer's K and V. Two ways to do it, both on a second thread as the
worker's copy thread runs them, over the same random (source, destination)
block pairs of SmolLM2-135M's KV (30 layers, 3 KV heads of 64, bfloat16,
blocks of 16 tokens; --layers etc. for other shapes):

- torch: two `copy_` calls per layer per block (what `HostKVPool` did);
- kernel: one `torch.ops.kvos.copy_blocks` call for every block and layer.

Reported per block count: the median time of --iters calls, the rate
(bytes moved / time) and that rate as a percentage of the machine's read
bandwidth (`benchmarks.roofline`, cached; a copy reads and writes each byte,
so 50% is the most a memory-bound copy reaches), and kernel / torch.

Do not trust timings from a machine that is running anything else.

Usage: python -m benchmarks.kv_moves [--blocks 1,4,16,64] [--iters 9] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.roofline import load_or_measure
from kvos.worker.kv_copy import copy_blocks

Pairs = list[tuple[int, int]]


def by_torch(src: list[torch.Tensor], dst: list[torch.Tensor], pairs: Pairs, block_size: int) -> None:
    for first, target in pairs:
        source = slice(first * block_size, (first + 1) * block_size)
        destination = slice(target * block_size, (target + 1) * block_size)
        for s, d in zip(src, dst):
            d[destination].copy_(s[source])


def by_kernel(src: list[torch.Tensor], dst: list[torch.Tensor], pairs: Pairs, block_size: int) -> None:
    copy_blocks(src, dst, [(first, target, 1) for first, target in pairs], block_size)


def median_ms(move: Callable[[], None], iters: int) -> float:
    """Median of `iters` calls on a fresh thread (after one untimed call), in ms."""
    times: list[float] = []

    def run() -> None:
        move()
        for _ in range(iters):
            start = time.perf_counter()
            move()
            times.append(time.perf_counter() - start)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default="1,4,16,64", help="comma-separated blocks per move")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--pool-blocks", type=int, default=2048, help="blocks in each side's tensors")
    parser.add_argument("--iters", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    counts = [int(b) for b in args.blocks.split(",")]
    if any(not 1 <= b <= args.pool_blocks for b in counts):
        parser.error(f"--blocks must lie in 1..{args.pool_blocks}, got {args.blocks}")

    shape = (args.pool_blocks * args.block_size, args.kv_heads, args.head_dim)
    src = [torch.randn(shape).to(torch.bfloat16) for _ in range(2 * args.layers)]
    dst = [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(2 * args.layers)]
    bandwidth = load_or_measure("cpu").read_bandwidth
    bytes_per_block = 2 * args.layers * args.block_size * args.kv_heads * args.head_dim * 2
    rng = random.Random(args.seed)
    rows = []
    header = ("blocks", "MB", "torch ms", "kernel ms", "kernel GB/s", "% of read bw", "ratio")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (6, 6, 9, 10, 12, 13, 6))))
    for n in counts:
        pairs = list(zip(rng.sample(range(args.pool_blocks), n), rng.sample(range(args.pool_blocks), n)))
        torch_ms, kernel_ms = (
            median_ms(functools.partial(move, src, dst, pairs, args.block_size), args.iters)
            for move in (by_torch, by_kernel)
        )
        moved = n * bytes_per_block
        rate = moved / (kernel_ms / 1000)
        row = {"blocks": n, "bytes": moved, "torch_ms": torch_ms, "kernel_ms": kernel_ms, "kernel_bytes_per_s": rate}
        rows.append(row)
        print(
            f"{n:>6} {moved / 1e6:>6.1f} {torch_ms:>9.2f} {kernel_ms:>10.2f} {rate / 1e9:>12.2f} "
            f"{100 * rate / bandwidth:>12.1f}% {torch_ms / kernel_ms:>5.1f}x"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"read_bandwidth": bandwidth, "args": vars(args), "rows": rows}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
