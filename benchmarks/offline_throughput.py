"""Offline throughput: the same ShareGPT requests through kvos and Hugging Face.

Every request generates exactly its reference answer's length (ignore_eos),
so both engines do the same useful work and only scheduling and kernels
differ. kvos batches continuously; transformers runs static, left-padded
batches in the order given, so it generates up to the longest answer of each
batch, and only each request's own tokens count as useful output.

Beside throughput each engine's resident memory is reported: this process's
RSS after warm-up (idle) and its peak during the run. Both engines run in
this process, one after the other, so run them apart (`--engines kvos`) for
figures that hold only one engine's memory.

Usage: python -m benchmarks.offline_throughput [--num-requests 200] [--engines kvos,hf] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.memory import RSSSampler, mib
from benchmarks.peers import arch_from_gguf, load_hf_model, load_tokenizer, resolve_gguf
from benchmarks.roofline import (
    MachinePeak,
    Roofline,
    kvos_gemm_dtype,
    kvos_weight_bytes_per_param,
    load_or_measure,
    percent_of_limit,
)
from benchmarks.sharegpt import BenchRequest, sample_requests
from kvos.config import DTYPE_BYTES, ModelConfig, SchedulerConfig

logger = logging.getLogger(__name__)

ENGINES = ("kvos", "hf")
WEIGHT_BYTES_PER_PARAM = 4.0  # HF (and kvos in float32) holds the dequantized weights in float32
WARMUP_PROMPT = "Warm-up request: please say hello."


@dataclass(frozen=True)
class EngineRun:
    """One engine's timed pass over all requests."""

    engine: str
    max_batch: int
    num_output_tokens: int  # useful tokens: each request's own max_tokens
    num_generated_tokens: int  # everything generated, padding overshoot included
    elapsed_s: float
    bound_s: float  # roofline lower bound at this engine's batch size
    rss_idle_mib: float | None = None  # this process's resident memory after warm-up, before the requests
    rss_peak_mib: float | None = None  # its peak while serving them

    @property
    def tokens_per_s(self) -> float:
        return self.num_output_tokens / self.elapsed_s

    @property
    def percent_of_limit(self) -> float:
        return percent_of_limit(self.elapsed_s, self.bound_s)


@dataclass(frozen=True)
class ThroughputResult:
    date: str
    model: str
    machine: MachinePeak
    settings: dict[str, Any]
    num_requests: int
    num_prompt_tokens: int
    num_output_tokens: int
    runs: list[EngineRun]
    load_average: tuple[float, float]  # 1-minute load before and after: other work on the machine skews figures

    def ratio(self, engine: str = "kvos", peer: str = "hf") -> float | None:
        """engine tokens/s over peer tokens/s, when both ran."""
        by_name = {run.engine: run for run in self.runs}
        if engine not in by_name or peer not in by_name:
            return None
        return by_name[engine].tokens_per_s / by_name[peer].tokens_per_s

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for run, run_data in zip(self.runs, data["runs"]):
            run_data["tokens_per_s"] = run.tokens_per_s
            run_data["percent_of_limit"] = run.percent_of_limit
        data["ratio_kvos_over_hf"] = self.ratio()
        return data


def run_kvos(
    requests: Sequence[BenchRequest],
    gguf_path: Path,
    roofline: Roofline,
    warmup_ids: list[int],
    kv_cache: str,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    engine_options: dict[str, str],
    weight_bytes_per_param: float = WEIGHT_BYTES_PER_PARAM,
) -> EngineRun:
    from kvos import LLM, SamplingParams

    llm = LLM(
        model=str(gguf_path),
        kv_cache=kv_cache,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        **engine_options,
    )
    llm.generate([warmup_ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)

    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    sampler = RSSSampler()
    idle = sampler.sample()
    start = time.perf_counter()
    with sampler:
        outputs = llm.generate([list(r.prompt_token_ids) for r in requests], params)
    elapsed = time.perf_counter() - start

    counts = [(r.max_tokens, len(out.outputs[0].token_ids)) for r, out in zip(requests, outputs)]
    wrong = [c for c in counts if c[0] != c[1]]
    if wrong:
        logger.warning(
            "kvos generated a wrong number of tokens for %d requests (wanted, got): %s", len(wrong), wrong[:5]
        )
    bound = roofline.lower_bound_seconds(
        [(len(r.prompt_token_ids), r.max_tokens) for r in requests], max_num_seqs, weight_bytes_per_param
    )
    num_useful = sum(min(wanted, got) for wanted, got in counts)
    num_generated = sum(got for _, got in counts)
    return EngineRun(
        "kvos", max_num_seqs, num_useful, num_generated, elapsed, bound.total_s, mib(idle), mib(sampler.peak_bytes)
    )


def run_hf(
    requests: Sequence[BenchRequest],
    gguf_path: Path,
    roofline: Roofline,
    warmup_ids: list[int],
    pad_token_id: int,
    batch_size: int,
) -> EngineRun:
    model = load_hf_model(gguf_path)
    hf_generate(model, [warmup_ids, warmup_ids[:3]], max_new_tokens=8, pad_token_id=pad_token_id)

    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    num_generated = 0
    sampler = RSSSampler()
    idle = sampler.sample()
    start = time.perf_counter()
    with sampler:
        for batch in tqdm(batches, desc="hf batches", unit="batch"):
            max_new = max(r.max_tokens for r in batch)
            hf_generate(
                model, [list(r.prompt_token_ids) for r in batch], max_new_tokens=max_new, pad_token_id=pad_token_id
            )
            num_generated += len(batch) * max_new
    elapsed = time.perf_counter() - start

    bound = roofline.lower_bound_seconds(
        [(len(r.prompt_token_ids), r.max_tokens) for r in requests], batch_size, WEIGHT_BYTES_PER_PARAM
    )
    num_useful = sum(r.max_tokens for r in requests)
    return EngineRun(
        "hf", batch_size, num_useful, num_generated, elapsed, bound.total_s, mib(idle), mib(sampler.peak_bytes)
    )


def hf_generate(model: Any, prompts: list[list[int]], max_new_tokens: int, pad_token_id: int) -> torch.Tensor:
    """Greedy, left-padded, exactly max_new_tokens per row (EOS suppressed, as with ignore_eos), on the
    model's device."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
    )
    assert out.shape[1] == width + max_new_tokens, "transformers stopped early despite min_new_tokens"
    return out


def format_table(result: ThroughputResult) -> str:
    header = (
        f"{'engine':<6} {'batch':>5} {'out tokens':>10} {'generated':>10} {'time s':>8} {'tok/s':>8} "
        f"{'bound s':>8} {'% of limit':>10} {'RSS idle/peak MiB':>18}"
    )
    lines = [header, "-" * len(header)]
    for run in result.runs:
        rss = f"{_mib_text(run.rss_idle_mib)}/{_mib_text(run.rss_peak_mib)}"
        lines.append(
            f"{run.engine:<6} {run.max_batch:>5} {run.num_output_tokens:>10} {run.num_generated_tokens:>10} "
            f"{run.elapsed_s:>8.1f} {run.tokens_per_s:>8.1f} {run.bound_s:>8.1f} {run.percent_of_limit:>9.1f}% "
            f"{rss:>18}"
        )
    ratio = result.ratio()
    if ratio is not None:
        lines.append(f"kvos / hf output tokens/s: {ratio:.2f}x")
    before, after = result.load_average
    lines.append(f"1-minute load average before/after: {before:.2f}/{after:.2f}")
    return "\n".join(lines)


def _mib_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", default="kvos,hf", help="comma-separated subset of kvos,hf")
    parser.add_argument("--kv-cache", choices=["paged", "virtual"], default="paged")
    defaults = SchedulerConfig()
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--attention-backend", default=None, help="kvos attention backend (default: kvos's choice)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="kvos's compute dtype (default: kvos's own, auto); its roofline uses that dtype's GEMM peak and bytes",
    )
    parser.add_argument(
        "--quantization",
        choices=["int8", "int4"],
        default=None,
        help="kvos's weight quantization; its roofline counts the quantized bytes and the GEMM peak of what runs",
    )
    parser.add_argument("--remeasure", action="store_true", help="measure the machine's roofline again")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here as JSON")
    args = parser.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        parser.error(f"--engines must be a comma-separated subset of {','.join(ENGINES)}, got {args.engines!r}")
    args.engines = engines
    for name in ("num_requests", "max_num_seqs", "max_num_batched_tokens", "hf_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: Sequence[str] | None = None) -> ThroughputResult:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    gguf_path = resolve_gguf(args.model)
    machine = load_or_measure("cpu", remeasure=args.remeasure)
    roofline = Roofline.for_machine(arch_from_gguf(gguf_path), machine)

    tokenizer = load_tokenizer(gguf_path)
    requests = sample_requests(tokenizer, args.num_requests, seed=args.seed)
    warmup_ids = list(tokenizer.encode(WARMUP_PROMPT))
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "remeasure")}
    print(f"offline throughput: {gguf_path.name}, {len(requests)} ShareGPT requests, settings {settings}")
    print(f"machine: {machine.device_name}, {machine.num_threads} threads, torch {torch.__version__}")

    options = {"attention_backend": args.attention_backend} if args.attention_backend else {}
    kvos_roofline, kvos_weight_bytes = roofline, WEIGHT_BYTES_PER_PARAM
    if args.dtype is not None:
        options["dtype"] = args.dtype
    if args.quantization is not None:
        options["quantization"] = args.quantization
    kvos_dtype = ModelConfig(dtype=args.dtype or "auto").resolved_dtype
    gemm_dtype = kvos_gemm_dtype(kvos_dtype, args.quantization)
    if gemm_dtype != "float32" or args.quantization is not None:
        # GEMMs at that dtype's peak, KV in the compute dtype, weights in the bytes a batch-1 step reads
        # (a lower bound at bigger batches too: where PyTorch's kernels hand them to a bfloat16 copy it reads more).
        peak = load_or_measure("cpu", remeasure=args.remeasure, dtype=gemm_dtype)
        kvos_roofline = Roofline.for_machine(arch_from_gguf(gguf_path), peak, kv_bytes_per_elem=DTYPE_BYTES[kvos_dtype])
        kvos_weight_bytes = kvos_weight_bytes_per_param(kvos_dtype, args.quantization, rows=1)
    print(
        f"kvos computes in {kvos_dtype} (GEMMs: {gemm_dtype}): roofline at {kvos_roofline.peak_flops / 1e9:.0f} "
        "GFLOP/s peak"
    )

    load_before = os.getloadavg()[0]
    runs: list[EngineRun] = []
    if "kvos" in args.engines:
        runs.append(
            run_kvos(
                requests,
                gguf_path,
                kvos_roofline,
                warmup_ids,
                args.kv_cache,
                args.max_num_seqs,
                args.max_num_batched_tokens,
                options,
                kvos_weight_bytes,
            )
        )
    if "hf" in args.engines:
        pad_token_id = tokenizer.eos_token_ids[0]  # any id will do: the attention mask hides padding
        runs.append(run_hf(requests, gguf_path, roofline, warmup_ids, pad_token_id, args.hf_batch_size))

    result = ThroughputResult(
        date=datetime.date.today().isoformat(),
        model=gguf_path.name,
        machine=machine,
        settings=settings,
        num_requests=len(requests),
        num_prompt_tokens=sum(len(r.prompt_token_ids) for r in requests),
        num_output_tokens=sum(r.max_tokens for r in requests),
        runs=runs,
        load_average=(load_before, os.getloadavg()[0]),
    )
    print(format_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
