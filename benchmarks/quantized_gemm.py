"""Quantized linears against a bfloat16 GEMM on their dequantized weight, by batch rows.

PyTorch's int8/int4 kernels were measured slower than a bfloat16 GEMM above
a few rows, so `kvos.model.quantization` keeps a bfloat16 copy of each weight
for batches above `max_quantized_rows` (12 rows for int4, 8 for int8), at 2
bytes per parameter of resident memory; on AVX512-VNNI CPUs kvos's own int4
kernels replace PyTorch's, and the copy goes if they keep up at every batch
size. This times one forward pass of SmolLM2-135M's projections (fused
q|k|v, o, fused gate|up, down in each of 30 layers, each layer its own
weights, so they come from memory as in a real step; then the LM head) at
each row count M: the quantized layer (`quantized_matmul`: for int4 on VNNI
CPUs kvos's kernels, the AMX one from `int4_kernel.AMX_MIN_ROWS` rows where
the CPU has AMX), the same without its AMX path ("int4 VNNI"), the bfloat16
GEMM on the dequantized weight as `F.linear`, with the weight prepacked for
oneDNN, and on kvos's AMX kernel where the CPU has AMX (kvos runs unquantized
bfloat16 models on the last, else the one before), and a float32 GEMM. The
ways take turns within each of `--iters` rounds (this VM's speed drifts
between minutes); each figure is the median.

Usage: python -m benchmarks.quantized_gemm [--rows 1,8,12,16,32,64,256,512] [--method int4] [--iters 7]
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

from benchmarks.layer_kernels_ab import vnni_twin
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


Way = Callable[[torch.Tensor], torch.Tensor]


def layer_ways(
    method: str, in_features: int, out_features: int, rows: int, generator: torch.Generator
) -> dict[str, Way]:
    """One linear of random weights, each way of multiplying by it."""
    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.02, generator=generator)
    quantized: QuantizedLinear = _FORMATS[method](linear, max_quantized_rows=rows)
    weight_f32 = linear.weight.detach()
    weight_bf16 = quantized.dequantized_weight()
    bf16_linear = nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
    bf16_linear.weight.data.copy_(weight_bf16)
    ways: dict[str, Way] = {
        "packed": quantized.quantized_matmul,
        "bf16_dequantized": functools.partial(F.linear, weight=weight_bf16),
        "bf16_prepacked": PrepackedLinear(bf16_linear, batch_size_hint=rows, use_amx=False),
        "float32": lambda x: F.linear(x.float(), weight_f32),
    }
    vnni = vnni_twin(quantized)
    if isinstance(vnni, QuantizedLinear):
        ways["int4_vnni"] = vnni.quantized_matmul
    if amx_linear.supported():
        ways["bf16_amx"] = PrepackedLinear(bf16_linear, batch_size_hint=rows)
    return ways


def time_rows(method: str, rows: int, iters: int) -> dict[str, float]:
    """Seconds of one forward pass's linears at `rows` rows, per way of computing them."""
    generator = torch.Generator().manual_seed(0)
    layers = [
        (layer_ways(method, in_features, out_features, rows, generator), in_features)
        for in_features, out_features, count in SMOLLM2_LINEARS
        for _ in range(count)
    ]
    inputs = {k: torch.randn(rows, k, generator=generator).to(torch.bfloat16) for k in {k for _, k in layers}}
    times: dict[str, list[float]] = {name: [] for name in layers[0][0]}
    with torch.inference_mode():
        for i in range(iters + 1):
            for name in times:
                start = time.perf_counter()
                for ways, in_features in layers:
                    ways[name](inputs[in_features])
                if i > 0:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,12,16,32,64,256,512")
    parser.add_argument("--method", choices=sorted(_FORMATS), default="int4")
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    kernel = "kvos's int4 kernel" if args.method == "int4" and int4_kernel.supported() else "PyTorch's kernel"
    print(f"{args.method} linears of one SmolLM2-135M forward pass ({kernel}), torch threads {torch.get_num_threads()}")
    columns = ["packed", "int4_vnni", "bf16_dequantized", "bf16_prepacked", "bf16_amx", "float32"]
    print(" ".join(f"{c:>16}" for c in ["rows", *columns, "best bf16 / packed"]))
    points = []
    for rows in (int(r) for r in args.rows.split(",")):
        t = time_rows(args.method, rows, args.iters)
        points.append({"rows": rows, **t})
        best_bf16 = min(v for k, v in t.items() if k.startswith("bf16"))
        cells = [f"{1e3 * t[c]:.2f} ms" if c in t else "-" for c in columns]
        print(" ".join(f"{c:>16}" for c in [str(rows), *cells, f"{best_bf16 / t['packed']:.2f}x"]), flush=True)
    load_after = os.getloadavg()[0]
    print(f"1-minute load average before/after: {load_before:.2f}/{load_after:.2f}")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"method": args.method, "points": points, "load_average": [load_before, load_after]}, indent=2)
        )


if __name__ == "__main__":
    main()
