"""kvos's linear kernels against their source at another revision, in one process.

The kernels: `bf16`, the bfloat16 linears on AMX (`amx_linear.cpp`); `int4`, int4's batches on AMX
(`int4_linear_amx`); `int4_vnni`, int4's integer kernel (`int4_linear`, up to 12 rows in the engine).
The two AMX ones multiply on the same tile GEMM (`kvos/csrc/amx_gemm.h`). This builds
`amx_linear.cpp` and `int4_linear.cpp` as they are at `--base` (with that revision's headers) under
the `_base` libraries (`benchmarks/kernel_revision.py`), checks that both revisions give the same
output bit for bit, and times one forward pass of SmolLM2-135M's linears (30 layers, each with its own
random weights, so weights come from memory as in a step) per revision, alternating which goes
first, at each row count. Reported: the median per pass, base / head (above 1: head faster), and
head's rate as a share of the bfloat16 GEMM peak that `benchmarks.roofline` measured.

Usage: python -m benchmarks.linear_kernels_ab --base REV [--rows 1,16,32,64,128,256]
       [--kernels bf16,int4,int4_vnni] [--rounds 16] [--json out.json]
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
from kvos.model import amx_linear, int4_kernel

# SmolLM2-135M's linears without the LM head: (in_features, out_features) per layer.
LINEARS = ((576, 960), (576, 576), (576, 3072), (1536, 576))
LAYERS = 30

Op = Callable[[torch.Tensor], torch.Tensor]


def bf16_layers(generator: torch.Generator) -> list[tuple[int, dict[str, Op]]]:
    layers = []
    for _ in range(LAYERS):
        for in_features, out_features in LINEARS:
            packed = amx_linear.pack((torch.randn(out_features, in_features, generator=generator) * 0.02).bfloat16())
            ops: dict[str, Op] = {
                "base": lambda x, p=packed: torch.ops.kvos_amx_base.linear(x, p),
                "head": lambda x, p=packed: torch.ops.kvos_amx.linear(x, p),
            }
            layers.append((in_features, ops))
    return layers


def int4_layers(generator: torch.Generator, op: str) -> list[tuple[int, dict[str, Op]]]:
    """int4 weights multiplied by `op`: int4_linear_amx or int4_linear."""
    layers = []
    for _ in range(LAYERS):
        for in_features, out_features in LINEARS:
            groups = in_features // int4_kernel.GROUP_SIZE
            codes = torch.randint(0, 16, (out_features, in_features), generator=generator)
            scale = torch.rand(out_features, groups, generator=generator) * 0.01
            packed = int4_kernel.pack(codes, scale, -8 * scale)
            ops: dict[str, Op] = {
                "base": lambda x, p=packed, n=out_features: getattr(torch.ops.kvos_base, op)(x, p, n),
                "head": lambda x, p=packed, n=out_features: getattr(torch.ops.kvos, op)(x, p, n),
            }
            layers.append((in_features, ops))
    return layers


def time_rows(layers: list[tuple[int, dict[str, Op]]], rows: int, rounds: int, generator: torch.Generator) -> dict:
    """Median seconds of one pass over `layers` at `rows` rows, per revision."""
    inputs = {k: torch.randn(rows, k, generator=generator).bfloat16() for k in {k for k, _ in layers}}
    for in_features, ops in layers[:4]:
        torch.testing.assert_close(ops["head"](inputs[in_features]), ops["base"](inputs[in_features]), rtol=0, atol=0)

    def one_pass(name: str) -> None:
        for in_features, ops in layers:
            ops[name](inputs[in_features])

    with torch.inference_mode():
        return time_alternating({name: lambda n=name: one_pass(n) for name in ("base", "head")}, rounds, warmup=1)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision whose kernels to compare against")
    parser.add_argument("--rows", default="1,16,32,64,128,256")
    parser.add_argument("--kernels", default="bf16,int4,int4_vnni", help="a subset of bf16,int4,int4_vnni")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    kernels = args.kernels.split(",")
    if {"bf16", "int4"} & set(kernels) and not amx_linear.supported():
        parser.error("this CPU (or this process) has no AMX tile unit: pass --kernels int4_vnni")

    from benchmarks.roofline import load_or_measure

    peak = load_or_measure("cpu", dtype="bfloat16").peak_flops
    amx_linear.load()
    int4_kernel.load()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        if "bf16" in kernels:
            build_at_revision(args.base, "kvos/model/csrc/amx_linear.cpp", "kvos_amx", Path(folder) / "bf16")
        if "int4" in kernels or "int4_vnni" in kernels:
            build_at_revision(args.base, "kvos/model/csrc/int4_linear.cpp", "kvos", Path(folder) / "int4")
        print(
            f"linear_kernels_ab: base {args.base}, SmolLM2's linears x {LAYERS} layers, "
            f"median of {args.rounds} rounds, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        generator = torch.Generator().manual_seed(0)
        flops_per_row = 2 * LAYERS * sum(i * o for i, o in LINEARS)
        for kernel in kernels:
            if kernel == "bf16":
                layers = bf16_layers(generator)
            else:
                layers = int4_layers(generator, "int4_linear_amx" if kernel == "int4" else "int4_linear")
            for rows in (int(r) for r in args.rows.split(",")):
                seconds = time_rows(layers, rows, args.rounds, generator)
                ratio = seconds["base"] / seconds["head"]
                pct = 100.0 * flops_per_row * rows / seconds["head"] / peak
                print(
                    f"{kernel:<9} rows {rows:<4} base {seconds['base'] * 1e3:8.2f} ms"
                    f"  head {seconds['head'] * 1e3:8.2f} ms"
                    f"  base/head {ratio:4.2f}x  head at {pct:5.1f}% of {peak / 1e12:.2f} TFLOP/s",
                    flush=True,
                )
                results.append({"kernel": kernel, "rows": rows, **seconds, "base_over_head": ratio, "peak_pct": pct})
    print(f"load after {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"base": args.base, "points": results}, indent=2))


if __name__ == "__main__":
    main()
