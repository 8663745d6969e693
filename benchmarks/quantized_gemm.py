"""Quantized linears against a bfloat16 GEMM on their dequantized weight, by batch rows.

PyTorch's int8/int4 kernels were measured slower than a bfloat16 GEMM above
a few rows, so `kvos.model.quantization` keeps a bfloat16 copy of each weight
for batches above `max_quantized_rows` (12 rows for int4, 8 for int8), at 2
bytes per parameter of resident memory; on AVX512-VNNI CPUs kvos's own int4
kernel replaces PyTorch's, and the copy goes if that kernel keeps up at every
batch size. This times, for SmolLM2-135M's projection shapes (fused q|k|v, o,
fused gate|up, down, the LM head) and each row count M: the quantized kernel
(`quantized_matmul`: kvos's on VNNI CPUs for int4), the bfloat16 GEMM on the
dequantized weight as `F.linear`, with the weight prepacked for oneDNN, and on
kvos's AMX kernel where the CPU has AMX (kvos runs unquantized bfloat16 models
on the last, else the one before), and a float32 GEMM, each the median of
`--iters` calls, summed over one layer's four projections (times the layer
count) plus the LM head, the work of one forward pass.

Usage: python -m benchmarks.quantized_gemm [--rows 1,8,12,16,32,64,256,512] [--method int4] [--iters 20]
                                           [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kvos.model import amx_linear, int4_kernel
from kvos.model.prepack import PrepackedLinear
from kvos.model.quantization import _FORMATS, QuantizedLinear

# (in_features, out_features, count per forward pass) of SmolLM2-135M-Instruct.
SMOLLM2_LINEARS = (
    (576, 960, 30),  # q|k|v fused
    (576, 576, 30),  # o
    (576, 3072, 30),  # gate|up fused
    (1536, 576, 30),  # down
    (576, 49152, 1),  # LM head
)


def median_seconds(fn: Callable[[], torch.Tensor], iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_rows(method: str, rows: int, iters: int) -> dict[str, float]:
    """Seconds of one forward pass's linears at `rows` rows, per way of computing them."""
    totals = {"packed": 0.0, "bf16_dequantized": 0.0, "bf16_prepacked": 0.0, "bf16_amx": 0.0, "float32": 0.0}
    generator = torch.Generator().manual_seed(0)
    for in_features, out_features, count in SMOLLM2_LINEARS:
        linear = nn.Linear(in_features, out_features, bias=False)
        with torch.no_grad():
            linear.weight.normal_(0.0, 0.02, generator=generator)
        quantized: QuantizedLinear = _FORMATS[method](linear, max_quantized_rows=rows)
        x = torch.randn(rows, in_features, generator=generator)
        x_bf16 = x.to(torch.bfloat16)
        weight_f32 = linear.weight.detach()
        weight_bf16 = quantized.dequantized_weight()
        bf16_linear = nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
        bf16_linear.weight.data.copy_(weight_bf16)
        prepacked = PrepackedLinear(bf16_linear, batch_size_hint=rows, use_amx=False)
        on_amx = PrepackedLinear(bf16_linear, batch_size_hint=rows) if amx_linear.supported() else None
        with torch.inference_mode():
            totals["packed"] += count * median_seconds(functools.partial(quantized.quantized_matmul, x_bf16), iters)
            totals["bf16_dequantized"] += count * median_seconds(
                functools.partial(F.linear, x_bf16, weight_bf16), iters
            )
            totals["bf16_prepacked"] += count * median_seconds(functools.partial(prepacked, x_bf16), iters)
            if on_amx is not None:
                totals["bf16_amx"] += count * median_seconds(functools.partial(on_amx, x_bf16), iters)
            totals["float32"] += count * median_seconds(functools.partial(F.linear, x, weight_f32), iters)
    return totals


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,12,16,32,64,256,512")
    parser.add_argument("--method", choices=sorted(_FORMATS), default="int4")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    kernel = "kvos's int4 kernel" if args.method == "int4" and int4_kernel.supported() else "PyTorch's kernel"
    print(f"{args.method} linears of one SmolLM2-135M forward pass ({kernel}), torch threads {torch.get_num_threads()}")
    print(
        f"{'rows':>5} {'packed ms':>10} {'bf16 dequant ms':>16} {'bf16 prepacked ms':>18} {'bf16 AMX ms':>12} "
        f"{'float32 ms':>11} {'packed / best bf16':>19}"
    )
    points = []
    for rows in (int(r) for r in args.rows.split(",")):
        t = time_rows(args.method, rows, args.iters)
        points.append({"rows": rows, **t})
        best_bf16 = min(v for k, v in t.items() if k.startswith("bf16") and v > 0)
        amx_ms = f"{1e3 * t['bf16_amx']:.2f}" if t["bf16_amx"] > 0 else "-"
        print(
            f"{rows:>5} {1e3 * t['packed']:>10.2f} {1e3 * t['bf16_dequantized']:>16.2f} "
            f"{1e3 * t['bf16_prepacked']:>18.2f} {amx_ms:>12} {1e3 * t['float32']:>11.2f} "
            f"{t['packed'] / best_bf16:>18.2f}x",
            flush=True,
        )
    load_after = os.getloadavg()[0]
    print(f"1-minute load average before/after: {load_before:.2f}/{load_after:.2f}")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"method": args.method, "points": points, "load_average": [load_before, load_after]}, indent=2)
        )


if __name__ == "__main__":
    main()
