"""One prepared run of issue 12's GPU targets and the Triton kernels' GPU tests (about seven minutes on an H200:
session 25's run took five, before the `steps` check and the third decode variant).

Here, once (needs the default model and ShareGPT, which the device machine lacks):

    python scripts/gpu_targets.py --prepare .gpu      # a Llama-3-8B-shaped config, a tokenizer, 1,000 requests

There (carry `.gpu`; the repository goes first on sys.path by itself):

    python scripts/gpu_targets.py --data .gpu [--only NAME ...] [--out summary.json]

Checks, in order (each prints its figures, then PASS or FAIL):

    versions   torch, Triton, the device
    kernel     tests/attention/test_paged_triton.py's kernel cases and the Triton layer kernels' tests
               (tests/model/test_layer_kernels.py -k triton), compiled for the GPU
    attention  the Triton kernel per layer at Llama-3-8B's heads (bfloat16 decodes of 1 x 1,024 to 256 x 512,
               and around where splitting contexts starts to pay):
               one pass (key steps of 32, 16 and 64 positions), contexts split into 512-position partitions,
               and gather_sdpa; KV read at % of the bandwidth, and how many partitions `num_splits` picks
    engine     a small dummy Llama in float32: LLM(device="cuda") picks paged_triton and CUDA graphs, and
               its greedy tokens against gather_sdpa's (eager) (at least 90% the same: random weights leave near-ties)
    offline    the Llama-3-8B-shaped dummy in bfloat16 on the prepared ShareGPT requests: kvos's output
               tokens/s and % of the roofline (GEMM peak and read bandwidth measured here, in bfloat16),
               HF transformers on the first --hf-requests of them in the same run, in static batches;
               target: kvos at least 60% of the roofline
    steps      the same engine: kernels by kind (GEMMs, attention, the rest) against a steady offline step's
               wall time (what is not on the device is the engine's own time), with the Triton layer kernels
               and with torch's elementwise ops, and the batch-1 decode graph replayed alone; measures only
               (torch.profiler, about a minute and a half)
    decode     the same model, batch 1, 32-token prompt, 256 new tokens: tokens/s against the
               memory-bandwidth bound (every weight read once per token); target: at least 80%, with
               CUDA graphs (the default); beside it the same without the Triton layer kernels (torch's
               elementwise ops), and enforce_eager=True
    sim        issue 14: `kvos sim profile`'s worker timings of the same engine here, and the engine's own
               time per step fitted on an offline run of the first 2 x max_num_seqs requests; then the
               simulator on the offline run's requests (all at once), with the worker alone and with the
               engine's time added: duration within 5%, TTFT and TPOT p50 / p90 within 10% of the offline
               run's (judged with the engine's time; needs `offline` first in the same run)

`--dry-run` runs every check on the CPU with a 2-layer dummy and 16 requests, to try the script itself
before spending device time (the targets are not judged there). Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from check_runner import CheckFailed, Result, run_checks, say

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
SMALL = {
    **LLAMA3_8B,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 2,
    "vocab_size": 49152,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
"""The engine check's model (float32), and with --dry-run every check's."""


@dataclass(frozen=True)
class Setup:
    data: Path
    device: str
    dry_run: bool
    hf_requests: int
    kv_cache_bytes: int
    out: Path | None


def prepare(folder: Path, num_requests: int) -> None:
    """The model folders (config + tokenizer), and ShareGPT requests as token ids with their answers' lengths."""
    from benchmarks.peers import load_tokenizer, resolve_gguf
    from benchmarks.sharegpt import sample_requests
    from kvos.model.loader import _gguf_cache_entry, default_model_path
    from kvos.model.tokenizer import TOKENIZER_FILE

    tokenizer_file = _gguf_cache_entry(Path(default_model_path())) / TOKENIZER_FILE
    for name, config in (("llama3-8b", LLAMA3_8B), ("small", SMALL)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config, indent=2))
        shutil.copy(tokenizer_file, folder / name / TOKENIZER_FILE)
    requests = sample_requests(load_tokenizer(resolve_gguf(None)), num_requests)
    rows = [{"prompt_token_ids": r.prompt_token_ids, "max_tokens": r.max_tokens} for r in requests]
    (folder / "requests.json").write_text(json.dumps(rows))
    print(f"wrote {folder}: {len(rows)} requests, {sum(len(r['prompt_token_ids']) for r in rows)} prompt tokens")


def load_requests(setup: Setup) -> list[tuple[list[int], int]]:
    rows = json.loads((setup.data / "requests.json").read_text())
    if setup.dry_run:
        rows = [{**r, "max_tokens": min(r["max_tokens"], 8)} for r in rows[:16]]
    return [(r["prompt_token_ids"], r["max_tokens"]) for r in rows]


def big_model(setup: Setup) -> str:
    return str(setup.data / ("small" if setup.dry_run else "llama3-8b"))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release(device: str) -> None:
    """Give a closed engine's GPU memory back before the next check builds one (an 8B model and its KV
    cache take 56 GiB; three of them at once would not fit)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def check_versions(setup: Setup, result: Result) -> None:
    say(result, f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {setup.device}")
    if setup.device == "cuda":
        say(result, f"{torch.cuda.get_device_name()}, {torch.cuda.mem_get_info()[1] / 2**30:.0f} GiB")
    try:
        import triton

        say(result, f"triton {triton.__version__}")
    except ImportError:
        say(result, "no triton")


def check_kernel(setup: Setup, result: Result) -> None:
    import pytest

    if setup.dry_run:
        say(result, "skipped in a dry run (the suite runs these tests in Triton's interpreter)")
        return
    # The tests against HF need the default model, which the GPU machine lacks (CI runs them on the CPU);
    # of the layer kernels' tests, the Triton ones (the rest are the CPU's C++ kernels).
    for tests, select in (
        ("attention/test_paged_triton.py", "not matches_hf"),
        ("model/test_layer_kernels.py", "triton"),
    ):
        code = pytest.main(["-q", "-p", "no:cacheprovider", str(REPO / "tests" / tests), "-k", select])
        if code != 0:
            raise CheckFailed(f"pytest exited with {code} on {tests}")


def check_attention(setup: Setup, result: Result) -> None:
    """The Triton kernel's speed per layer at Llama-3-8B's heads in bfloat16 (one pass over each context,
    split into partitions, and the gather + SDPA reference), against the KV read at the measured bandwidth."""
    from kvos.attention import paged_triton
    from kvos.attention.backend import SeqLayout

    heads, kv_heads, dim, block = (4, 2, 64, 16) if setup.dry_run else (32, 8, 128, 16)
    # Beside the first run's five points, where one pass and the split cross: at 1 x 1,024 the split
    # (3 partitions) lost, 166 against 138 us, and at 16 x 2,048 it won, 169 against 244 (H200, 2026-11-30).
    points = (
        [(1, 64), (4, 128)]
        if setup.dry_run
        else [(1, 1024), (1, 1536), (1, 2048), (4, 1024), (4, 2048), (1, 8192), (16, 2048), (64, 1024), (256, 512)]
    )
    bandwidth = measured_roofline(setup, big_model(setup))[0].read_bandwidth  # measured once for every check
    say(result, f"read bandwidth {bandwidth / 1e9:.0f} GB/s; us per layer (KV read at % of it)")
    for batch, context in points:
        blocks = batch * (-(-(context + 1) // block))
        pool = blocks * 2 * block
        k_cache = torch.randn(pool, kv_heads, dim, device=setup.device, dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        order = torch.randperm(pool // block, device=setup.device)[:blocks].view(batch, -1).int()
        seqs = []
        for b in range(batch):
            slots = (order[b, :, None].long() * block + torch.arange(block, device=setup.device)).flatten()
            seqs.append(SeqLayout(b, 1, context, slots[: context + 1], order[b], block))
        q = torch.randn(batch, heads, dim, device=setup.device, dtype=torch.bfloat16)
        ways = attention_ways(seqs, q, k_cache, v_cache)
        kv_bytes = 2 * batch * (context + 1) * kv_heads * dim * 2
        reference = ways["one pass"]()
        cells = []
        for name, way in ways.items():
            torch.testing.assert_close(way(), reference, rtol=2e-2, atol=2e-2)
            seconds = time_call(way, setup.device)
            cells.append(f"{name} {seconds * 1e6:.0f} ({100 * kv_bytes / seconds / bandwidth:.0f}%)")
            result.figures[f"{batch}x{context} {name} us"] = seconds * 1e6
        auto = paged_triton.num_splits(batch * kv_heads, context + 1, torch.device(setup.device))
        say(result, f"{batch} x {context}: " + ", ".join(cells) + f"; auto splits {auto}")


def attention_ways(
    seqs: list[Any], q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> dict[str, Callable[[], torch.Tensor]]:
    """One decode layer three ways over the same cache; gather_sdpa rewrites the new positions' own K/V."""
    from kvos.attention import paged_triton
    from kvos.attention.backend import make_backend

    device = q.device
    triton_meta = make_backend("paged_triton").build_metadata(seqs, q.shape[0], device)
    gather = make_backend("gather_sdpa")
    gather_meta = gather.build_metadata(seqs, q.shape[0], device)
    k_new, v_new = k_cache[gather_meta.slot_mapping], v_cache[gather_meta.slot_mapping]

    def triton(partition: int, block_n: int) -> Callable[[], torch.Tensor]:
        return lambda: paged_triton.paged_attention(q, k_cache, v_cache, triton_meta, 0.1, partition, block_n)

    return {
        "one pass": triton(1 << 30, 32),
        "one pass, 16-key steps": triton(1 << 30, 16),
        "one pass, 64-key steps": triton(1 << 30, 64),
        "split 512": triton(512, 32),
        "gather_sdpa": lambda: gather.forward(q, k_new, v_new, k_cache, v_cache, gather_meta, 0.1),
    }


def time_call(call: Callable[[], Any], device: str, repeats: int = 20) -> float:
    """Median seconds of `call` over `repeats` runs after three warm-ups."""
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@contextlib.contextmanager
def around(cls: type, name: str, hook: Callable[..., Any]) -> Iterator[None]:
    """Inside the block, `cls.name(self, ...)` runs as `hook(original, self, ...)`: a timer or recorder around an
    engine method, put back however the block ends."""
    original = getattr(cls, name)
    setattr(cls, name, lambda self, *args, **kwargs: hook(original, self, *args, **kwargs))
    try:
        yield
    finally:
        setattr(cls, name, original)


@contextlib.contextmanager
def torch_elementwise_ops(enabled: bool) -> Iterator[None]:
    """With `enabled`, engines built inside keep torch's elementwise ops instead of the Triton layer kernels."""
    from kvos.core import engine_core

    chooses = engine_core.can_use_triton_layers
    if enabled:
        engine_core.can_use_triton_layers = lambda device, dtype: False  # type: ignore[assignment]
    try:
        yield
    finally:
        engine_core.can_use_triton_layers = chooses


def check_engine(setup: Setup, result: Result) -> None:
    from kvos import LLM, SamplingParams

    prompts = [ids[:64] for ids, _ in load_requests(setup)[:8]]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    tokens: dict[str, list[list[int]]] = {}
    for backend in ("auto", "gather_sdpa"):
        llm = LLM(
            str(setup.data / "small"),
            load_format="dummy",
            device=setup.device,
            dtype="float32",
            attention_backend=backend,
            kv_cache_memory_bytes=2**30,
        )
        worker = llm.engine._local_core().worker
        chosen = worker.attention.name
        graphs = worker.decode_graphs is not None
        say(result, f"attention_backend={backend!r} runs {chosen}{', decodes from CUDA graphs' if graphs else ''}")
        if backend == "auto" and setup.device == "cuda" and (chosen != "paged_triton" or not graphs):
            raise CheckFailed(f"auto picked {chosen} on CUDA, CUDA graphs {'on' if graphs else 'off'}")
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.close()
        del llm
        release(setup.device)
    pairs = [(a, b) for x, y in zip(tokens["auto"], tokens["gather_sdpa"]) for a, b in zip(x, y)]
    same = sum(a == b for a, b in pairs) / len(pairs)
    result.figures["same_tokens"] = same
    say(result, f"greedy tokens equal to gather_sdpa's: {same:.1%} of {len(pairs)}")
    if same < 0.9:
        raise CheckFailed("fewer than 90% of the tokens agree")


@functools.cache
def measured_roofline(setup: Setup, model: str) -> Any:
    from benchmarks.roofline import ArchShape, Roofline, measure_machine

    config = json.loads((Path(model) / "config.json").read_text())
    peak = measure_machine(setup.device, ArchShape.from_any(config), dtype="bfloat16")
    return peak, Roofline(ArchShape.from_any(config), peak.peak_flops, peak.read_bandwidth, kv_bytes_per_elem=2)


def offline_engine_options(setup: Setup) -> dict[str, Any]:
    return {
        "model": big_model(setup),
        "load_format": "dummy",
        "device": setup.device,
        "dtype": "bfloat16",
        "max_num_seqs": 256,
        "max_num_batched_tokens": 8192,
        "kv_cache_memory_bytes": setup.kv_cache_bytes,
    }


def check_offline(setup: Setup, result: Result) -> None:
    from benchmarks.serve import percentiles_ms
    from kvos import LLM, SamplingParams

    requests = load_requests(setup)
    model = big_model(setup)
    peak, roofline = measured_roofline(setup, model)
    say(result, f"roofline: {peak.peak_flops / 1e12:.1f} TFLOP/s bf16, {peak.read_bandwidth / 1e9:.0f} GB/s read")
    options = offline_engine_options(setup)
    max_num_seqs = int(options["max_num_seqs"])
    llm = LLM(**options)
    warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate([requests[0][0]], warm, use_tqdm=False)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    sync(setup.device)
    start = time.perf_counter()
    outputs = llm.generate([ids for ids, _ in requests], params, use_tqdm=False)
    sync(setup.device)
    elapsed = time.perf_counter() - start
    llm.close()
    del llm
    release(setup.device)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    wanted = sum(n for _, n in requests)
    ttft = [o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outputs]
    tpot = [
        (o.metrics["finish_time"] - o.metrics["first_token_time"]) / (len(o.outputs[0].token_ids) - 1)
        for o in outputs
        if len(o.outputs[0].token_ids) > 1
    ]
    result.figures.update(ttft_ms=percentiles_ms(ttft), tpot_ms=percentiles_ms(tpot))
    bound = roofline.lower_bound_seconds([(len(ids), n) for ids, n in requests], max_num_seqs, 2.0).total_s
    kvos_rate = output_tokens / elapsed
    result.figures.update(
        requests=len(requests), output_tokens=output_tokens, kvos_s=elapsed, kvos_tok_s=kvos_rate, bound_s=bound
    )
    result.figures["kvos_pct_of_limit"] = 100 * bound / elapsed
    say(result, f"kvos: {len(requests)} requests, {output_tokens} tokens (wanted {wanted}) in {elapsed:.1f} s")
    say(result, f"kvos: {kvos_rate:.0f} output tok/s, {100 * bound / elapsed:.1f}% of the roofline ({bound:.1f} s)")
    MEASURED["offline"] = result.figures
    hf_rate = run_hf(setup, model, requests[: setup.hf_requests], result)
    result.figures["kvos_over_hf"] = kvos_rate / hf_rate
    say(result, f"kvos / HF transformers output tok/s: {kvos_rate / hf_rate:.2f}x")
    if output_tokens != wanted:
        raise CheckFailed(f"kvos generated {output_tokens} tokens, not {wanted}")
    if not setup.dry_run and 100 * bound / elapsed < 60:
        say(result, "target (60% of the roofline) missed")
        raise CheckFailed("under 60% of the roofline")


def run_hf(setup: Setup, model: str, requests: list[tuple[list[int], int]], result: Result) -> float:
    """HF transformers on the same model shape (its own random weights), static left-padded batches of 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.offline_throughput import hf_generate

    config = LlamaConfig(**{k: v for k, v in json.loads((Path(model) / "config.json").read_text()).items()})
    with torch.device(setup.device):
        hf = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    batch_size, pad = 64, 0
    useful = 0
    sync(setup.device)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(requests), batch_size):
            batch = requests[i : i + batch_size]
            new = max(n for _, n in batch)
            hf_generate(hf, [ids for ids, _ in batch], new, pad)
            useful += sum(n for _, n in batch)
    sync(setup.device)
    elapsed = time.perf_counter() - start
    del hf
    release(setup.device)
    rate = useful / elapsed
    result.figures.update(hf_requests=len(requests), hf_s=elapsed, hf_tok_s=rate)
    say(
        result,
        f"HF transformers: {len(requests)} requests, {useful} useful tokens in {elapsed:.1f} s: {rate:.0f} tok/s",
    )
    return rate


def check_decode(setup: Setup, result: Result) -> None:
    """Batch-1 decode with CUDA graphs (the default), then the same with torch's elementwise ops instead of
    the Triton layer kernels, then with enforce_eager=True, for comparison."""
    model = big_model(setup)
    peak, roofline = measured_roofline(setup, model)
    new_tokens = 16 if setup.dry_run else 256
    bound = sum(roofline.decode_step_seconds([32 + i], 2.0) for i in range(new_tokens))
    pct = {}
    for name, eager, triton_layers in (
        ("graphs", False, True),
        ("graphs_torch_ops", False, False),  # torch's elementwise ops instead of the Triton layer kernels
        ("eager", True, True),
    ):
        elapsed = _time_decode(setup, result, model, new_tokens, eager, triton_layers)
        pct[name] = 100 * bound / elapsed
        result.figures[f"{name}_tok_s"] = new_tokens / elapsed
        say(
            result,
            f"batch 1, {name}: {new_tokens / elapsed:.1f} tok/s, {1e3 * elapsed / new_tokens:.2f} ms/token "
            f"(best of 2, prefill included): {pct[name]:.1f}% of the memory-bandwidth bound",
        )
    result.figures.update(bound_tok_s=new_tokens / bound, pct_of_bound=pct["graphs"])
    say(result, f"bound {new_tokens / bound:.1f} tok/s ({1e3 * bound / new_tokens:.2f} ms/token)")
    if not setup.dry_run and pct["graphs"] < 80:
        raise CheckFailed("under 80% of the bound")


def _time_decode(setup: Setup, result: Result, model: str, new_tokens: int, eager: bool, triton_layers: bool) -> float:
    """Best of two batch-1 decodes; `triton_layers=False` keeps torch's elementwise ops (no Triton norms,
    SwiGLU or rotary), to show what those kernels save."""
    from kvos import LLM, SamplingParams

    with torch_elementwise_ops(not triton_layers):
        llm = LLM(
            model,
            load_format="dummy",
            device=setup.device,
            dtype="bfloat16",
            kv_cache_memory_bytes=2**30,
            enforce_eager=eager,
        )
    prompt = load_requests(setup)[0][0][:32]
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    times = []
    for _ in range(2):
        sync(setup.device)
        start = time.perf_counter()
        out = llm.generate(
            [prompt], SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True), use_tqdm=False
        )
        sync(setup.device)
        times.append(time.perf_counter() - start)
        if len(out[0].outputs[0].token_ids) != new_tokens:
            raise CheckFailed(f"{len(out[0].outputs[0].token_ids)} tokens, not {new_tokens}")
    graphs = llm.engine._local_core().worker.decode_graphs
    if graphs is not None:
        say(result, f"batch-1 graph replayed alone: {1e3 * replay_batch1(graphs, setup.device, 50):.2f} ms per step")
    llm.close()
    del llm
    release(setup.device)
    return min(times)


def replay_batch1(graphs: Any, device: str, repeats: int) -> float:
    """Seconds per replay of the batch-1 decode graph, back to back on the last step's buffers: the GPU's
    time per token without the engine's (its requests have ended; the engine is closed right after)."""
    replay = graphs._replays[1, graphs.splits[1][0]]
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        replay()
    sync(device)
    return (time.perf_counter() - start) / repeats


KERNEL_KINDS = (
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm", "linear")),
    ("attention", ("paged", "attention", "attn", "sdpa", "flash")),
)
"""Kernel names by kind (lower case substrings); the rest (norms, rotary, SwiGLU, copies, sampling) is "other"."""


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(mark in lowered for mark in marks)), "other")


def kernel_table(prof: Any, steps: int, device: str) -> tuple[dict[str, float], list[tuple[str, float, float]]]:
    """Per step: ms of device time by kind, and the ten longest kernels (name, ms, calls). On the CPU
    (--dry-run) the operators' self CPU time stands in for kernels."""
    on_device = device == "cuda"
    kinds: dict[str, float] = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    rows = []
    for event in prof.key_averages():
        if on_device:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.self_device_time_total
        else:
            us = event.self_cpu_time_total
        if us <= 0 or event.key.startswith("ProfilerStep"):
            continue
        kinds[kernel_kind(event.key)] += us / 1e3 / steps
        rows.append((event.key[:90], us / 1e3 / steps, event.count / steps))
    return kinds, sorted(rows, key=lambda row: -row[1])[:10]


def report_kernels(result: Result, label: str, wall_ms: float, kinds: dict[str, float], top: list[Any]) -> None:
    busy = sum(kinds.values())
    result.figures[label] = {"wall_ms": wall_ms, "kernel_ms": kinds, "top": top}
    shares = ", ".join(f"{kind} {ms:.2f} ms ({100 * ms / wall_ms:.0f}%)" for kind, ms in kinds.items())
    for name, ms, calls in top:
        say(result, f"  {label}: {ms:7.3f} ms  {calls:6.1f} calls  {name}")
    say(
        result,
        f"{label}: {wall_ms:.2f} ms a step; kernels {busy:.2f} ms: {shares}; not on the device "
        f"{wall_ms - busy:.2f} ms ({100 * (wall_ms - busy) / wall_ms:.0f}%)",
    )


def check_steps(setup: Setup, result: Result) -> None:
    """Where the time of a steady offline step goes: kernels by kind against the step's wall time.

    The offline check's engine on its first 1.5 x max_num_seqs requests (a full batch with new prompts
    coming in as others end, as in the offline run); the profiler records a window of steps after the
    first admissions' prefill. Then the same with torch's elementwise ops instead of the Triton layer
    kernels (a step with prompt tokens runs eagerly, where Triton's launches cost more host time than
    torch's), and the batch-1 decode graph replayed alone. Measures, judges nothing.
    """
    for label, torch_ops in (("offline_step", False), ("offline_step_torch_ops", True)):
        with torch_elementwise_ops(torch_ops):
            _profile_offline_steps(setup, result, label, with_graph=not torch_ops)


def _profile_offline_steps(setup: Setup, result: Result, label: str, with_graph: bool) -> None:
    from torch.profiler import ProfilerActivity, profile, schedule

    from kvos import LLM, SamplingParams
    from kvos.engine.llm_engine import LLMEngine
    from kvos.worker.worker import Worker

    options = offline_engine_options(setup)
    requests = load_requests(setup)[: int(options["max_num_seqs"]) * 3 // 2]
    skip, active = (2, 4) if setup.dry_run else (30, 20)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device == "cuda" else [])
    llm = LLM(**options)
    llm.generate([requests[0][0]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    walls: list[float] = []
    shapes: list[tuple[int, int]] = []
    prof = profile(activities=activities, schedule=schedule(wait=skip, warmup=2, active=active, repeat=1))

    def profiled_step(step: Callable[..., Any], self: LLMEngine, *args: Any, **kwargs: Any) -> Any:
        sync(setup.device)
        start = time.perf_counter()
        out = step(self, *args, **kwargs)
        sync(setup.device)
        walls.append(time.perf_counter() - start)
        prof.step()
        return out

    def shaped_execute(execute: Callable[..., Any], self: Worker, plan: Any) -> Any:
        decodes = sum(1 for s in plan.scheduled if len(s.new_token_ids) == 1)
        shapes.append((decodes, sum(len(s.new_token_ids) for s in plan.scheduled)))
        return execute(self, plan)

    with prof, around(LLMEngine, "step", profiled_step), around(Worker, "execute", shaped_execute):
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
        llm.generate([ids for ids, _ in requests], params, use_tqdm=False)
    window = slice(skip + 2, skip + 2 + active)
    if len(walls[window]) < active:
        raise CheckFailed(f"the run took {len(walls)} steps, fewer than the {skip + 2 + active} the window needs")
    decodes = [d for d, _ in shapes[window]]
    tokens = [t for _, t in shapes[window]]
    say(
        result,
        f"{label}: steps {window.start}-{window.stop - 1} of {len(walls)}, {sum(decodes) / active:.0f} "
        f"decodes and {sum(tokens) / active:.0f} tokens a step",
    )
    kinds, top = kernel_table(prof, active, setup.device)
    report_kernels(result, label, 1e3 * sum(walls[window]) / active, kinds, top)
    graphs = llm.engine._local_core().worker.decode_graphs
    if with_graph and graphs is not None:
        replay_batch1(graphs, setup.device, 1)  # outside the profile: a first replay's own costs
        with profile(activities=activities) as graph_prof:
            wall = replay_batch1(graphs, setup.device, 20)
        kinds, top = kernel_table(graph_prof, 20, setup.device)
        report_kernels(result, "batch1_graph", 1e3 * wall, kinds, top)
    llm.close()
    del llm
    release(setup.device)


def check_sim(setup: Setup, result: Result) -> None:
    """Issue 14 on the GPU: profile the 8B dummy's worker here, simulate the offline run, compare with it."""
    from benchmarks.serve import percentiles_ms
    from kvos.config import EngineConfig
    from kvos.sim.metrics import busy_by_term
    from kvos.sim.profile import ProfileGrid, profile_engine
    from kvos.sim.simulator import FleetConfig, InstanceConfig, Simulator
    from kvos.sim.step_model import ServedStepModel, TermTotals, fit_linear
    from kvos.sim.workload import SimRequest

    measured = MEASURED.get("offline")
    if measured is None:
        raise CheckFailed("needs the offline check's figures: run it first")
    config = EngineConfig.from_kwargs(**offline_engine_options(setup))
    grid = ProfileGrid(
        prefill_tokens=(0, 64, 512) if setup.dry_run else (0, 256, 1024, 4096, 8192),
        decode_batch_sizes=(0, 1, 8) if setup.dry_run else (0, 1, 32, 128, 256),
        contexts=(64, 256) if setup.dry_run else (64, 256, 640),
        repeats=1 if setup.dry_run else 3,
    )
    profile = profile_engine(config, grid)
    error = profile.to_json()["fit_error"]
    fit = f"fit mean error {error['mean_abs_pct']:.1f}%, max {error['max_abs_pct']:.1f}%"
    say(result, f"profile: {len(profile.samples)} points; {fit}; first use {1e3 * profile.first_use_seconds():.2f} ms")
    prepared = load_requests(setup)
    # Twice as many requests as slots, so that requests finish and new ones join running batches: most
    # of the validated run's steps mix prompts into a full batch. (A first try fitted on 250 of 1,000
    # requests, all admitted at once: 3 of its 255 steps had prompts, and the overhead came out short.)
    fit_requests = prepared[: 2 * config.scheduler.max_num_seqs]
    served = served_offline_steps(setup, fit_requests)
    profile = dataclasses.replace(profile, served=tuple(served))
    overhead = profile.to_json()["serving"]["overhead_fit"]
    say(
        result,
        f"engine's own time per step, fitted on {len(served)} steps of an offline run of the first "
        f"{len(fit_requests)} requests: {1e3 * overhead['per_step']:.2f} ms + "
        f"{1e6 * overhead['per_sequence']:.1f} us per request in the step",
    )
    if setup.out is not None:
        setup.out.parent.mkdir(parents=True, exist_ok=True)
        (setup.out.parent / "gpu-profile.json").write_text(json.dumps(profile.to_json(), indent=2))
    requests = [SimRequest(0.0, len(ids), n) for ids, n in prepared]
    instance = InstanceConfig(
        scheduler=config.scheduler,
        kv_capacity_tokens=int(profile.engine["kv_capacity_tokens"]),
        block_size=int(profile.engine["block_size"]),
        max_model_len=int(profile.engine["max_model_len"]),
        front_end=profile.front_end(),
        first_use_s=profile.first_use_seconds(),
    )
    missed = 0
    served_model = profile.step_model()
    assert isinstance(served_model, ServedStepModel)
    # The last is a prediction, not a validation: the engine's work overlapping the device's (async scheduling).
    models = (
        ("worker alone", fit_linear(profile.samples)[0]),
        ("worker + engine", served_model),
        ("worker + engine overlapped", ServedStepModel(served_model.worker, served_model.overhead, overlap=True)),
    )
    ends: dict[str, float] = {}
    for name, model in models:
        totals = TermTotals(model)
        sim = Simulator(FleetConfig(instance, 1), totals).run(requests)
        ends[name] = sim.end_s
        split = busy_by_term(totals.seconds, sim)
        say(result, f"{name}: busy s by term: " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()))
        if name.endswith("overlapped"):
            gain = ends["worker + engine"] / sim.end_s
            say(result, f"{name}, a prediction: {sim.end_s:.1f} s, {gain:.2f}x the simulated run without overlap")
            result.figures["predicted_overlapped_s"] = sim.end_s
            continue
        times = sim.times
        simulated = {
            "duration_s": sim.end_s,
            "ttft_ms": percentiles_ms([f - a for f, a in zip(times.first_token_s, times.arrival_s)]),
            "tpot_ms": percentiles_ms(
                [
                    (last - first) / (n - 1)
                    for first, last, n in zip(times.first_token_s, times.last_token_s, times.num_output_tokens)
                    if n > 1
                ]
            ),
        }
        rows = [("duration s", measured["kvos_s"], simulated["duration_s"], 5.0)]
        for figure in ("ttft_ms", "tpot_ms"):
            for q in ("p50", "p90"):
                rows.append((f"{figure[:4].upper()} {q} ms", measured[figure][q], simulated[figure][q], 10.0))
        say(result, f"simulated with the {name}:")
        for label, real, modelled, bound in rows:
            error = 100 * (modelled - real) / real
            if name == "worker + engine":
                missed += abs(error) > bound
            say(
                result,
                f"  {label}: measured {real:.1f}, simulated {modelled:.1f} ({error:+.1f}%, target within {bound:g}%)",
            )
        result.figures[f"simulated_{name.replace(' ', '_').replace('+', 'and')}"] = simulated
    result.figures["profile_samples"] = len(profile.samples)
    if missed and not setup.dry_run:
        raise CheckFailed(f"{missed} of {len(rows)} figures outside the targets (worker + engine)")


def served_offline_steps(setup: Setup, requests: list[tuple[list[int], int]]) -> list[tuple[Any, float]]:
    """(shape, seconds from its start to the next step's) of each step of an offline run of `requests` on the
    offline check's engine: what a step costs with the engine's own work (scheduler, books, outputs) in it."""
    from kvos import LLM, SamplingParams
    from kvos.engine.llm_engine import LLMEngine
    from kvos.sim.step_model import StepShape
    from kvos.worker.worker import Worker

    llm = LLM(**offline_engine_options(setup))
    llm.generate([requests[0][0]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    starts: list[float] = []
    shapes: dict[int, StepShape] = {}

    def timed_step(step: Callable[..., Any], self: LLMEngine, *args: Any, **kwargs: Any) -> Any:
        starts.append(time.perf_counter())
        return step(self, *args, **kwargs)

    def shaped_execute(execute: Callable[..., Any], self: Worker, plan: Any) -> Any:
        if plan.scheduled:
            shapes[len(starts) - 1] = StepShape.from_plan(plan)
        return execute(self, plan)

    with around(LLMEngine, "step", timed_step), around(Worker, "execute", shaped_execute):
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
        llm.generate([ids for ids, _ in requests], params, use_tqdm=False)
    llm.close()
    del llm
    release(setup.device)
    return [(shapes[k], starts[k + 1] - starts[k]) for k in range(len(starts) - 1) if k in shapes]


CHECKS: dict[str, Callable[[Setup, Result], None]] = {
    "versions": check_versions,
    "kernel": check_kernel,
    "attention": check_attention,
    "engine": check_engine,
    "offline": check_offline,
    "steps": check_steps,
    "decode": check_decode,
    "sim": check_sim,
}
MEASURED: dict[str, dict[str, Any]] = {}
"""Figures one check leaves for a later one (the simulator's check compares with the offline run)."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", type=Path, help="write the config, tokenizer and requests here, then stop")
    parser.add_argument("--num-requests", type=int, default=1000, help="with --prepare")
    parser.add_argument("--data", type=Path, default=REPO / ".gpu", help="what --prepare wrote")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), help="run only these checks (default: all)")
    parser.add_argument("--hf-requests", type=int, default=128, help="HF transformers runs the first N requests")
    parser.add_argument("--kv-cache-gib", type=float, default=40.0, help="kvos's KV budget for the 8B model")
    parser.add_argument("--dry-run", action="store_true", help="every check on the CPU with a tiny model")
    parser.add_argument("--out", type=Path, help="also write the summary here as JSON")
    args = parser.parse_args()
    if args.prepare is not None:
        prepare(args.prepare, args.num_requests)
        return 0
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when Triton is first imported
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (use --dry-run to try the script on the CPU)")
        return 2
    hf_requests = 4 if args.dry_run else args.hf_requests
    setup = Setup(args.data, device, args.dry_run, hf_requests, int(args.kv_cache_gib * 2**30), args.out)
    bound = {name: functools.partial(check, setup) for name, check in CHECKS.items()}
    return run_checks(bound, args.only or list(CHECKS), args.out)


if __name__ == "__main__":
    sys.exit(main())
