"""Single-stream decode latency: kvos vs llama.cpp (and transformers for reference).

One request at a time, batch 1: a 32-token prompt, then 256 new tokens with
EOS ignored, greedy. This is the latency a lone chat user sees, and at batch 1
a decode step is bound by reading every weight once, so the engines' weight
formats matter: transformers reads float32 weights, llama.cpp the GGUF's
quantized blocks, kvos float32 or (`--quantization`) int8 / int4 ones.

Usage: python -m benchmarks.decode_latency [--engines kvos,llama.cpp,hf] [--quantization int4] [--compile]
                                           [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.peers import (
    arch_from_gguf,
    llama_cpp_version,
    load_hf_model,
    load_llama_cpp,
    load_tokenizer,
    resolve_gguf,
)
from benchmarks.roofline import (
    ArchShape,
    MachinePeak,
    Roofline,
    kvos_gemm_dtype,
    kvos_weight_bytes_per_param,
    load_or_measure,
    percent_of_limit,
)
from kvos.config import DTYPE_BYTES, EngineConfig

logger = logging.getLogger(__name__)

ENGINES = ("kvos", "llama.cpp", "hf")
PROMPT_TEXT = (
    "The history of computing is a story of memory as much as of arithmetic: every generation of machines "
    "has had to decide what to keep close to the processor, what to move further away, and when to move it."
)
WARMUP_TEXT = "Warm-up request: please say hello."


@dataclass(frozen=True)
class LatencyRun:
    """One engine generating `num_new_tokens` for one prompt."""

    engine: str
    ttft_s: float  # request handed in -> first new token (the prefill)
    total_s: float  # request handed in -> last new token
    num_new_tokens: int
    bound_s: float  # roofline lower bound for the same prefill + decode steps
    weight_bytes_per_param: float
    token_ids: list[int] = field(repr=False)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, over the time after the first: the steady decode rate."""
        return (self.num_new_tokens - 1) / (self.total_s - self.ttft_s)

    @property
    def tokens_per_s(self) -> float:
        return self.num_new_tokens / self.total_s

    @property
    def percent_of_limit(self) -> float:
        return percent_of_limit(self.total_s, self.bound_s)


@dataclass(frozen=True)
class LatencyResult:
    date: str
    model: str
    machine: MachinePeak
    prompt_token_ids: list[int]
    num_new_tokens: int
    llama_cpp_version: str | None
    notes: list[str]
    runs: list[LatencyRun]
    load_average: tuple[float, float]  # 1-minute load before and after: other work on the machine skews figures

    def ratio(self, engine: str = "kvos", peer: str = "llama.cpp") -> float | None:
        """engine decode tokens/s over peer decode tokens/s, when both ran."""
        by_name = {run.engine: run for run in self.runs}
        if engine not in by_name or peer not in by_name:
            return None
        return by_name[engine].decode_tokens_per_s / by_name[peer].decode_tokens_per_s

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for run, run_data in zip(self.runs, data["runs"]):
            run_data["decode_tokens_per_s"] = run.decode_tokens_per_s
            run_data["tokens_per_s"] = run.tokens_per_s
            run_data["percent_of_limit"] = run.percent_of_limit
        data["ratio_kvos_over_llama_cpp"] = self.ratio()
        data["ratio_kvos_over_hf"] = self.ratio(peer="hf")
        return data


def kvos_config(gguf_path: Path, kv_cache: str, quantization: str | None, compile_decode: bool) -> EngineConfig:
    """The engine's defaults for one stream (dtype "auto"), with the script's options."""
    return EngineConfig.from_kwargs(
        model=str(gguf_path), kv_cache=kv_cache, max_num_seqs=1, quantization=quantization, compile=compile_decode
    )


def time_kvos(
    gguf_path: Path,
    prompt_ids: list[int],
    warmup_ids: list[int],
    num_new_tokens: int,
    kv_cache: str,
    quantization: str | None = None,
    compile_decode: bool = False,
) -> tuple[float, float, list[int]]:
    """(ttft, total, token ids), driving the engine step by step to see the first token."""
    from kvos import SamplingParams
    from kvos.engine.llm_engine import LLMEngine

    engine = LLMEngine(kvos_config(gguf_path, kv_cache, quantization, compile_decode))

    def generate(req_id: str, token_ids: list[int], max_tokens: int) -> tuple[float, float, list[int]]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        engine.add_request(req_id, token_ids, params)
        first = 0.0
        while True:
            for out in engine.step():
                if not first and out.outputs[0].token_ids:
                    first = time.perf_counter() - start
                if out.finished:
                    return first, time.perf_counter() - start, list(out.outputs[0].token_ids)

    generate("warmup", warmup_ids, 8)
    return generate("timed", prompt_ids, num_new_tokens)


def time_llama_cpp(
    gguf_path: Path, prompt_ids: list[int], warmup_ids: list[int], num_new_tokens: int, n_threads: int
) -> tuple[float, float, list[int]]:
    """(ttft, total, token ids). `Llama.generate` never stops by itself, so EOS is ignored as asked."""
    llm = load_llama_cpp(gguf_path, n_ctx=len(prompt_ids) + num_new_tokens + 16, n_threads=n_threads)

    def generate(token_ids: list[int], max_tokens: int) -> tuple[float, float, list[int]]:
        llm.reset()  # no prompt reuse from the previous call
        generated: list[int] = []
        first = 0.0
        start = time.perf_counter()
        stream = llm.generate(token_ids, temp=0.0, repeat_penalty=1.0)
        for token in stream:
            generated.append(int(token))
            if len(generated) == 1:
                first = time.perf_counter() - start
            if len(generated) == max_tokens:
                break
        total = time.perf_counter() - start
        stream.close()
        return first, total, generated

    generate(warmup_ids, 8)
    return generate(prompt_ids, num_new_tokens)


class _FirstTokenClock:
    """A transformers streamer that notes when the first new token arrives.

    `generate` hands the streamer the prompt first, then each new token.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.num_puts = 0
        self.first_token_s = 0.0

    def put(self, value: torch.Tensor) -> None:
        self.num_puts += 1
        if self.num_puts == 2:
            self.first_token_s = time.perf_counter() - self.start

    def end(self) -> None:
        """Nothing to flush."""


def time_hf(
    gguf_path: Path, prompt_ids: list[int], warmup_ids: list[int], num_new_tokens: int, pad_token_id: int
) -> tuple[float, float, list[int]]:
    """(ttft, total, token ids) of `generate` at batch 1."""
    model = load_hf_model(gguf_path)

    def generate(token_ids: list[int], max_tokens: int) -> tuple[float, float, list[int]]:
        clock = _FirstTokenClock()
        out = model.generate(
            input_ids=torch.tensor([token_ids]),
            attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,  # EOS suppressed, as with ignore_eos
            do_sample=False,
            pad_token_id=pad_token_id,
            streamer=clock,
        )
        total = time.perf_counter() - clock.start
        return clock.first_token_s, total, out[0, len(token_ids) :].tolist()

    generate(warmup_ids, 8)
    return generate(prompt_ids, num_new_tokens)


def matching_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def format_table(result: LatencyResult) -> str:
    header = (
        f"{'engine':<9} {'TTFT ms':>8} {'total s':>8} {'decode tok/s':>12} {'tok/s':>7} {'bound s':>8} "
        f"{'% of limit':>10}"
    )
    lines = [header, "-" * len(header)]
    for run in result.runs:
        lines.append(
            f"{run.engine:<9} {run.ttft_s * 1e3:>8.1f} {run.total_s:>8.2f} {run.decode_tokens_per_s:>12.1f} "
            f"{run.tokens_per_s:>7.1f} {run.bound_s:>8.2f} {run.percent_of_limit:>9.1f}%"
        )
    for peer in ("llama.cpp", "hf"):
        ratio = result.ratio(peer=peer)
        if ratio is not None:
            lines.append(f"kvos / {peer} decode tokens/s: {ratio:.2f}x")
    lines += result.notes
    before, after = result.load_average
    lines.append(f"1-minute load average before/after: {before:.2f}/{after:.2f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--engines", default="kvos,llama.cpp,hf", help="comma-separated subset of kvos,llama.cpp,hf")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--quantization", default=None, choices=["int8", "int4"], help="kvos weight-only int8 / int4")
    parser.add_argument("--compile", action="store_true", help="kvos decode steps through torch.compile")
    parser.add_argument("--kv-cache", choices=["paged", "virtual"], default="paged")
    parser.add_argument("--llama-cpp-threads", type=int, default=2)
    parser.add_argument("--remeasure", action="store_true", help="measure the machine's roofline again")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here as JSON")
    args = parser.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        parser.error(f"--engines must be a comma-separated subset of {','.join(ENGINES)}, got {args.engines!r}")
    args.engines = engines
    for name in ("prompt_tokens", "new_tokens", "llama_cpp_threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: Sequence[str] | None = None) -> LatencyResult:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    gguf_path = resolve_gguf(args.model)
    machine = load_or_measure("cpu", remeasure=args.remeasure)
    kvos_dtype = kvos_config(gguf_path, args.kv_cache, args.quantization, args.compile).model.resolved_dtype
    tokenizer = load_tokenizer(gguf_path)
    prompt_ids = list(tokenizer.encode(PROMPT_TEXT))[: args.prompt_tokens]
    if len(prompt_ids) < args.prompt_tokens:
        raise ValueError(
            f"--prompt-tokens must be <= {len(prompt_ids)} (the built-in prompt's length), got {args.prompt_tokens}"
        )
    warmup_ids = list(tokenizer.encode(WARMUP_TEXT))
    pad_token_id = tokenizer.eos_token_ids[0]  # any id will do: the attention mask hides padding
    n = args.new_tokens
    print(
        f"decode latency: {gguf_path.name}, batch 1, {len(prompt_ids)} prompt tokens, {n} new tokens, "
        "greedy, EOS ignored"
    )
    print(f"machine: {machine.device_name}, {machine.num_threads} torch threads, torch {torch.__version__}")

    load_before = os.getloadavg()[0]
    timings: dict[str, tuple[float, float, list[int]]] = {}
    notes: list[str] = []
    if "kvos" in args.engines:
        timings["kvos"] = time_kvos(
            gguf_path, prompt_ids, warmup_ids, n, args.kv_cache, args.quantization, args.compile
        )
        notes.append(
            f"kvos: weights {args.quantization or kvos_dtype}, computing in {kvos_dtype}, KV cache {args.kv_cache}, "
            f"decode {'compiled' if args.compile else 'eager'}"
        )
    version = llama_cpp_version()
    if "llama.cpp" in args.engines:
        if version is None:
            notes.append("llama.cpp: skipped, llama-cpp-python is not installed (pip install llama-cpp-python)")
        else:
            timings["llama.cpp"] = time_llama_cpp(gguf_path, prompt_ids, warmup_ids, n, args.llama_cpp_threads)
    if "hf" in args.engines:
        timings["hf"] = time_hf(gguf_path, prompt_ids, warmup_ids, n, pad_token_id)

    shape = ArchShape.from_any(arch_from_gguf(gguf_path))
    # llama.cpp reads the GGUF's quantized blocks (the file is almost all weights) and keeps KV in float16.
    kvos_weight_bytes = kvos_weight_bytes_per_param(kvos_dtype, args.quantization, rows=1)
    weight_formats = {
        "kvos": (kvos_weight_bytes, DTYPE_BYTES[kvos_dtype]),
        "hf": (4.0, 4),
        "llama.cpp": (gguf_path.stat().st_size / shape.num_params, 2),
    }
    runs = []
    for engine, (ttft, total, ids) in timings.items():
        weight_bytes, kv_bytes = weight_formats[engine]
        peak = (
            load_or_measure("cpu", dtype=kvos_gemm_dtype(kvos_dtype, args.quantization))
            if engine == "kvos"
            else machine
        )
        bound = Roofline.for_machine(shape, peak, kv_bytes_per_elem=kv_bytes).lower_bound_seconds(
            [(len(prompt_ids), n)], max_batch=1, weight_bytes_per_param=weight_bytes
        )
        runs.append(LatencyRun(engine, ttft, total, len(ids), bound.total_s, weight_bytes, ids))
    if "kvos" in timings and "hf" in timings:
        notes.append(
            "greedy tokens identical for kvos and hf: first "
            f"{matching_prefix(timings['kvos'][2], timings['hf'][2])} of {n}"
        )
    if "llama.cpp" in timings:
        notes.append(f"llama-cpp-python {version}, n_threads={args.llama_cpp_threads}")

    result = LatencyResult(
        date=datetime.date.today().isoformat(),
        model=gguf_path.name,
        machine=machine,
        prompt_token_ids=prompt_ids,
        num_new_tokens=n,
        llama_cpp_version=version,
        notes=notes,
        runs=runs,
        load_average=(load_before, os.getloadavg()[0]),
    )
    print(format_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
