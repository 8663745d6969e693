"""KV cache backends side by side: paged, virtual (vAttention) and a static max-length reservation.

For each backend, batch size and context length, B requests of C random prompt
tokens each generate D tokens (greedy, ignore_eos) on one engine:

- prefill throughput: B x C prompt tokens / time until every request has its first token;
- decode throughput: B x (D - 1) tokens / time of the remaining (pure decode) steps;
- KV memory waste = (committed - used) / committed after the last decode step
  before the requests finish, where used = the tokens whose KV is cached and
  committed = what the backend holds for the live requests: paged blocks,
  virtual pages (look-ahead pages included), or one max-length row per
  request for the static reservation.

The static reservation is the virtual manager with every row committed to
max_model_len up front, so it shares the contiguous attention path and only
differs in memory. Deferred pages are released between grid points, so each
point starts from an empty cache. Last, the waste each virtual layout would
have at 4 KiB (host) and 2 MiB (GPU) pages is computed from the same
end-of-decode token counts.

All backends get the same KV budget and the same prompts; by default each grid
point runs the backends back to back (interleaved) so that other load on the
machine skews them alike.

Usage: python -m benchmarks.kv_backends [--batches 1,8,32,64] [--contexts 256] [--full]
       [--decode-tokens 16] [--max-model-len 1024] [--backends paged,virtual,static]
       [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kvos.config import EngineConfig
from kvos.engine.llm_engine import LLMEngine
from kvos.memory.factory import available_memory_bytes
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.memory.shape import KVShape
from kvos.memory.virtual import VirtualKVCacheManager
from kvos.memory.virtual.layout import KVLayout
from kvos.model.loader import load_model
from kvos.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

BACKENDS = ("paged", "virtual", "static")
DEFAULT_BATCHES = (1, 8, 32, 64)
DEFAULT_CONTEXTS = (256,)  # about 10 minutes on 2 busy cores; --full for the rest
FULL_CONTEXTS = (256, 512, 1024, 2048, 4096)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_BATCHED_TOKENS = 16384
PAGE_SIZES = {"4KiB": 4096, "2MiB": 2 * 2**20}


@dataclass(frozen=True)
class GridPoint:
    backend: str
    batch: int
    context: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    committed_bytes: int
    used_bytes: int

    @property
    def waste(self) -> float:
        return (self.committed_bytes - self.used_bytes) / self.committed_bytes


@dataclass(frozen=True)
class LayoutWaste:
    """Waste a virtual layout would have for the same live token counts, without look-ahead."""

    batch: int
    context: int
    layout: str
    page: str
    waste: float


@dataclass(frozen=True)
class BackendsResult:
    date: str
    model: str
    settings: dict[str, Any]
    points: list[GridPoint]
    layouts: list[LayoutWaste]
    load_average: tuple[float, float]  # 1-minute load before and after: other work skews figures

    def point(self, backend: str, batch: int, context: int) -> GridPoint | None:
        for p in self.points:
            if (p.backend, p.batch, p.context) == (backend, batch, context):
                return p
        return None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for point, point_data in zip(self.points, data["points"]):
            point_data["waste"] = point.waste
        return data


def engine_options(args: argparse.Namespace, backend: str, max_model_len: int) -> dict[str, Any]:
    max_batch = max(args.batches)
    options: dict[str, Any] = {
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "seed": args.seed,
        "max_model_len": max_model_len,
        "kv_cache": "paged" if backend == "paged" else "virtual",
        "max_num_seqs": max_batch,
        # Whole prompts in as few steps as possible, so requests start (and end) together.
        "max_num_batched_tokens": min(max_batch * max(args.contexts), MAX_BATCHED_TOKENS),
    }
    if args.load_format is not None:
        options["load_format"] = args.load_format
    return options


def kv_shape(args: argparse.Namespace) -> KVShape:
    config = EngineConfig.from_kwargs(**engine_options(args, "paged", max(args.contexts)))
    arch = load_model(config.model).arch
    return KVShape(
        arch.num_hidden_layers,
        arch.num_key_value_heads,
        arch.head_dim,
        DTYPES[config.model.resolved_dtype],
        torch.device(args.device),
    )


def make_engine(backend: str, args: argparse.Namespace, max_model_len: int, kv_budget_bytes: int) -> LLMEngine:
    """One engine per backend with the same KV budget; the static one commits it all up front."""
    options = engine_options(args, backend, max_model_len)
    engine = LLMEngine(EngineConfig.from_kwargs(**options, kv_cache_memory_bytes=kv_budget_bytes))
    if backend == "static":
        kv = engine.kv_manager
        assert isinstance(kv, VirtualKVCacheManager)
        kv.commit_all_rows()
    return engine


def kv_memory(backend: str, engine: LLMEngine, bytes_per_token: int) -> tuple[int, int]:
    """(committed, used) bytes of KV held for the live requests right now."""
    kv = engine.kv_manager
    live = list(engine.scheduler.running)
    if isinstance(kv, PagedKVCacheManager):
        committed = kv.num_used_blocks * kv.block_size * bytes_per_token
    else:
        assert isinstance(kv, VirtualKVCacheManager)
        if backend == "static":
            committed = len(live) * kv.layout.row_tokens * bytes_per_token
        else:
            # Pages under live rows, look-ahead included; deferred pages of
            # finished rows are reclaimable and reported apart.
            kv.wait_for_mapper()
            committed = kv.num_used_blocks * kv.layout.page_size
    used = sum(r.num_computed_tokens for r in live) * bytes_per_token
    return committed, used


def run_point(
    backend: str,
    engine: LLMEngine,
    bytes_per_token: int,
    batch: int,
    context: int,
    decode_tokens: int,
    rng: random.Random,
) -> tuple[GridPoint, list[int]]:
    """Time one grid point; also return the live requests' cached token counts at the end of decode."""
    vocab = engine.arch.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True)
    requests = [f"{backend}-{batch}-{context}-{i}" for i in range(batch)]
    for req_id in requests:
        engine.add_request(req_id, [rng.randrange(vocab) for _ in range(context)], params)
    num_outputs: dict[str, int] = {}
    start = time.perf_counter()
    while len(num_outputs) < batch:
        for out in engine.step():
            num_outputs[out.req_id] = len(out.outputs[0].token_ids)
    prefill_s = time.perf_counter() - start
    decoded_before = sum(num_outputs.values())
    memory = (1, 0)
    token_counts: list[int] = []
    most_live = 0
    decode_s = 0.0
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        outputs = engine.step()
        decode_s += time.perf_counter() - start
        for out in outputs:
            num_outputs[out.req_id] = len(out.outputs[0].token_ids)
        live = len(engine.scheduler.running)
        if live and live >= most_live:
            # The last step at which the most requests are alive ends the decode phase.
            most_live = live
            memory = kv_memory(backend, engine, bytes_per_token)
            token_counts = [r.num_computed_tokens for r in engine.scheduler.running]
    decoded = sum(num_outputs.values()) - decoded_before
    kv = engine.kv_manager
    if isinstance(kv, VirtualKVCacheManager) and backend == "virtual":
        kv.release_idle_pages()
    point = GridPoint(
        backend=backend,
        batch=batch,
        context=context,
        prefill_tokens_per_s=batch * context / prefill_s,
        decode_tokens_per_s=decoded / decode_s,
        committed_bytes=memory[0],
        used_bytes=memory[1],
    )
    return point, token_counts


def layout_waste(engine: LLMEngine, batch: int, context: int, token_counts: list[int]) -> list[LayoutWaste]:
    arch = engine.arch
    rows = []
    for layout in ("megacache", "per_layer"):
        for page_name, page_size in PAGE_SIZES.items():
            geometry = KVLayout(
                kind=layout,
                num_layers=arch.num_hidden_layers,
                num_kv_heads=arch.num_key_value_heads,
                head_dim=arch.head_dim,
                dtype=engine.core.kv_shape.dtype,
                num_rows=max(batch, 1),
                max_context=engine.max_model_len,
                page_size=page_size,
            )
            committed = sum(geometry.pages_for(n) for n in token_counts) * geometry.num_planes * page_size
            used = sum(token_counts) * geometry.bytes_per_token
            rows.append(LayoutWaste(batch, context, layout, page_name, (committed - used) / committed))
    return rows


def warm_up(engine: LLMEngine) -> None:
    vocab = engine.arch.vocab_size
    prompt = [(100 + i) % vocab for i in range(min(64, engine.max_model_len // 2))]
    engine.add_request("warm-up", prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()


def format_table(result: BackendsResult) -> str:
    lines = [
        f"kv_backends  {result.model}  {result.settings}",
        (
            f"{'backend':8} {'batch':>5} {'context':>7} {'prefill tok/s':>13} {'decode tok/s':>12} "
            f"{'committed MiB':>13} {'waste':>7} {'decode vs paged':>15}"
        ),
    ]
    for p in result.points:
        paged = result.point("paged", p.batch, p.context)
        ratio = f"{p.decode_tokens_per_s / paged.decode_tokens_per_s:.2f}x" if paged else "-"
        lines.append(
            f"{p.backend:8} {p.batch:5d} {p.context:7d} {p.prefill_tokens_per_s:13.1f} {p.decode_tokens_per_s:12.1f} "
            f"{p.committed_bytes / 2**20:13.1f} {p.waste:7.2%} {ratio:>15}"
        )
    lines.append("virtual layouts: waste for the same end-of-decode token counts, without look-ahead:")
    for w in result.layouts:
        lines.append(f"  batch {w.batch:3d} context {w.context:5d}  {w.layout:9} {w.page:4}  {w.waste:7.2%}")
    before, after = result.load_average
    lines.append(f"load average (1 min) before {before:.2f}, after {after:.2f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a .gguf file, HF folder or (with --load-format dummy) config")
    parser.add_argument("--load-format", default=None, choices=["auto", "gguf", "hf", "dummy"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of paged,virtual,static")
    parser.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)))
    parser.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)))
    parser.add_argument("--full", action="store_true", help=f"contexts {','.join(map(str, FULL_CONTEXTS))}")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=1024,
        help="longest request the engines accept: what the static reservation holds per request",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (1 is steadier on a busy machine)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result here as JSON")
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(unknown)}")
    args.batches = sorted(int(b) for b in args.batches.split(","))
    args.contexts = list(FULL_CONTEXTS) if args.full else sorted(int(c) for c in args.contexts.split(","))
    if args.decode_tokens < 2:
        parser.error("--decode-tokens must be >= 2 (one prefill token, then decode steps)")
    return args


def main(argv: Sequence[str] | None = None) -> BackendsResult:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    max_model_len = max(args.max_model_len, max(args.contexts) + args.decode_tokens)
    shape = kv_shape(args)
    # Room for every request of the largest point at full length, plus slack for page rounding.
    kv_budget = max(args.batches) * (max_model_len + 64) * shape.bytes_per_token
    engines_fit = len(args.backends) * kv_budget * 1.25 <= available_memory_bytes(shape.device)
    grid = [(context, batch) for context in args.contexts for batch in args.batches]
    # Interleaved, every grid point runs all backends back to back, so drifting
    # load on the machine skews them alike; sequential needs one engine at a time.
    if engines_fit:
        order = [(context, batch, backend) for context, batch in grid for backend in args.backends]
    else:
        logger.warning("the engines do not fit in memory together: running the backends one after another")
        order = [(context, batch, backend) for backend in args.backends for context, batch in grid]
    load_before = os.getloadavg()[0]
    points: list[GridPoint] = []
    layouts: list[LayoutWaste] = []
    engines: dict[str, LLMEngine] = {}
    model_name = ""
    for i, (context, batch, backend) in enumerate(order):
        if backend not in engines:
            engines[backend] = make_engine(backend, args, max_model_len, kv_budget)
            warm_up(engines[backend])
        engine = engines[backend]
        model_name = engine.model_name
        rng = random.Random(f"{args.seed}-{batch}-{context}")  # the same prompts for every backend
        point, token_counts = run_point(backend, engine, shape.bytes_per_token, batch, context, args.decode_tokens, rng)
        points.append(point)
        print(
            f"{backend:8} batch {batch:3d} context {context:5d}: prefill {point.prefill_tokens_per_s:8.1f} "
            f"tok/s, decode {point.decode_tokens_per_s:7.1f} tok/s, waste {point.waste:.2%}",
            flush=True,
        )
        if backend == args.backends[0] and batch == max(args.batches):
            # Every request has the same length, so a layout's waste does not depend on the batch.
            layouts.extend(layout_waste(engine, batch, context, token_counts))
        if all(later != backend for _, _, later in order[i + 1 :]):
            if isinstance(engine.kv_manager, VirtualKVCacheManager):
                engine.kv_manager.close()
            del engines[backend], engine
            gc.collect()
    result = BackendsResult(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        model=model_name,
        settings={
            "dtype": args.dtype,
            "device": args.device,
            "decode_tokens": args.decode_tokens,
            "max_model_len": max_model_len,
            "kv_budget_bytes": kv_budget,
            "interleaved": engines_fit,
            "seed": args.seed,
            "threads": torch.get_num_threads(),
        },
        points=points,
        layouts=layouts,
        load_average=(load_before, os.getloadavg()[0]),
    )
    print(format_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_json(), indent=2))
    return result


if __name__ == "__main__":
    main()
