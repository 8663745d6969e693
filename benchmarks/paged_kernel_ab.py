"""The paged attention kernel against its source at another revision, in one process.

Separate runs of the same kernel move 10-30% on a shared 2-core VM; a change
worth 5-10% only shows when both kernels run side by side on the same data.
This builds `kvos/attention/csrc/paged_attention.cpp` (and the shared headers)
as they are at `--base` under another operator namespace (`kvos_base`), loads
it beside this checkout's kernel, checks that both give the same output, and
times them in alternating rounds.

Each point is B requests decoding one token over C positions of context,
SmolLM2-135M's heads by default (9 query heads over 3 kv heads of 64), block
size 16, block tables a random permutation of a pool twice the size needed.
One call is timed over `--layers` separate pools, one per layer as in a model
step, so a layer's KV comes from memory and not from the cache the previous
call left warm (one pool of 12 MiB stays in this machine's L3 and reads up to
twice as fast). Reported: the median time per layer of each kernel, base / head
(above 1: head faster), and head's KV read rate as a share of the roofline's
read bandwidth.

Usage: python -m benchmarks.paged_kernel_ab --base REV [--grid 1x256,16x256,64x256,16x1024,64x1024]
       [--dtype bfloat16|float32] [--layers 30] [--rounds 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks.kernel_revision import build_at_revision, time_alternating
from kvos.attention import paged_cpu

KERNEL = "kvos/attention/csrc/paged_attention.cpp"
HEADS = (9, 3, 64)  # SmolLM2-135M: query heads, kv heads, head size


def load_base_kernel(revision: str, folder: Path) -> Callable[..., torch.Tensor]:
    """The kernel source at `revision`, built as torch.ops.kvos_base.paged_attention."""
    build_at_revision(revision, KERNEL, "kvos", folder)
    return torch.ops.kvos_base.paged_attention


def time_point(
    kernels: dict[str, Callable[..., torch.Tensor]],
    batch: int,
    context: int,
    dtype: torch.dtype,
    layers: int,
    rounds: int,
    heads: tuple[int, int, int] = HEADS,
    block_size: int = 16,
) -> dict[str, float]:
    """Median seconds per layer of each kernel, alternating which goes first."""
    num_heads, num_kv_heads, head_dim = heads
    blocks_per_request = -(-context // block_size)
    pool_blocks = 2 * batch * blocks_per_request + 64
    pools = [
        (
            torch.randn(pool_blocks * block_size, num_kv_heads, head_dim).to(dtype),
            torch.randn(pool_blocks * block_size, num_kv_heads, head_dim).to(dtype),
        )
        for _ in range(layers)
    ]
    tables = torch.randperm(pool_blocks)[: batch * blocks_per_request].to(torch.int32).view(batch, -1)
    q = torch.randn(batch, num_heads, head_dim)
    seqs = torch.tensor([[i, 1, context - 1] for i in range(batch)], dtype=torch.long)
    scale = head_dim**-0.5
    outputs = [kernel(q, *pools[0], tables, seqs, block_size, scale) for kernel in kernels.values()]
    # The same attention, not the same bits: both accumulate in float32, but a bfloat16 cache's paths
    # (AVX512-BF16 pairs, AMX tiles) sum the products in different orders.
    tolerance = 1e-5 if dtype == torch.float32 else 1e-3
    for other in outputs[1:]:
        torch.testing.assert_close(other, outputs[0], rtol=tolerance, atol=tolerance)

    def one_call_per_layer(kernel: Callable[..., torch.Tensor]) -> None:
        for k_cache, v_cache in pools:
            kernel(q, k_cache, v_cache, tables, seqs, block_size, scale)

    passes = {name: lambda k=kernel: one_call_per_layer(k) for name, kernel in kernels.items()}
    return {name: seconds / layers for name, seconds in time_alternating(passes, rounds).items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision whose kernel to compare against")
    parser.add_argument("--grid", default="1x256,16x256,64x256,16x1024,64x1024", help="BxC points")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--layers", type=int, default=30, help="separate KV pools per call (SmolLM2-135M: 30)")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from benchmarks.roofline import load_or_measure

    bandwidth = load_or_measure("cpu").read_bandwidth
    paged_cpu.load_kernel()
    dtype = getattr(torch, args.dtype)
    points = []
    with tempfile.TemporaryDirectory() as folder:
        kernels = {"base": load_base_kernel(args.base, Path(folder)), "head": torch.ops.kvos.paged_attention}
        print(
            f"paged_kernel_ab: base {args.base}, {args.dtype}, {args.layers} pools, median of {args.rounds} rounds, "
            f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        for cell in args.grid.split(","):
            batch, context = (int(x) for x in cell.split("x"))
            seconds = time_point(kernels, batch, context, dtype, args.layers, args.rounds)
            kv_bytes = batch * context * HEADS[1] * HEADS[2] * 2 * torch.finfo(dtype).bits // 8
            pct = 100.0 * kv_bytes / seconds["head"] / bandwidth
            ratio = seconds["base"] / seconds["head"]
            base_ms, head_ms = seconds["base"] * 1e3, seconds["head"] * 1e3
            print(
                f"B={batch:<3} C={context:<5} base {base_ms:7.3f} ms  head {head_ms:7.3f} ms"
                f"  base/head {ratio:4.2f}x  head reads KV at {pct:5.1f}% of {bandwidth / 1e9:.1f} GB/s",
                flush=True,
            )
            points.append({"batch": batch, "context": context, **seconds, "base_over_head": ratio, "bw_pct": pct})
    print(f"load after {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"base": args.base, "dtype": args.dtype, "points": points}, indent=2))


if __name__ == "__main__":
    main()
