"""Where a decode step's time goes, against the roofline for the same step.

For each batch size B, B requests of C random prompt tokens are prefilled on
one engine (the defaults unless flags say otherwise), then decode steps are
timed twice:

- phases, by wall clock (no profiler attached): the scheduler's plan, the
  attention metadata, the model's forward pass, the logits, the sampler, the
  scheduler's update and the front end's detokenizing; what is left of the
  step is the engine's own glue;
- operators, by `torch.profiler` over as many further steps: self CPU time
  summed into GEMMs, the attention kernel, the KV write, and every other
  operator. The forward pass's wall time minus its operators' time is the
  Python (and dispatcher) overhead of running the layers.

Beside the measured figures the roofline gives each part's lower bound on
this machine: the GEMMs' FLOPs at the peak GEMM rate (or their weights at the
read bandwidth, whichever is longer), the attention kernel's KV bytes at the
read bandwidth, and the whole step's bound (`Roofline.decode_step_seconds`).

With `--sharegpt N` it profiles the offline workload instead (N ShareGPT
requests as `benchmarks.offline_throughput` sends them): the phases over the
whole run, and each step's time against that step's own roofline bound,
summed separately over pure decode steps and steps carrying prompt tokens.
The sum of per-step bounds is what the engine's kernels could reach with
its own scheduling; the workload bound of `offline_throughput` also assumes
coarse batching, so the two differ.

Usage: python -m benchmarks.profile_step [--batches 8,32,64] [--context 256] [--steps 5]
       [--sharegpt N] [--attention-backend auto] [--kv-cache paged] [--dtype auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.roofline import ArchShape, Roofline, kvos_gemm_dtype, kvos_weight_bytes_per_param, load_or_measure
from kvos.config import DTYPE_BYTES, EngineConfig
from kvos.engine.llm_engine import LLMEngine
from kvos.sampling_params import SamplingParams

PHASES = ("schedule", "metadata", "forward", "logits", "sample", "update", "frontend", "engine_glue")
GEMM_OPS = frozenset(
    {
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::matmul",
        "aten::linear",
        "aten::_weight_int8pack_mm",
        "aten::_weight_int4pack_mm_for_cpu",
        "mkldnn::_linear_pointwise",
        "kvos::int4_linear",
        "kvos_amx::linear",
    }
)
ATTENTION_OPS = frozenset({"kvos::paged_attention", "aten::_scaled_dot_product_flash_attention_for_cpu"})
KV_WRITE_OPS = frozenset({"aten::index_put_", "aten::_index_put_impl_", "aten::index_copy_"})


@dataclass(frozen=True)
class StepProfile:
    batch: int
    context: int
    steps: int
    step_ms: float
    phases_ms: dict[str, float]
    """Wall time per phase, mean per step."""
    ops_ms: dict[str, float]
    """Profiled self CPU time per operator class (gemm, attention, kv_write, other_ops), mean per step."""
    forward_python_ms: float
    """The forward pass's wall time minus its operators' self time: Python and dispatch overhead."""
    top_ops: list[tuple[str, float, int]]
    """(operator, ms per step, calls per step), the costliest first."""
    bound_ms: dict[str, float]
    """Roofline lower bounds: gemm, attention, step."""

    @property
    def percent_of_limit(self) -> float:
        return 100.0 * self.bound_ms["step"] / self.step_ms


class PhaseTimer:
    """Accumulates wall time of wrapped callables, per phase name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start

        return timed


def instrument(engine: LLMEngine, timer: PhaseTimer) -> None:
    """Wrap the engine's phases on these objects only (instance attributes shadow the methods)."""
    core = engine._local_core()
    scheduler, worker = core.scheduler, core.worker
    scheduler.schedule = timer.wrap("schedule", scheduler.schedule)  # type: ignore[method-assign]
    scheduler.update_from_output = timer.wrap("update", scheduler.update_from_output)  # type: ignore[method-assign]
    worker.attention.build_metadata = timer.wrap("metadata", worker.attention.build_metadata)  # type: ignore[method-assign]
    eager_forward = worker.model.forward
    compiled = worker._decode_forward != eager_forward
    worker.model.forward = timer.wrap("forward", eager_forward)  # type: ignore[method-assign]
    # The worker keeps its own handle on the decode step's forward (compiled or not): time that too.
    worker._decode_forward = worker.model.forward if not compiled else timer.wrap("forward", worker._decode_forward)
    worker.model.compute_logits = timer.wrap("logits", worker.model.compute_logits)  # type: ignore[method-assign]
    worker._sample = timer.wrap("sample", worker._sample)  # type: ignore[method-assign]
    engine.processor.process = timer.wrap("frontend", engine.processor.process)  # type: ignore[method-assign]


def classify(name: str) -> str:
    if name in GEMM_OPS:
        return "gemm"
    if name in ATTENTION_OPS:
        return "attention"
    if name in KV_WRITE_OPS:
        return "kv_write"
    return "other_ops"


def profile_batch(
    engine: LLMEngine, timer: PhaseTimer, roofline: Roofline, batch: int, context: int, steps: int, seed: int
) -> StepProfile:
    rng = random.Random(seed + batch)
    vocab = engine.arch.vocab_size
    # Enough tokens for the prefill (at most one step per request: a prompt fits the token
    # budget), a warm-up step, the timed steps and the profiled ones: the early requests must
    # not end before the last one has started, or the timed batch is smaller than `batch`.
    params = SamplingParams(temperature=0.0, max_tokens=batch + 2 * steps + 4, ignore_eos=True)
    req_ids = [f"profile-{batch}-{i}" for i in range(batch)]
    for req_id in req_ids:
        engine.add_request(req_id, [rng.randrange(vocab) for _ in range(context)], params)
    started: set[str] = set()
    while len(started) < batch:  # prefill: every request gets its first token
        started.update(out.req_id for out in engine.step())
    decoded = len(engine.step())  # one decode step untimed (first-call allocations)
    if decoded != batch:
        raise RuntimeError(f"the timed batch would be {decoded} requests, not {batch}: is the KV cache too small?")

    timer.seconds.clear()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    step_s = (time.perf_counter() - start) / steps
    phases = {phase: timer.seconds[phase] / steps for phase in PHASES if phase in timer.seconds}
    phases["engine_glue"] = step_s - sum(phases.values())

    timer.seconds.clear()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    forward_profiled_s = timer.seconds["forward"] / steps
    totals: dict[str, float] = defaultdict(float)
    forward_ops_s = 0.0
    per_op: list[tuple[str, float, int]] = []
    for event in prof.key_averages():
        self_s = event.self_cpu_time_total / 1e6 / steps
        totals[classify(event.key)] += self_s
        per_op.append((event.key, self_s * 1e3, event.count // steps))
        forward_ops_s += self_s
    for req_id in req_ids:
        engine.abort_request(req_id)
    while engine.has_unfinished_requests():
        engine.step()

    context_lens = [context + 3 + steps] * batch  # mid-way through the timed steps
    arch = roofline.arch
    gemm_flops = batch * arch.linear_flops_per_token() + batch * arch.lm_head_flops()
    bytes_per_param = kvos_weight_bytes_per_param(
        engine.config.model.resolved_dtype, engine.config.model.quantization, rows=batch
    )
    weight_bytes = roofline.weight_bytes(bytes_per_param)
    kv_bytes = sum(context_lens) * arch.kv_bytes_per_token(roofline.kv_bytes_per_elem)
    bounds = {
        "gemm": 1e3 * max(gemm_flops / roofline.peak_flops, weight_bytes / roofline.read_bandwidth),
        "attention": 1e3 * kv_bytes / roofline.read_bandwidth,
        "step": 1e3 * roofline.decode_step_seconds(context_lens, bytes_per_param),
    }
    # Operators outside the forward pass (sampler, logits) are counted too; the overhead is the
    # forward's profiled wall time less every operator's self time, a slight underestimate.
    python_s = max(0.0, forward_profiled_s + timer.seconds["logits"] / steps - forward_ops_s)
    per_op.sort(key=lambda row: -row[1])
    return StepProfile(
        batch=batch,
        context=context,
        steps=steps,
        step_ms=1e3 * step_s,
        phases_ms={k: 1e3 * v for k, v in phases.items()},
        ops_ms={k: 1e3 * v for k, v in sorted(totals.items())},
        forward_python_ms=1e3 * python_s,
        top_ops=per_op[:12],
        bound_ms=bounds,
    )


@dataclass
class WorkloadProfile:
    """The offline workload's steps, split into pure decode steps and steps carrying prompt tokens."""

    num_requests: int
    elapsed_s: float
    phases_s: dict[str, float]
    decode_steps: int = 0
    decode_s: float = 0.0
    decode_bound_s: float = 0.0
    decode_rows: int = 0
    mixed_steps: int = 0
    mixed_s: float = 0.0
    mixed_bound_s: float = 0.0
    mixed_tokens: int = 0


def step_bound_seconds(roofline: Roofline, plan: Any, dtype: str, quantization: str | None) -> tuple[float, bool, int]:
    """(the step's roofline bound, whether it is pure decode, its token count) from its plan."""
    arch = roofline.arch
    flops = 0
    kv_tokens = 0
    num_tokens = 0
    for scheduled in plan.scheduled:
        n, done = len(scheduled.new_token_ids), scheduled.num_computed_tokens
        num_tokens += n
        # Query i of the chunk (1-based) attends done + i keys.
        flops += n * arch.linear_flops_per_token() + arch.attention_flops(n * done + n * (n + 1) // 2)
        flops += arch.lm_head_flops() if scheduled.sample else 0
        kv_tokens += done + n
    bytes_per_param = kvos_weight_bytes_per_param(dtype, quantization, rows=num_tokens)
    memory = roofline.weight_bytes(bytes_per_param) + kv_tokens * arch.kv_bytes_per_token(roofline.kv_bytes_per_elem)
    bound = max(flops / roofline.peak_flops, memory / roofline.read_bandwidth)
    return bound, num_tokens == len(plan.scheduled), num_tokens


def profile_workload(
    engine: LLMEngine, timer: PhaseTimer, roofline: Roofline, num_requests: int, seed: int
) -> WorkloadProfile:
    from benchmarks.sharegpt import sample_requests

    requests = sample_requests(engine.tokenizer, num_requests, seed=seed)
    for i, r in enumerate(requests):
        params = SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)
        engine.add_request(f"sharegpt-{i}", list(r.prompt_token_ids), params)
    scheduler = engine._local_core().scheduler
    plans: list[Any] = []
    schedule = scheduler.schedule

    def schedule_and_keep() -> Any:
        plan = schedule()
        plans.append(plan)
        return plan

    scheduler.schedule = schedule_and_keep  # type: ignore[method-assign]
    model = engine.config.model
    timer.seconds.clear()
    result = WorkloadProfile(num_requests=len(requests), elapsed_s=0.0, phases_s={})
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        plans.clear()
        step_start = time.perf_counter()
        engine.step()
        step_s = time.perf_counter() - step_start
        if not plans or not plans[0].scheduled:
            continue
        bound, pure_decode, num_tokens = step_bound_seconds(
            roofline, plans[0], model.resolved_dtype, model.quantization
        )
        if pure_decode:
            result.decode_steps += 1
            result.decode_s += step_s
            result.decode_bound_s += bound
            result.decode_rows += num_tokens
        else:
            result.mixed_steps += 1
            result.mixed_s += step_s
            result.mixed_bound_s += bound
            result.mixed_tokens += num_tokens
    result.elapsed_s = time.perf_counter() - start
    scheduler.schedule = schedule  # type: ignore[method-assign]
    result.phases_s = {phase: timer.seconds[phase] for phase in PHASES if phase in timer.seconds}
    result.phases_s["engine_glue"] = result.elapsed_s - sum(result.phases_s.values())
    return result


def format_workload(w: WorkloadProfile) -> str:
    bound = w.decode_bound_s + w.mixed_bound_s
    return "\n".join(
        [
            f"{w.num_requests} ShareGPT requests: {w.elapsed_s:.1f} s; sum of per-step bounds {bound:.1f} s "
            f"({100 * bound / w.elapsed_s:.1f}% of limit)",
            f"  pure decode: {w.decode_steps} steps, {w.decode_s:.1f} s (bound {w.decode_bound_s:.1f} s, "
            f"{100 * w.decode_bound_s / max(w.decode_s, 1e-9):.1f}%), mean batch "
            f"{w.decode_rows / max(w.decode_steps, 1):.1f}",
            f"  with prompt tokens: {w.mixed_steps} steps, {w.mixed_s:.1f} s (bound {w.mixed_bound_s:.1f} s, "
            f"{100 * w.mixed_bound_s / max(w.mixed_s, 1e-9):.1f}%), mean tokens "
            f"{w.mixed_tokens / max(w.mixed_steps, 1):.1f}",
            "  phases (wall): " + ", ".join(f"{k} {v:.2f}" for k, v in w.phases_s.items()) + " s",
        ]
    )


def format_profile(p: StepProfile) -> str:
    lines = [
        f"batch {p.batch} x context {p.context}: step {p.step_ms:.1f} ms "
        f"(bound {p.bound_ms['step']:.1f} ms, {p.percent_of_limit:.1f}% of limit; "
        f"{p.batch * 1e3 / p.step_ms:.1f} tok/s)",
        "  phases (wall): " + ", ".join(f"{k} {v:.2f}" for k, v in p.phases_ms.items()) + " ms",
        "  operators (profiled self time): "
        + ", ".join(f"{k} {v:.2f}" for k, v in p.ops_ms.items())
        + f" ms; python/dispatch overhead {p.forward_python_ms:.2f} ms",
        f"  bounds: gemm {p.bound_ms['gemm']:.2f} ms, attention (KV read) {p.bound_ms['attention']:.2f} ms",
        "  top operators: " + "; ".join(f"{name} {ms:.2f} ms x{calls}" for name, ms, calls in p.top_ops[:8]),
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path or name (default: the engine's default)")
    parser.add_argument("--load-format", default=None)
    parser.add_argument("--batches", default="8,32,64")
    parser.add_argument("--context", type=int, default=256, help="prompt tokens per request")
    parser.add_argument("--steps", type=int, default=5, help="decode steps timed, and as many profiled")
    parser.add_argument("--sharegpt", type=int, default=0, help="profile N ShareGPT requests instead of the batches")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *sorted(DTYPE_BYTES)], help="default: the engine's own (auto)"
    )
    parser.add_argument("--kv-cache", default="paged", choices=("paged", "virtual"))
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--quantization", default=None, choices=("int8", "int4"))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    options: dict[str, Any] = {
        "dtype": args.dtype,
        "kv_cache": args.kv_cache,
        "attention_backend": args.attention_backend,
        "max_num_seqs": 64 if args.sharegpt else max(batches),
        "max_num_batched_tokens": max(512, args.context),
        "seed": args.seed,
        "compile": args.compile,
    }
    for key in ("model", "load_format", "quantization"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    load_before = os.getloadavg()[0]
    engine = LLMEngine(EngineConfig.from_kwargs(**options))
    dtype = engine.config.model.resolved_dtype
    machine = load_or_measure(dtype=kvos_gemm_dtype(dtype, engine.config.model.quantization))
    roofline = Roofline(ArchShape.from_any(engine.arch), machine.peak_flops, machine.read_bandwidth, DTYPE_BYTES[dtype])
    timer = PhaseTimer()
    instrument(engine, timer)
    print(
        f"settings: {options}, computing in {dtype}, attention {engine._local_core().worker.attention.name}, "
        f"torch threads {torch.get_num_threads()}, load {load_before:.2f}"
    )
    results = []
    workload = None
    if args.sharegpt:
        workload = profile_workload(engine, timer, roofline, args.sharegpt, args.seed)
        print(format_workload(workload), flush=True)
    else:
        for batch in batches:
            result = profile_batch(engine, timer, roofline, batch, args.context, args.steps, args.seed)
            results.append(result)
            print(format_profile(result), flush=True)
    load_after = os.getloadavg()[0]
    print(f"load average: {load_before:.2f} before, {load_after:.2f} after")
    engine.close()
    if args.json is not None:
        payload = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "settings": options,
            "machine": asdict(machine),
            "load_average": [load_before, load_after],
            "profiles": [asdict(r) | {"percent_of_limit": r.percent_of_limit} for r in results],
            "workload": None if workload is None else asdict(workload),
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
