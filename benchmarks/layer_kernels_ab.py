"""kvos's bfloat16 CPU kernels against what they replace, on one engine, interleaved.

This VM's speed drifts by 10-30% between processes minutes apart, more than
the kernels change a step by, so a before/after pair of separate runs says
little. Here one engine (the defaults: bfloat16, the paged kernel, prepacked
linears) decodes a batch of B requests of C random prompt tokens, and its
norms, SwiGLU activations and rotary embedding are switched between the
kernels (`kvos.model.layer_kernels`) and eager twins on the same weights
every few steps, in alternating order; each round times both. The KV write
(`kvos::write_kv`) runs in both halves. With `--kernels linears` the linears
on the AMX kernel (`kvos.model.amx_linear`) are switched with oneDNN's
prepacked twins instead (a CPU with AMX only). With `--kernels int4` the
engine runs `quantization="int4"`, and its linears' AMX path for batches of
`int4_kernel.AMX_MIN_ROWS` rows or more (`int4_linear_amx`) is switched with
the integer-dot-product kernel that would run them without AMX.

Usage: python -m benchmarks.layer_kernels_ab [--kernels layer|linears|int4] [--batches 1,16,64] [--context 256]
       [--rounds 6] [--steps 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import time
from collections.abc import Sequence

from torch import nn

from kvos.config import EngineConfig
from kvos.engine.llm_engine import LLMEngine
from kvos.model.layer_kernels import KernelRMSNorm, KernelRotaryEmbedding, KernelSiluAndMul
from kvos.model.layers import RMSNorm, RotaryEmbedding, SiluAndMul
from kvos.model.prepack import PrepackedLinear
from kvos.model.quantization import Int4Linear
from kvos.sampling_params import SamplingParams

Swaps = list[tuple[nn.Module, str, nn.Module, nn.Module]]  # parent, name, kernel module, eager twin


def eager_twin(module: nn.Module) -> nn.Module | None:
    """The eager module computing what a kernel module computes, on the same tensors."""
    if isinstance(module, KernelRMSNorm):
        norm = RMSNorm(module.weight.shape[0], module.eps)
        norm.weight = module.weight
        return norm
    if isinstance(module, KernelSiluAndMul):
        return SiluAndMul()
    if isinstance(module, KernelRotaryEmbedding):
        rotary = RotaryEmbedding.__new__(RotaryEmbedding)
        nn.Module.__init__(rotary)
        rotary.register_buffer("cos", module.cos, persistent=False)
        rotary.register_buffer("sin_rotated", module.sin_rotated, persistent=False)
        return rotary
    return None


def onednn_twin(module: nn.Module) -> nn.Module | None:
    """oneDNN's prepacked linear on the weights of a linear that runs on the AMX kernel."""
    if not (isinstance(module, PrepackedLinear) and module.amx):
        return None
    plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    plain.weight = nn.Parameter(module.dense_weight(), requires_grad=False)
    plain.bias = module.bias
    return PrepackedLinear(plain, batch_size_hint=64, use_amx=False)


def vnni_twin(module: nn.Module) -> nn.Module | None:
    """The same int4 linear (the same packed weights) without its AMX path."""
    if not (isinstance(module, Int4Linear) and module.amx):
        return None
    twin = copy.copy(module)
    twin.amx = False
    return twin


def find_swaps(model: nn.Module, kernels: str) -> Swaps:
    twin_of = {"linears": onednn_twin, "int4": vnni_twin}.get(kernels, eager_twin)
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            twin = twin_of(child)
            if twin is not None:
                swaps.append((parent, name, child, twin))
    if not swaps:
        raise SystemExit(f"the engine runs no {kernels} kernels (eager bfloat16 on a CPU; linears, int4: with AMX)")
    return swaps


def use(swaps: Swaps, kernels: bool) -> None:
    for parent, name, kernel, twin in swaps:
        setattr(parent, name, kernel if kernels else twin)


def time_batch(engine: LLMEngine, swaps: Swaps, batch: int, context: int, rounds: int, steps: int) -> dict:
    rng = random.Random(batch)
    # Enough tokens that no request ends before the last timed step.
    params = SamplingParams(temperature=0.0, max_tokens=batch + 2 * rounds * (steps + 1) + 4, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"ab-{batch}-{i}", [rng.randrange(engine.arch.vocab_size) for _ in range(context)], params)
    started: set[str] = set()
    while len(started) < batch:
        started.update(out.req_id for out in engine.step())
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for kernels in (r % 2 == 0, r % 2 == 1):
            use(swaps, kernels)
            engine.step()  # untimed: the first step after a switch
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            times[kernels].append((time.perf_counter() - start) / steps)
    use(swaps, True)
    while engine.has_unfinished_requests():
        engine.step()
    return {"kernels_ms": [1e3 * t for t in times[True]], "eager_ms": [1e3 * t for t in times[False]]}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", choices=("layer", "linears", "int4"), default="layer")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=6, help="rounds of (kernels, eager) or (eager, kernels)")
    parser.add_argument("--steps", type=int, default=5, help="decode steps timed per half-round")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    load_before = os.getloadavg()[0]
    engine = LLMEngine(
        EngineConfig.from_kwargs(
            max_num_seqs=max(batches),
            max_num_batched_tokens=max(512, args.context),
            quantization="int4" if args.kernels == "int4" else None,
        )
    )
    swaps = find_swaps(engine._local_core().worker.model, args.kernels)
    print(f"{len(swaps)} modules switched; batch x {args.context} context; {args.rounds} rounds x {args.steps} steps")
    other = {"linears": "oneDNN", "int4": "VNNI int4"}.get(args.kernels, "eager")
    print(f"| batch | {other} step (median) | kernels step (median) | {other} / kernels | rounds kernels faster |")
    print("|---|---|---|---|---|")
    for batch in batches:
        r = time_batch(engine, swaps, batch, args.context, args.rounds, args.steps)
        eager, kernels = statistics.median(r["eager_ms"]), statistics.median(r["kernels_ms"])
        wins = sum(k < e for k, e in zip(r["kernels_ms"], r["eager_ms"], strict=True))
        print(f"| {batch} | {eager:.1f} ms | {kernels:.1f} ms | {eager / kernels:.2f}x | {wins} of {args.rounds} |")
    print(f"load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    engine.close()


if __name__ == "__main__":
    main()
